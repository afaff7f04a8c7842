"""Bubble-up cuckoo hashing: a fixed-capacity index key -> int slot.

Paper: W. Kuszmaul, M. Mitzenmacher, "Efficient d-ary Cuckoo Hashing at High Load Factors by
Bubbling Up" (arXiv 2501.02312). What it fixes, and we follow:
  * d = ceil(ln(1/eps) + alpha) hash choices per key support load 1 - eps (`choices_for`);
    eps is the free fraction the table is sized for (default 0.01: load up to 0.99) and alpha
    > 0 the slack over the offline bound ln(1/eps) (default 1.0);
  * expected insertion time O(1/delta) at load 1 - delta, O(1) expected positive lookups
    although a negative lookup may take d probes;
  * single-key positions (d-ary cuckoo hashing; buckets are only an extension there), so a
    "bucket" here holds one key;
  * the choices are ordered h_0, h_1, ...; phases with a growing set of choices, the newest of
    them forming a "core"; deletions by tombstones, with rebuilds.

The insertion rule (bubble-up), as implemented:
  * a new key takes the first free (empty or tombstone) position among its active choices,
    in order h_0, h_1, ...;
  * if none is free it takes a uniformly random core choice, evicting the occupant y;
  * y, evicted from its choice c, bubbles up: it takes the first free of h_{c+1}(y), ...,
    h_{k-1}(y); if none is free it evicts at a random core choice other than c; and so on
    (a random walk confined to the core), at most `max_walk` evictions, undone on failure.
This keeps the invariant: a key stored at choice i has h_0..h_{i-1} of it all non-empty
(positions never become empty: evictions replace, deletions leave tombstones). So a lookup
scans h_0, h_1, ... and stops at the key (positive: i + 1 probes) or at the first empty
position (negative: absent). Most keys sit at low choices, hence few positive probes.

Not recoverable from PAPERS.md, chosen and made parameters (reconstruction, not the paper's
text): the phase schedule (k active choices: first d_core + (d - d_core) mod d_core, then
d_core more at a time up to d; a phase with k choices ends when the load would pass
1 - exp(-(k - alpha)), so the last phase, k = d, covers load 1 - eps exactly), the core size
d_core (default max(3, ceil(3 / alpha))), and the rebuild trigger (tombstones above
`rebuild_tombstones` x capacity). Hashing is deterministic: blake2b of the key's canonical
repr, keyed by `seed`, one 64-bit value per choice; never Python's salted hash().
"""
from __future__ import annotations

import hashlib
import math
import numbers
import random
from dataclasses import dataclass
from typing import Hashable, Iterator

EMPTY = -1
TOMB = -2


class IndexFull(RuntimeError):
    """No position could be found for a new key (table at capacity or the walk gave up)."""


def choices_for(eps: float, alpha: float) -> int:
    """The paper's number of hash choices: d = ceil(ln(1/eps) + alpha)."""
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    if alpha <= 0.0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return max(1, math.ceil(math.log(1.0 / eps) + alpha))


def canonical_key(key: Hashable) -> Hashable:
    """Integers of any type (numpy, bool) become int, tuples recursively; the rest as is."""
    if isinstance(key, tuple):
        return tuple(canonical_key(k) for k in key)
    if isinstance(key, numbers.Integral):
        return int(key)
    return key


@dataclass
class CuckooStats:
    inserts: int = 0
    evictions: int = 0
    max_evictions: int = 0
    positive_lookups: int = 0
    positive_probes: int = 0
    negative_lookups: int = 0
    negative_probes: int = 0
    rebuilds: int = 0

    @property
    def mean_positive_probes(self) -> float:
        return self.positive_probes / self.positive_lookups if self.positive_lookups else 0.0

    @property
    def mean_negative_probes(self) -> float:
        return self.negative_probes / self.negative_lookups if self.negative_lookups else 0.0

    @property
    def mean_evictions(self) -> float:
        return self.evictions / self.inserts if self.inserts else 0.0


class CuckooIndex:
    """key -> int over `capacity` single-key positions, bubble-up insertion (module doc)."""

    def __init__(self, capacity: int, eps: float = 0.01, alpha: float = 1.0,
                 d_core: int | None = None, seed: int = 0, max_walk: int | None = None,
                 rebuild_tombstones: float | None = 0.25):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.eps, self.alpha = int(capacity), float(eps), float(alpha)
        self.d = choices_for(eps, alpha)
        core = d_core if d_core is not None else max(3, math.ceil(3.0 / alpha))
        if core < 3 and self.d >= 3:
            # a phase with k choices runs to load 1 - exp(-(k - alpha)); with a 2-choice
            # core that passes the 2-ary single-slot threshold (0.5): the walk cannot finish
            raise ValueError(f"d_core must be >= 3, got {d_core}")
        self.d_core = min(core, self.d)
        self.k0 = self.d if self.d <= self.d_core else (
            self.d_core + (self.d - self.d_core) % self.d_core)
        self.max_walk = max_walk if max_walk is not None else max(1000, math.ceil(100 / eps))
        self.rebuild_tombstones = rebuild_tombstones
        self._hkey = hashlib.blake2b(f"cuckoo:{seed}".encode(), digest_size=32).digest()
        self._rng = random.Random(seed)
        self.stats = CuckooStats()
        self._reset()

    # ---- state -----------------------------------------------------------------------
    def _reset(self) -> None:
        self._keys: list = [None] * self.capacity
        self._vals: list[int] = [0] * self.capacity
        self._choice: list[int] = [EMPTY] * self.capacity
        self.k, self._n, self.tombstones = self.k0, 0, 0

    def __len__(self) -> int:
        return self._n

    @property
    def load_factor(self) -> float:
        return self._n / self.capacity

    @property
    def core(self) -> range:
        """Indices of the core choices in the current phase."""
        return range(self.k - self.d_core, self.k)

    def items(self) -> Iterator[tuple[Hashable, int]]:
        for p, c in enumerate(self._choice):
            if c >= 0:
                yield self._keys[p], self._vals[p]

    def choice_counts(self) -> list[int]:
        """How many keys sit at each choice index 0..d-1 (probes of a hit = index + 1)."""
        counts = [0] * self.d
        for c in self._choice:
            if c >= 0:
                counts[c] += 1
        return counts

    def reset_stats(self) -> None:
        self.stats = CuckooStats()

    # ---- hashing ---------------------------------------------------------------------
    def positions(self, key: Hashable) -> list[int]:
        """h_0(key), ..., h_{d-1}(key): 64 bits of keyed blake2b per choice, mod capacity."""
        data = repr(canonical_key(key)).encode()
        out: list[int] = []
        for group in range(0, self.d, 8):
            n = min(8, self.d - group)
            dig = hashlib.blake2b(data, digest_size=8 * n, key=self._hkey,
                                  salt=group.to_bytes(16, "little")).digest()
            out.extend(int.from_bytes(dig[8 * i:8 * i + 8], "little") % self.capacity
                       for i in range(n))
        return out

    # ---- lookup ----------------------------------------------------------------------
    def _find(self, key: Hashable, pos: list[int]) -> tuple[int | None, int]:
        """(position or None, probes): scan active choices, stop at the key or an empty."""
        for i in range(self.k):
            p = pos[i]
            c = self._choice[p]
            if c == EMPTY:
                return None, i + 1
            if c >= 0 and self._keys[p] == key:
                return p, i + 1
        return None, self.k

    def lookup(self, key: Hashable) -> int | None:
        """The key's value or None; counts probes (positive and negative separately)."""
        key = canonical_key(key)
        p, probes = self._find(key, self.positions(key))
        if p is None:
            self.stats.negative_lookups += 1
            self.stats.negative_probes += probes
            return None
        self.stats.positive_lookups += 1
        self.stats.positive_probes += probes
        return self._vals[p]

    def __getitem__(self, key: Hashable) -> int:
        value = self.lookup(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: Hashable) -> bool:
        key = canonical_key(key)
        return self._find(key, self.positions(key))[0] is not None

    # ---- insert ----------------------------------------------------------------------
    def insert(self, key: Hashable, value: int) -> None:
        """Set key -> value (replaces an existing value); IndexFull if no room is found."""
        key = canonical_key(key)
        pos = self.positions(key)
        p, _ = self._find(key, pos)
        if p is not None:
            self._vals[p] = int(value)
            return
        if self._n >= self.capacity:
            raise IndexFull(f"cuckoo index full: {self._n}/{self.capacity} keys")
        self._advance_phase(self._n + 1)
        self._place(key, int(value), pos)
        self._n += 1

    def _advance_phase(self, n_after: int) -> None:
        while self.k < self.d and n_after > (1 - math.exp(-(self.k - self.alpha))) * self.capacity:
            self.k = min(self.d, self.k + self.d_core)

    def _first_free(self, pos: list[int], start: int) -> int | None:
        for i in range(start, self.k):
            if self._choice[pos[i]] < 0:
                return i
        return None

    def _core_choice(self, avoid: int) -> int | None:
        options = [j for j in self.core if j != avoid]
        return self._rng.choice(options) if options else None

    def _set(self, p: int, key: Hashable, value: int, choice: int) -> None:
        if self._choice[p] == TOMB:
            self.tombstones -= 1
        self._keys[p], self._vals[p], self._choice[p] = key, value, choice

    def _place(self, key: Hashable, value: int, pos: list[int]) -> None:
        """Bubble-up walk; on failure every eviction is undone and IndexFull raised."""
        undo: list[tuple[int, Hashable, int, int]] = []
        start, avoid = 0, EMPTY
        for _ in range(self.max_walk + 1):
            i = self._first_free(pos, start)
            if i is not None:
                return self._placed(pos[i], key, value, i, len(undo))
            j = self._core_choice(avoid)
            if j is None or len(undo) == self.max_walk:
                break
            p = pos[j]
            if self._choice[p] < 0:          # a free core position below `start`
                return self._placed(p, key, value, j, len(undo))
            evicted = (self._keys[p], self._vals[p], self._choice[p])
            undo.append((p, *evicted))
            self._set(p, key, value, j)
            key, value, c = evicted
            pos, start = self.positions(key), c + 1
            avoid = c if c in self.core else EMPTY
        for p, k_, v_, c_ in reversed(undo):
            self._keys[p], self._vals[p], self._choice[p] = k_, v_, c_
        raise IndexFull(f"cuckoo index: no room after {len(undo)} evictions at load "
                        f"{self.load_factor:.4f} ({self._n}/{self.capacity}, d={self.d})")

    def _placed(self, p: int, key: Hashable, value: int, choice: int, evictions: int) -> None:
        self._set(p, key, value, choice)
        self.stats.inserts += 1
        self.stats.evictions += evictions
        self.stats.max_evictions = max(self.stats.max_evictions, evictions)

    # ---- delete ----------------------------------------------------------------------
    def delete(self, key: Hashable) -> int:
        """Remove the key, return its value (KeyError if absent); leaves a tombstone."""
        key = canonical_key(key)
        p, _ = self._find(key, self.positions(key))
        if p is None:
            raise KeyError(key)
        value = self._vals[p]
        self._keys[p], self._choice[p] = None, TOMB
        self._n -= 1
        self.tombstones += 1
        if (self.rebuild_tombstones is not None
                and self.tombstones > self.rebuild_tombstones * self.capacity):
            self.rebuild()
        return value

    def pop(self, key: Hashable, default: int | None = None) -> int | None:
        try:
            return self.delete(key)
        except KeyError:
            return default

    def rebuild(self) -> None:
        """Reinsert every live key into a fresh table (clears tombstones, restarts phases)."""
        live = list(self.items())
        saved = (self._keys, self._vals, self._choice, self.k, self._n, self.tombstones)
        stats = self.stats
        self._reset()
        self.stats = CuckooStats()
        try:
            for key, value in live:
                self._advance_phase(self._n + 1)
                self._place(key, value, self.positions(key))
                self._n += 1
        except IndexFull:
            self._keys, self._vals, self._choice, self.k, self._n, self.tombstones = saved
            raise
        finally:
            stats.rebuilds += 1
            self.stats = stats
