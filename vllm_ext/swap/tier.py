"""Scheduler-side bookkeeping of the KV swap tier (LAMPS Swap, arXiv 2410.18248). Pure: no vLLM.

The tier is a disk prefix cache keyed by vLLM's block hashes (`Request.block_hashes`: a hash
of the block's tokens chained with its parent's, so a key names a block's content *and* its
whole prefix). The scheduler decides everything; the workers only execute what each step's
metadata lists, in this order: deletes, saves, loads.

  * `swap_out(keys, block_ids)`: a request paused under "swap" hands over its full computed
    blocks. Keys already stored are only refreshed (LRU); new ones are queued as saves of those
    block ids. The caller frees the blocks right after: the worker copies them to host memory
    at the start of the next step (KVConnectorBase_V1.handle_preemptions, before that step's
    forward can overwrite a reallocated block), and writes them to disk off the step.
  * `match(keys, start)`: how many blocks from block index `start` on are stored, in a row
    (what `get_num_new_matched_tokens` reports beyond the local prefix-cache hit). A key whose
    save is still queued counts: the worker saves before it loads within a step.
  * `plan_load(keys, block_ids)`: after vLLM allocated the blocks, load them there.
  * capacity: `capacity` blocks; the least recently used key is evicted (a delete is queued,
    or its queued save dropped). Keys the worker failed to save or load are forgotten
    (`forget`); a tier the worker reports broken is disabled (`enabled = False`) and every
    later swap is a discard.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Sequence


@dataclass
class SwapPlan:
    """One step's work for the workers (the metadata's payload)."""
    deletes: list = field(default_factory=list)              # keys
    saves: list = field(default_factory=list)                # (key, block_id)
    loads: list = field(default_factory=list)                # (key, block_id)
    reset: bool = False                                      # drop everything first

    def __bool__(self) -> bool:
        return bool(self.deletes or self.saves or self.loads or self.reset)


@dataclass
class TierCounters:
    swap_outs: int = 0           # swap_out calls that queued or refreshed at least one block
    blocks_saved: int = 0        # save jobs sent to the workers
    blocks_reused: int = 0       # swap_out blocks already stored (no I/O)
    blocks_loaded: int = 0       # blocks loaded (sent to the workers, minus failed loads)
    tokens_loaded: int = 0
    tokens_failed: int = 0       # tokens of failed loads (vLLM recomputed them)
    evictions: int = 0
    save_failures: int = 0       # reported by the workers
    load_failures: int = 0
    resets: int = 0
    # measured by the workers: seconds and bytes of completed saves / loads
    save_s: float = 0.0
    save_bytes: int = 0
    load_s: float = 0.0
    load_bytes: int = 0

    def to_dict(self) -> dict:
        return dict(vars(self))


class SwapIndex:
    def __init__(self, capacity: int, block_size: int, block_bytes: int = 0):
        if capacity < 1 or block_size < 1:
            raise ValueError("capacity and block_size must be >= 1")
        self.capacity, self.block_size, self.block_bytes = capacity, block_size, block_bytes
        self.enabled = True
        self.disabled_reason = ""
        self._stored: OrderedDict[Hashable, None] = OrderedDict()   # LRU first
        self._plan = SwapPlan()
        self._queued: dict[Hashable, int] = {}                      # key -> its save's index
        self.counters = TierCounters()

    # ---- queries ----------------------------------------------------------------------
    def __contains__(self, key: Hashable) -> bool:
        return key in self._stored

    def __len__(self) -> int:
        return len(self._stored)

    def has_pending(self) -> bool:
        """Work queued for the next step (the engine must step to carry it)."""
        return bool(self._plan)

    def match(self, keys: Sequence[Hashable], start: int, limit: int | None = None) -> int:
        """Blocks stored in a row from index `start` of `keys` (at most `limit` blocks)."""
        if not self.enabled:
            return 0
        end = len(keys) if limit is None else min(len(keys), start + max(0, limit))
        n = 0
        for i in range(start, end):
            if keys[i] not in self._stored:
                break
            n += 1
        return n

    # ---- scheduler events ------------------------------------------------------------
    def swap_out(self, keys: Sequence[Hashable], block_ids: Sequence[int]) -> int:
        """Queue the saves of (key, block) pairs not stored yet; returns the blocks held
        afterwards (new + already stored), 0 if the tier is off."""
        if not self.enabled or not keys:
            return 0
        held = 0
        for key, block_id in zip(keys, block_ids):
            if key in self._stored:
                self._stored.move_to_end(key)
                self.counters.blocks_reused += 1
                held += 1
                continue
            if len(self._stored) >= self.capacity:
                self._evict_one()
            self._stored[key] = None
            self._queued[key] = len(self._plan.saves)
            self._plan.saves.append((key, int(block_id)))
            self.counters.blocks_saved += 1
            held += 1
        if held:
            self.counters.swap_outs += 1
        return held

    def plan_load(self, keys: Sequence[Hashable], block_ids: Sequence[int]) -> int:
        """Load stored `keys` into the freshly allocated `block_ids`; returns blocks planned."""
        n = 0
        for key, block_id in zip(keys, block_ids):
            if key not in self._stored:
                break  # only a contiguous run is a valid hit (match() said so just before)
            self._stored.move_to_end(key)
            self._plan.loads.append((key, int(block_id)))
            n += 1
        self.counters.blocks_loaded += n
        self.counters.tokens_loaded += n * self.block_size
        return n

    def take_plan(self) -> SwapPlan:
        plan, self._plan, self._queued = self._plan, SwapPlan(), {}
        return plan

    def forget(self, keys, *, failed: str = "") -> None:
        """Drop keys (a worker failed to save or load them: they must not be matched again)."""
        for key in keys:
            self._stored.pop(key, None)
        c = self.counters
        if failed == "save":
            c.save_failures += len(keys)
        elif failed == "load":
            c.load_failures += len(keys)
            c.blocks_loaded -= len(keys)
            c.tokens_loaded -= len(keys) * self.block_size
            c.tokens_failed += len(keys) * self.block_size

    def reset(self) -> None:
        """Forget every key (the prefix-cache reset of a benchmark block); workers drop theirs."""
        self._stored.clear()
        self._plan = SwapPlan(reset=True)
        self._queued = {}
        self.counters.resets += 1

    def disable(self, reason: str) -> None:
        self.enabled, self.disabled_reason = False, reason
        self._stored.clear()
        self._plan = SwapPlan(reset=True)
        self._queued = {}

    def observe(self, save_s: float, save_bytes: int, load_s: float, load_bytes: int) -> None:
        c = self.counters
        c.save_s += save_s
        c.save_bytes += save_bytes
        c.load_s += load_s
        c.load_bytes += load_bytes

    # ---- cost estimate (lamps.PauseCosts.swap_s_per_token) ----------------------------
    def s_per_token(self, prior_mb_s: float | None = None) -> float | None:
        """One-way transfer seconds per token: measured (mean of save and load throughput of
        completed transfers) once there is one of each, else from `prior_mb_s` (the disk
        profile), else None (swap is not offered)."""
        if not self.enabled or self.block_bytes <= 0:
            return None
        c = self.counters
        rates = [b / s for b, s in ((c.save_bytes, c.save_s), (c.load_bytes, c.load_s))
                 if b > 0 and s > 0]
        if len(rates) == 2:
            bytes_per_s = 2 / (1 / rates[0] + 1 / rates[1])  # harmonic mean: out + back
        elif prior_mb_s:
            bytes_per_s = prior_mb_s * 1e6
        else:
            return None
        return self.block_bytes / self.block_size / bytes_per_s

    def to_dict(self) -> dict:
        return {"enabled": self.enabled, "disabled_reason": self.disabled_reason,
                "capacity_blocks": self.capacity, "stored_blocks": len(self._stored),
                "block_size": self.block_size, "block_bytes": self.block_bytes,
                **self.counters.to_dict()}

    # ---- internals --------------------------------------------------------------------
    def _evict_one(self) -> None:
        key, _ = self._stored.popitem(last=False)
        self.counters.evictions += 1
        i = self._queued.pop(key, None)
        if i is not None:  # saved and evicted before any step carried it: drop the save
            self._plan.saves[i] = None
            self.counters.blocks_saved -= 1
            self._plan.saves = [s for s in self._plan.saves if s is not None]
            self._queued = {k: j for j, (k, _) in enumerate(self._plan.saves)}
        else:
            self._plan.deletes.append(key)
