"""Window Compact Space Saving (WCSS; Ben Basat, Einziger, Friedman, Kassner, "Heavy hitters
in streams and sliding windows", INFOCOM 2016): the sliding-window frequency summary that the
learned variant (arXiv 2409.11516, `learned`) filters. Counts over the last ``window`` items.

Rule as built here (the constants are ours; the structure is WCSS's):
* the stream is cut into frames of ``window`` items, and counts into blocks of
  ``block = ceil(window / counters)``;
* within a frame, Space Saving with ``counters`` entries counts arrivals (an unseen item takes
  the minimum entry's place with count min + 1);
* each time an item's frame count crosses a multiple of ``block`` an *overflow* (position,
  item) is queued and the item's overflow count goes up; an overflow leaves the queue (and the
  count) once its position is more than ``window`` items old;
* at a frame's end the Space Saving entries are cleared;
* estimate = ``block * overflows + (frame count mod block)``.
The error of an estimate is a few blocks: at most one block per frame boundary and per expiry
granularity, plus Space Saving's frame error (frame items / counters = one block), i.e. about
``3 * window / counters``. `memory_bytes` counts the entries actually held (Space Saving
entries 16 B: key + count + index; queued overflows 12 B; overflow counts 12 B) and
`peak_bytes` the most ever held.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

SS_ENTRY_BYTES, QUEUE_ENTRY_BYTES, COUNT_ENTRY_BYTES = 16, 12, 12


@dataclass
class WindowSpaceSaving:
    window: int = 1024
    counters: int = 64
    pos: int = 0  # items seen
    frame: dict = field(default_factory=dict)   # key -> Space Saving count in this frame
    heap: list = field(default_factory=list)    # (count, key) lazily matching `frame`
    queue: deque = field(default_factory=deque)  # (position, key) overflows in the window
    overflows: dict = field(default_factory=dict)  # key -> overflows in the window
    peak_bytes: int = 0

    def __post_init__(self) -> None:
        if self.window < 1 or self.counters < 1:
            raise ValueError("window and counters must be >= 1")
        self.block = max(1, math.ceil(self.window / self.counters))

    @property
    def memory_bytes(self) -> int:
        return (SS_ENTRY_BYTES * len(self.frame) + QUEUE_ENTRY_BYTES * len(self.queue)
                + COUNT_ENTRY_BYTES * len(self.overflows))

    def add(self, key) -> None:
        if self.pos and self.pos % self.window == 0:  # a new frame
            self.frame.clear()
            self.heap.clear()
        self.pos += 1
        self._expire()
        frame = self.frame
        old = frame.get(key)
        if old is None:
            if len(frame) >= self.counters:
                low, victim = self._pop_min()
                del frame[victim]
                old = low
            else:
                old = 0
        new = old + 1
        frame[key] = new
        heapq.heappush(self.heap, (new, key))
        if len(self.heap) > 4 * self.counters + 64:
            self.heap = [(c, k) for k, c in frame.items()]
            heapq.heapify(self.heap)
        if new // self.block > old // self.block:
            self.queue.append((self.pos, key))
            self.overflows[key] = self.overflows.get(key, 0) + 1
        self.peak_bytes = max(self.peak_bytes, self.memory_bytes)

    def skip(self) -> None:
        """An arrival that is not counted (filtered): the window still moves."""
        if self.pos and self.pos % self.window == 0:
            self.frame.clear()
            self.heap.clear()
        self.pos += 1
        self._expire()

    def _pop_min(self) -> tuple[int, object]:
        while True:
            count, key = heapq.heappop(self.heap)
            if self.frame.get(key) == count:
                return count, key

    def _expire(self) -> None:
        horizon = self.pos - self.window
        queue, overflows = self.queue, self.overflows
        while queue and queue[0][0] <= horizon:
            _, key = queue.popleft()
            left = overflows[key] - 1
            if left:
                overflows[key] = left
            else:
                del overflows[key]

    def query(self, key) -> int:
        return self.block * self.overflows.get(key, 0) + self.frame.get(key, 0) % self.block

    def error_bound(self) -> float:
        return 3.0 * self.block

    def top(self, k: int) -> list[tuple[object, int]]:
        keys = set(self.overflows) | set(self.frame)
        return sorted(((key, self.query(key)) for key in keys), key=lambda kv: -kv[1])[:k]

    def keys(self) -> set:
        return set(self.overflows) | set(self.frame)
