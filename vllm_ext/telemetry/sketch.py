"""Count-Min (Cormode & Muthukrishnan 2005) and Count Sketch (Charikar, Chen & Farach-Colton
2002): the two point-query sketches that DiSketch (arXiv 2503.13515) breaks into fragments.

A sketch is ``depth`` rows of ``width`` int32 counters (width a power of two, see
`hashing`), so its memory is ``4 * depth * width`` bytes. Rules and stated bounds:

* Count-Min: add ``c`` to ``C[r][h_r(x)]`` in every row; estimate = min over rows. Never
  below the truth; the overestimate is at most ``e * N / w`` (N = items added) with
  probability at least ``1 - e^-depth`` (Markov per row, rows independent).
* Count Sketch: add ``s_r(x) * c``; estimate = median over rows of ``s_r(x) * C[r][h_r(x)]``.
  Unbiased; per row ``P(|err| > sqrt(3 * F2 / w)) <= 1/3`` (Chebyshev, F2 = sum of squared
  counts), so the median fails with at most ``P(Binomial(depth, 1/3) >= ceil(depth/2))``.

Query-time merging across fragments of different widths (`fragments`) works on the
per-row values `row_values` at each fragment's own width: summed over fragments, then the
min (CM) or median (CS) over rows; that keeps both bounds with N / w replaced by
``sum_i N_i / w_i`` and F2 / w by ``sum_i F2_i / w_i``. `fold` halves a width exactly
(the counters of ``j`` and ``j + w/2`` add up); `merge` adds two equal-shaped sketches.
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field

import numpy as np

from vllm_ext.telemetry.hashing import keys_array, mix64, row_hashes, row_seeds, signs

KINDS = ("cm", "cs")
COUNTER_BYTES = 4
SMALL_BATCH = 48  # cells up to which plain Python beats numpy's per-call overhead (measured)


def width_for(budget_bytes: int, depth: int, min_width: int = 16) -> int:
    """The largest power-of-two width whose ``depth`` rows fit in `budget_bytes`."""
    cells = max(1, int(budget_bytes) // (COUNTER_BYTES * depth))
    return max(min_width, 1 << (cells.bit_length() - 1))


def cm_failure_probability(depth: int) -> float:
    return math.exp(-depth)


def cs_failure_probability(depth: int) -> float:
    """P(the median of `depth` rows errs by more than the per-row bound)."""
    need = (depth + 1) // 2
    return sum(math.comb(depth, k) * (1 / 3) ** k * (2 / 3) ** (depth - k)
               for k in range(need, depth + 1))


@dataclass
class Sketch:
    kind: str = "cm"
    depth: int = 4
    width: int = 256
    seed: int = 0
    counters: np.ndarray = field(default=None, repr=False)
    items: int = 0  # N: total count added

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"sketch kind must be one of {KINDS}, got {self.kind!r}")
        if self.width < 1 or self.width & (self.width - 1):
            raise ValueError(f"sketch width must be a power of two, got {self.width}")
        if self.depth < 1:
            raise ValueError(f"sketch depth must be >= 1, got {self.depth}")
        if self.counters is None:
            self.counters = np.zeros((self.depth, self.width), dtype=np.int32)
        self._seeds = row_seeds(self.depth, self.seed)
        self._py_seeds = [int(x) for x in self._seeds]

    @property
    def memory_bytes(self) -> int:
        return int(self.counters.nbytes)

    def _cells(self, keys: np.ndarray):
        hashes = row_hashes(keys, self._seeds)
        cols = (hashes & np.uint64(self.width - 1)).astype(np.int64)
        return hashes, cols

    def add(self, items, counts=None) -> None:
        keys = keys_array(items)
        if keys.size == 0:
            return
        if keys.size * self.depth <= SMALL_BATCH:  # the per-request path: same cells
            return self._add_small(keys.tolist(), [1] * keys.size if counts is None else
                                   [int(c) for c in counts])
        counts = np.ones(keys.size, dtype=np.int64) if counts is None else \
            np.asarray(counts, dtype=np.int64)
        hashes, cols = self._cells(keys)
        delta = np.broadcast_to(counts[None, :] * (signs(hashes) if self.kind == "cs" else 1),
                                cols.shape).astype(np.int32)
        flat = cols + (np.arange(self.depth, dtype=np.int64) * self.width)[:, None]
        np.add.at(self.counters.reshape(-1), flat.reshape(-1), delta.reshape(-1))
        self.items += int(counts.sum())

    def _add_small(self, keys: list[int], counts: list[int]) -> None:
        mask, cs, rows = self.width - 1, self.kind == "cs", self.counters
        for r, seed in enumerate(self._py_seeds):
            row = rows[r]
            for key, c in zip(keys, counts):
                h = mix64(key ^ seed)
                row[h & mask] += (c if mix64(h) >> 63 else -c) if cs else c
        self.items += sum(counts)

    def row_values(self, keys: np.ndarray) -> np.ndarray:
        """[depth, n] per-row values for `keys` (CS: sign-corrected), int64."""
        hashes, cols = self._cells(keys)
        vals = np.take_along_axis(self.counters.astype(np.int64), cols, axis=1)
        return vals * signs(hashes) if self.kind == "cs" else vals

    def query(self, items) -> np.ndarray:
        return combine(self.kind, self.row_values(keys_array(items)))

    def f2_estimate(self) -> float:
        """AMS estimate of F2 from the counters (CS rows; for CM an upper bound)."""
        return float(np.median((self.counters.astype(np.float64) ** 2).sum(axis=1)))

    def error_bound(self, f2: float | None = None) -> float:
        """The additive error the header states, for this sketch alone."""
        if self.kind == "cm":
            return math.e * self.items / self.width
        return math.sqrt(3 * (self.f2_estimate() if f2 is None else f2) / self.width)

    def failure_probability(self) -> float:
        return (cm_failure_probability if self.kind == "cm" else
                cs_failure_probability)(self.depth)

    def fold(self, width: int) -> "Sketch":
        """This sketch at a smaller power-of-two `width` (exact: same as hashing into it)."""
        if width > self.width or width & (width - 1):
            raise ValueError(f"can only fold to a smaller power of two, got {width}")
        c = self.counters.astype(np.int64).reshape(self.depth, self.width // width, width)
        return Sketch(self.kind, self.depth, width, self.seed,
                      c.sum(axis=1).astype(np.int32), self.items)

    def compatible(self, other: "Sketch") -> bool:
        return (self.kind, self.depth, self.seed) == (other.kind, other.depth, other.seed)

    def merge(self, other: "Sketch") -> "Sketch":
        """Counter-wise sum (the smaller width wins: the wider one is folded)."""
        if not self.compatible(other):
            raise ValueError("sketches with different kind/depth/seed cannot merge")
        width = min(self.width, other.width)
        a, b = self.fold(width), other.fold(width)
        return Sketch(self.kind, self.depth, width, self.seed,
                      (a.counters.astype(np.int64) + b.counters).astype(np.int32),
                      self.items + other.items)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "depth": self.depth, "width": self.width, "seed": self.seed,
                "items": self.items,
                "counters": base64.b64encode(self.counters.astype("<i4").tobytes()).decode()}

    @classmethod
    def from_dict(cls, d: dict) -> "Sketch":
        raw = np.frombuffer(base64.b64decode(d["counters"]), dtype="<i4")
        counters = raw.astype(np.int32).reshape(int(d["depth"]), int(d["width"]))
        return cls(d["kind"], int(d["depth"]), int(d["width"]), int(d["seed"]), counters,
                   int(d["items"]))


def combine(kind: str, rows: np.ndarray) -> np.ndarray:
    """Row values [depth, n] -> estimates [n]: min (CM) or median (CS)."""
    if kind == "cm":
        return rows.min(axis=0)
    return np.median(rows, axis=0)
