"""Fragmented sketches over time and replicas: DiSketch, "Sketch Disaggregation Across Time
and Space" (Langlet, Chen, Mitzenmacher, Ben Basat, Liu, Antichi; arXiv 2503.13515).

The paper's idea: instead of one sketch per node for a whole monitoring epoch, each node keeps
*fragments* - sketches that cover sub-epochs and whose sizes follow the memory the node has -
and a query combines every fragment that overlaps the queried time range, from every node.
What was not recoverable from the paper is chosen here and made a parameter:

* **Fragment size** (`FragmentedSketch.budget_bytes`, `fragment_bytes`): a new fragment gets
  the largest power-of-two width that fits both ``fragment_bytes`` and what is left of the
  node's budget after its retained fragments; when nothing is left, the oldest fragment is
  dropped (retention = the budget). Replicas may have different budgets, hence widths.
* **Sub-epochs with error equalisation** (`rho`): a fragment closes once it holds
  ``rho * width`` items (or after ``epoch_s`` seconds, whichever first). Every fragment then
  carries the same load per counter, so its Count-Min error bound ``e * N_i / w_i`` is about
  ``e * rho`` whatever its size: a small fragment covers a short sub-epoch, a large one a long
  sub-epoch, and no fragment is the weak link of a query.
* **Query** (`estimate`): over the fragments of the time range (from any number of replicas),
  each at its own width, never folded to the smallest. Count-Min: the sum of per-fragment
  minima (never below the truth; at most ``e * sum_i N_i / w_i`` over with probability
  ``>= 1 - e^-depth``, as the min of the row sums it is below). Count Sketch: the median over
  rows of the row sums (error ``<= sqrt(3 * sum_i F2_i / w_i)`` except with the binomial
  probability of `sketch.cs_failure_probability`). A fragment that overlaps the range only in
  part counts whole: the answer reports the interval it actually covers.
* **Replicas** (`merge`): the union of fragment sets, keyed by (node, seq): commutative,
  associative and idempotent, so merging the JSON of several servers in any grouping gives the
  same answer. Fragments of all nodes must share kind, depth and seed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from vllm_ext.telemetry.hashing import keys_array
from vllm_ext.telemetry.sketch import (COUNTER_BYTES, Sketch, cm_failure_probability,
                                       cs_failure_probability, width_for)

MIN_WIDTH = 16


@dataclass
class Fragment:
    node: str
    start: float
    end: float | None  # None while it is the node's open fragment
    sketch: Sketch
    seq: int = 0  # the node's fragment number: (node, seq) names a fragment everywhere

    def overlaps(self, t0: float, t1: float, now: float) -> bool:
        end = now if self.end is None else self.end
        return self.start < t1 and end > t0 or (self.start == end and t0 <= self.start < t1)

    def to_dict(self) -> dict:
        return {"node": self.node, "seq": self.seq, "start": self.start, "end": self.end,
                "sketch": self.sketch.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Fragment":
        return cls(str(d["node"]), float(d["start"]),
                   None if d.get("end") is None else float(d["end"]),
                   Sketch.from_dict(d["sketch"]), int(d.get("seq", 0)))


@dataclass
class Estimate:
    values: np.ndarray
    bound: float              # additive error bound of every value
    failure_probability: float
    start: float | None       # interval the fragments used actually cover
    end: float | None
    fragments: int
    items: int                # N over the fragments used


@dataclass
class FragmentedSketch:
    kind: str = "cm"
    depth: int = 4
    budget_bytes: int = 65536
    fragment_bytes: int = 16384
    rho: float = 4.0
    epoch_s: float = 10.0
    seed: int = 0x5EED
    node: str = "0"
    fragments: list[Fragment] = field(default_factory=list)  # every node's, oldest first
    active: Fragment | None = None
    dropped: int = 0  # fragments expired to stay within the budget
    opened: int = 0   # fragments this node has opened (the next one's seq)

    def __post_init__(self) -> None:
        if self.budget_bytes < COUNTER_BYTES * self.depth * MIN_WIDTH:
            raise ValueError(f"telemetry budget {self.budget_bytes} B is below one fragment "
                             f"of {MIN_WIDTH} x {self.depth} counters")
        if self.rho <= 0 or self.epoch_s <= 0:
            raise ValueError("rho and epoch_s must be > 0")

    # ---- one node: feeding ---------------------------------------------------------------
    def add(self, items, counts=None, now: float | None = None) -> None:
        now = time.time() if now is None else now
        frag = self._open(now)
        keys = keys_array(items)
        if keys.size == 0:
            return
        cap = max(1, int(self.rho * frag.sketch.width))
        if counts is None and frag.sketch.items + keys.size < cap:  # fits: the common case
            frag.sketch.add(keys)
            return
        counts = np.ones(keys.size, dtype=np.int64) if counts is None else \
            np.asarray(counts, dtype=np.int64)
        while keys.size:  # split a batch at the fragment's capacity (error equalisation)
            room = cap - frag.sketch.items
            csum = np.cumsum(counts)
            take = max(1, int(np.searchsorted(csum, room, side="right")))
            frag.sketch.add(keys[:take], counts[:take])
            keys, counts = keys[take:], counts[take:]
            if frag.sketch.items >= cap:
                self.close(now)
                if keys.size:
                    frag = self._open(now)
                    cap = max(1, int(self.rho * frag.sketch.width))

    def tick(self, now: float | None = None) -> None:
        """Close the open fragment if its sub-epoch has run ``epoch_s`` seconds."""
        now = time.time() if now is None else now
        if self.active is not None and now - self.active.start >= self.epoch_s:
            self.close(self.active.start + self.epoch_s)  # it covers its sub-epoch, no more

    def _open(self, now: float) -> Fragment:
        self.tick(now)
        if self.active is None:
            width = self._free_width()
            self.active = Fragment(self.node, now, None,
                                   Sketch(self.kind, self.depth, width, self.seed), self.opened)
            self.opened += 1
        return self.active

    def _own_bytes(self) -> int:
        return sum(f.sketch.memory_bytes for f in self.fragments if f.node == self.node)

    def _free_width(self) -> int:
        cell = COUNTER_BYTES * self.depth
        while True:
            free = min(self.fragment_bytes, self.budget_bytes - self._own_bytes())
            if free >= cell * MIN_WIDTH or not self._drop_oldest():
                return width_for(max(free, cell * MIN_WIDTH), self.depth, MIN_WIDTH)

    def _drop_oldest(self) -> bool:
        for i, f in enumerate(self.fragments):
            if f.node == self.node:
                del self.fragments[i]
                self.dropped += 1
                return True
        return False

    def close(self, now: float | None = None) -> None:
        if self.active is None:
            return
        self.active.end = time.time() if now is None else now
        self.fragments.append(self.active)
        self.active = None

    def set_budget(self, budget_bytes: int) -> None:
        """A new memory budget (residual memory changed): applies from the next fragment."""
        self.budget_bytes = int(budget_bytes)
        while self._own_bytes() > self.budget_bytes and self._drop_oldest():
            pass

    # ---- queries ---------------------------------------------------------------------------
    def all_fragments(self) -> list[Fragment]:
        return self.fragments + ([self.active] if self.active is not None else [])

    @property
    def memory_bytes(self) -> int:
        return sum(f.sketch.memory_bytes for f in self.all_fragments())

    @property
    def items(self) -> int:
        return sum(f.sketch.items for f in self.all_fragments())

    def estimate(self, items, t0: float = -math.inf, t1: float = math.inf,
                 now: float | None = None, f2: float | None = None) -> Estimate:
        """Counts of `items` over [t0, t1) from every fragment (all replicas) overlapping it.
        `f2` (Count Sketch only): the range's true F2 if known; otherwise each fragment's AMS
        estimate of its own F2 goes into the bound."""
        now = time.time() if now is None else now
        keys = keys_array(items)
        used = [f for f in self.all_fragments() if f.overlaps(t0, t1, now)]
        if not used:
            return Estimate(np.zeros(keys.size), 0.0, 0.0, None, None, 0, 0)
        if self.kind == "cm":
            values = sum(f.sketch.row_values(keys).min(axis=0) for f in used)
            bound = math.e * sum(f.sketch.items / f.sketch.width for f in used)
            fail = cm_failure_probability(self.depth)
        else:
            values = np.median(sum(f.sketch.row_values(keys) for f in used), axis=0)
            if f2 is None:  # AMS estimate of each fragment's F2
                var = sum(f.sketch.f2_estimate() / f.sketch.width for f in used)
            else:  # sum_i F2_i / w_i <= F2 / min_i w_i, since sum_i F2_i <= F2
                var = f2 / min(f.sketch.width for f in used)
            bound = math.sqrt(3 * var)
            fail = cs_failure_probability(self.depth)
        return Estimate(np.asarray(values, dtype=np.float64), bound, fail,
                        min(f.start for f in used),
                        max(now if f.end is None else f.end for f in used), len(used),
                        sum(f.sketch.items for f in used))

    # ---- replicas --------------------------------------------------------------------------
    def merge(self, other: "FragmentedSketch") -> "FragmentedSketch":
        """A new collection with the fragments of both (by (node, seq); this side wins a
        duplicate). Open fragments are included as they are now."""
        if (self.kind, self.depth, self.seed) != (other.kind, other.depth, other.seed):
            raise ValueError("fragmented sketches with different kind/depth/seed cannot merge")
        seen: dict[tuple[str, int], Fragment] = {}
        for f in other.all_fragments() + self.all_fragments():
            seen[(f.node, f.seq)] = f
        # the merged collection's own fields are symmetric, so any grouping gives one result
        out = FragmentedSketch(self.kind, self.depth, max(self.budget_bytes, other.budget_bytes),
                               max(self.fragment_bytes, other.fragment_bytes),
                               max(self.rho, other.rho), max(self.epoch_s, other.epoch_s),
                               self.seed, node=min(self.node, other.node))
        out.fragments = sorted(seen.values(), key=lambda f: (f.start, f.node, f.seq))
        out.dropped = self.dropped + other.dropped
        out.opened = max(self.opened, other.opened)
        return out

    def to_dict(self) -> dict:
        return {"kind": self.kind, "depth": self.depth, "seed": self.seed, "rho": self.rho,
                "epoch_s": self.epoch_s, "budget_bytes": self.budget_bytes,
                "fragment_bytes": self.fragment_bytes, "node": self.node,
                "dropped": self.dropped, "opened": self.opened,
                "fragments": [f.to_dict() for f in self.all_fragments()]}

    @classmethod
    def from_dict(cls, d: dict) -> "FragmentedSketch":
        out = cls(d["kind"], int(d["depth"]), int(d["budget_bytes"]), int(d["fragment_bytes"]),
                  float(d["rho"]), float(d["epoch_s"]), int(d["seed"]), str(d["node"]))
        out.fragments = [Fragment.from_dict(f) for f in d["fragments"]]
        out.dropped = int(d.get("dropped", 0))
        out.opened = int(d.get("opened", len(out.fragments)))
        return out
