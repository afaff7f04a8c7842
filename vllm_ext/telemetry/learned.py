"""Learned sliding-window frequency estimation: LWCSS, "Learning-Augmented Frequency
Estimation in Sliding Windows" (Shahout, Sabek, Mitzenmacher; arXiv 2409.11516).

Rule: a next-arrival predictor says, for each arriving item, whether it will arrive again
within the window; items predicted not to recur are *filtered* (not counted by the WCSS
summary, `wcss`), which frees its counters for the items that matter. The paper's guard
against mispredictions: filtered items go into a Bloom filter, and an item predicted
non-recurring that the filter has already seen (in this frame or the previous one) is
counted after all, so any item loses at most two arrivals per window (paper: a
``(W, eps - 2/W)``-accurate summary becomes ``(W, eps)``-accurate).

The paper's predictor is an RNN over the items' features, treated as a black box. Here it is
a small hashed-feature logistic regression (`NextArrivalPredictor`: ``2^bits`` float32
weights over hashed features, e.g. the item's id and, for prompts, tenant and length bucket),
learned online from recent history: a sample of arrivals (1 in ``sample_every``, drawn by a
hash of the position so periodic streams do not alias) waits in a
bounded buffer until it is labelled - recurred within the label horizon (1) or expired (0) -
and each label is one SGD step. The horizon is ``min(window, label_horizon)``: a negative label
takes a whole horizon to arrive and holds a buffer slot meanwhile, so with a 32768-arrival
window the predictor got too few labels to leave its warm-up (measured, docs/telemetry.md);
predicting "no recurrence within 4096" filters some items that do recur later in the window,
which the Bloom guard then counts from their second arrival (the same two-undercount bound).
Every byte of predictor, buffer and Bloom filters is counted in
`memory_bytes`, next to the WCSS entries.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from vllm_ext.telemetry.hashing import MASK64, key_of, mix64
from vllm_ext.telemetry.wcss import WindowSpaceSaving

BUFFER_ENTRY_BYTES = 32  # key, position, up to 4 hashed feature indices


def _mix(x: int) -> int:
    return mix64(x & MASK64)


@dataclass
class BloomFilter:
    bits: int = 8192
    hashes: int = 3

    def __post_init__(self) -> None:
        self.array = bytearray((self.bits + 7) // 8)

    def _positions(self, key: int) -> list[int]:
        h = _mix(key)
        a, b = h & 0xFFFFFFFF, (h >> 32) | 1
        return [(a + i * b) % self.bits for i in range(self.hashes)]

    def add(self, key: int) -> None:
        for p in self._positions(key):
            self.array[p >> 3] |= 1 << (p & 7)

    def __contains__(self, key: int) -> bool:
        return all(self.array[p >> 3] & (1 << (p & 7)) for p in self._positions(key))

    def clear(self) -> None:
        self.array = bytearray(len(self.array))

    @property
    def memory_bytes(self) -> int:
        return len(self.array)


@dataclass
class NextArrivalPredictor:
    window: int = 1024
    bits: int = 10
    lr: float = 0.2
    sample_every: int = 4
    buffer_size: int = 256
    weights: list = field(default=None, repr=False)
    bias: float = 0.0
    labels: int = 0
    positives: int = 0

    def __post_init__(self) -> None:
        if self.weights is None:  # float32 each (counted so; a list here for speed)
            self.weights = [0.0] * (1 << self.bits)
        self.pending: OrderedDict[int, tuple[int, list[int]]] = OrderedDict()

    def features(self, key: int, extra=()) -> list[int]:
        mask = (1 << self.bits) - 1
        return [_mix(key) & mask] + [_mix(key_of(f) ^ 0x5A5A) & mask for f in extra]

    def probability(self, feats: list[int]) -> float:
        w = self.weights
        z = self.bias + sum(w[f] for f in feats)
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))

    def _learn(self, feats: list[int], label: int) -> None:
        grad = label - self.probability(feats)
        for f in feats:
            self.weights[f] += self.lr * grad
        self.bias += self.lr * grad * 0.1
        self.labels += 1
        self.positives += label

    def observe(self, key: int, feats: list[int], pos: int) -> None:
        """Label what this arrival resolves, expire old samples, maybe sample this one."""
        pending = self.pending
        hit = pending.pop(key, None)
        if hit is not None:
            self._learn(hit[1], 1 if pos - hit[0] <= self.window else 0)
        while pending:
            first_key, (first_pos, first_feats) = next(iter(pending.items()))
            if pos - first_pos <= self.window:
                break
            pending.popitem(last=False)
            self._learn(first_feats, 0)
        if _mix(pos) % self.sample_every == 0 and len(pending) < self.buffer_size:
            pending[key] = (pos, feats)

    @property
    def memory_bytes(self) -> int:
        return 4 * len(self.weights) + BUFFER_ENTRY_BYTES * self.buffer_size


@dataclass
class LearnedWindow:
    """WCSS behind a learned next-arrival filter with the two-frame Bloom guard."""
    window: int = 1024
    counters: int = 64
    threshold: float = 0.5   # filter when P(recur within the window) < this
    bloom_bits: int = 2048
    predictor_bits: int = 8
    buffer_size: int = 64    # sampled arrivals awaiting their label
    sample_every: int = 8
    warmup: int = 64         # labels before the predictor may filter anything
    label_horizon: int = 4096  # predict recurrence within min(window, this) arrivals
    filtered: int = 0
    guarded: int = 0

    def __post_init__(self) -> None:
        self.wcss = WindowSpaceSaving(self.window, self.counters)
        self.predictor = NextArrivalPredictor(min(self.window, self.label_horizon),
                                              self.predictor_bits,
                                              sample_every=self.sample_every,
                                              buffer_size=self.buffer_size)
        self.blooms = (BloomFilter(self.bloom_bits), BloomFilter(self.bloom_bits))
        self.peak_bytes = 0

    @property
    def pos(self) -> int:
        return self.wcss.pos

    def add(self, item, extra=()) -> bool:
        """Count `item` (True) or filter it (False). `extra`: more features (tenant, ...)."""
        key = key_of(item)
        pos = self.wcss.pos + 1
        if self.wcss.pos and self.wcss.pos % self.window == 0:  # frame boundary: rotate
            current, previous = self.blooms
            previous.clear()
            self.blooms = (previous, current)
        feats = self.predictor.features(key, extra)
        self.predictor.observe(key, feats, pos)
        keep = self.predictor.labels < self.warmup or \
            self.predictor.probability(feats) >= self.threshold
        if not keep:
            if key in self.blooms[0] or key in self.blooms[1]:
                keep = True  # seen in this or the previous frame: it does recur
                self.guarded += 1
            else:
                self.blooms[0].add(key)
                self.filtered += 1
        if keep:
            self.wcss.add(key)
        else:
            self.wcss.skip()
        self.peak_bytes = max(self.peak_bytes, self.memory_bytes)
        return keep

    def query(self, item) -> int:
        return self.wcss.query(key_of(item))

    def top(self, k: int):
        return self.wcss.top(k)

    def error_bound(self) -> float:
        return self.wcss.error_bound() + 2

    @property
    def memory_bytes(self) -> int:
        return (self.wcss.memory_bytes + self.predictor.memory_bytes
                + sum(b.memory_bytes for b in self.blooms))
