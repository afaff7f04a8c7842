"""The paged HACK KV cache: sealed partition records in vLLM's pages, 16-bit open partitions
and sink tokens beside them, and the per-step write plan that moves tokens between the two.

Paper: HACK (arXiv 2502.03589). Rules implemented here:

* Requantization elimination: K is quantized per channel over a partition of Π tokens, so a
  partition is quantized once, when its last token arrives ("sealed"). Until then its K and V
  stay in 16-bit in a staging pool (one slot per open partition; a sequence has at most one).
* Sink tokens: the first ``SINK_TOKENS`` tokens of a sequence are kept in 16-bit (a pool keyed by
  the sequence's first physical block) and left out of the K ranges of partition 0.

Bookkeeping (``HackPlanner``, one per attention group, run once per step on the host; Python work
O(requests + touched partitions), the per-token indices are built vectorised) keys the
pools by physical partition id ``block * (block_size // Π) + j``. A write at offset 0 of a
partition starts it afresh, which is what makes stale entries of freed blocks harmless. If the
pool is full, the least recently used open partition that is not part of this step is sealed
early with the tokens it has, and restored from its record when its sequence writes again.
Sinks evicted the same way fall back to their (clamped) codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_ext.kernels.quant import SINK_TOKENS, HackLayout, dequantize_records, encode_records


@dataclass
class HackCache:
    """One layer's cache as the attention code sees it."""

    layout: HackLayout
    block_size: int
    pages: torch.Tensor   # uint8 [num_blocks, H, block_size // Π, record_bytes]
    stage: torch.Tensor   # 16-bit [stage_slots, H, Π, 2 * D]: open partitions, K then V
    sinks: torch.Tensor   # 16-bit [sink_slots, H, SINK_TOKENS, 2 * D]

    @staticmethod
    def page_view(kv_cache: torch.Tensor, layout: HackLayout, block_size: int) -> torch.Tensor:
        """vLLM's ``[num_blocks, H, block_size, C]`` page (any dtype) as records."""
        nb, h = kv_cache.shape[:2]
        return kv_cache.view(torch.uint8).view(nb, h, block_size // layout.partition,
                                               layout.record_bytes)

    @classmethod
    def allocate(cls, layout: HackLayout, num_blocks: int, num_kv_heads: int, block_size: int,
                 stage_slots: int, sink_slots: int, dtype=torch.bfloat16, device="cpu"):
        P, D = layout.partition, layout.head_size
        pages = torch.zeros(num_blocks, num_kv_heads, block_size // P, layout.record_bytes,
                            dtype=torch.uint8, device=device)
        return cls(layout, block_size, pages,
                   torch.zeros(stage_slots, num_kv_heads, P, 2 * D, dtype=dtype, device=device),
                   torch.zeros(sink_slots, num_kv_heads, SINK_TOKENS, 2 * D, dtype=dtype,
                               device=device))


@dataclass
class HackBatch:
    """Per-request read metadata (all int32 tensors on the cache's device)."""

    query_start_loc: torch.Tensor  # [R + 1]
    seq_lens: torch.Tensor         # [R] tokens in the cache after this step's writes
    block_table: torch.Tensor      # [R, max_blocks]
    stage_slot: torch.Tensor       # [R] staging slot of the open partition, -1 if none
    sink_slot: torch.Tensor        # [R] sink slot (only once partition 0 is sealed), else -1
    max_query_len: int

    def to(self, device) -> "HackBatch":
        f = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return HackBatch(**f)


@dataclass
class WritePlan:
    """What one step writes; all int64 on the host (views of one tensor; moved by
    ``apply_writes_ref``)."""

    evict_slot: torch.Tensor    # [E] staging slots sealed early ...
    evict_pid: torch.Tensor     # [E] ... into these partitions
    evict_fill: torch.Tensor    # [E] tokens they hold
    evict_first: torch.Tensor   # [E] 1: a sequence's partition 0 (sinks left out of K ranges)
    touch_pid: torch.Tensor     # [T] partitions written this step
    touch_prev: torch.Tensor    # [T] staging slot with their earlier tokens, -1 if none
    touch_reopen: torch.Tensor  # [T] tokens to restore from an early-sealed record (0 if none)
    touch_first: torch.Tensor   # [T] 0/1
    touch_sink: torch.Tensor    # [T] sink slot to restore positions < SINK from, -1 if none
    tok_touch: torch.Tensor     # [n_tok] touched index of each new token
    tok_off: torch.Tensor       # [n_tok] its offset in the partition
    close_idx: torch.Tensor     # [C] touched partitions that are full now: sealed
    open_idx: torch.Tensor      # [O] touched partitions still open ...
    open_slot: torch.Tensor     # [O] ... and their staging slots
    sink_tok: torch.Tensor      # [S] new tokens at positions < SINK ...
    sink_slot: torch.Tensor     # [S] ... their sink slots ...
    sink_off: torch.Tensor      # [S] ... and positions


class _LruPool:
    """Slots keyed by an int, least recently used first out."""

    def __init__(self, size: int):
        self.size, self.slot, self.last = size, {}, {}
        self.free = list(range(size - 1, -1, -1))

    def drop(self, key: int) -> None:
        if key in self.slot:
            self.free.append(self.slot.pop(key))
            self.last.pop(key)

    def get(self, key: int, step: int, busy: set) -> tuple[int, int | None]:
        """(slot, evicted key or None); allocates, evicting the LRU key not in ``busy``."""
        if key in self.slot:
            self.last[key] = step
            return self.slot[key], None
        victim = None
        if not self.free:
            idle = [k for k in self.slot if k not in busy]
            if not idle:
                raise RuntimeError(f"HACK staging pool exhausted ({self.size} slots)")
            victim = min(idle, key=self.last.__getitem__)
            self.free.append(self.slot.pop(victim))
            self.last.pop(victim)
        self.slot[key], self.last[key] = self.free.pop(), step
        return self.slot[key], victim


class HackPlanner:
    """Host-side bookkeeping of the staging and sink pools; one ``plan`` per step.

    ``plan`` runs ``kv_plan.plan_fast`` (same outputs and pool state, less Python per request);
    ``reference=True`` runs the reference loop ``_plan_ref`` instead (tests, A/B timing)."""

    def __init__(self, layout: HackLayout, block_size: int, stage_slots: int, sink_slots: int,
                 reference: bool = False):
        self.layout, self.block_size, self.reference = layout, block_size, reference
        self.parts_per_block = block_size // layout.partition
        self.stage, self.sinks = _LruPool(stage_slots), _LruPool(sink_slots)
        self.fill: dict[int, tuple[int, bool]] = {}     # open pid -> (tokens, is partition 0)
        self.sealed_early: dict[int, tuple[int, bool]] = {}
        self.step = 0

    def _pid(self, row: list[int], p: int) -> int:
        tok = p * self.layout.partition
        return row[tok // self.block_size] * self.parts_per_block + \
            (tok % self.block_size) // self.layout.partition

    def plan(self, query_start_loc: list[int], seq_lens: list[int],
             block_table: torch.Tensor) -> tuple[WritePlan, list[int], list[int]]:
        """Returns the write plan and each request's (stage slot, sink slot) for reading."""
        if self.reference:
            return self._plan_ref(query_start_loc, seq_lens, block_table)
        from vllm_ext.kernels.kv_plan import plan_fast

        return plan_fast(self, query_start_loc, seq_lens, block_table)

    def _plan_ref(self, query_start_loc: list[int], seq_lens: list[int],
                  block_table: torch.Tensor) -> tuple[WritePlan, list[int], list[int]]:
        """The reference loop (the oracle of ``kv_plan.plan_fast``)."""
        self.step += 1
        Pi, R = self.layout.partition, len(seq_lens)
        nblk = max([(L + self.block_size - 1) // self.block_size for L in seq_lens] + [1])
        rows = block_table[:R, :nblk].tolist()
        ev, touch, toks, close, opened, sink_w = [], [], [], [], [], []
        req_stage, req_sink = [-1] * R, [-1] * R
        live = [i for i in range(R) if query_start_loc[i + 1] > query_start_loc[i]]
        starts = {i: seq_lens[i] - query_start_loc[i + 1] + query_start_loc[i] for i in live}
        busy_blocks = {rows[i][0] for i in live}       # never evicted in favour of this step's
        busy_pids = {self._pid(rows[i], starts[i] // Pi) for i in live if starts[i] % Pi}
        for i in live:
            L, start, row = seq_lens[i], starts[i], rows[i]
            block0 = row[0]
            if start == 0:
                self.sinks.drop(block0)
            sink = -1
            if start < SINK_TOKENS:
                sink, _ = self.sinks.get(block0, self.step, busy_blocks)
                for pos in range(start, min(L, SINK_TOKENS)):
                    sink_w.append((query_start_loc[i] + pos - start, sink, pos))
            elif block0 in self.sinks.slot:
                sink, _ = self.sinks.get(block0, self.step, busy_blocks)
            for p in range(start // Pi, (L - 1) // Pi + 1):
                pid, lo, hi = self._pid(row, p), max(start, p * Pi), min(L, (p + 1) * Pi)
                busy_pids.add(pid)
                prev, reopen = -1, 0
                if lo == p * Pi:                       # fresh partition: forget stale state
                    self.stage.drop(pid)
                    self.fill.pop(pid, None)
                    self.sealed_early.pop(pid, None)
                elif pid in self.stage.slot:
                    prev = self.stage.slot[pid]
                else:                                  # sealed early: restore its tokens
                    reopen = self.sealed_early.pop(pid, (lo - p * Pi, p == 0))[0]
                idx = len(touch)
                touch.append((pid, prev, reopen, p == 0, sink if p == 0 and reopen else -1))
                toks.append((idx, lo - p * Pi, hi - lo))     # a run of new tokens
                if hi == (p + 1) * Pi:
                    close.append(idx)
                    self.stage.drop(pid)
                    self.fill.pop(pid, None)
                else:
                    slot, victim = self.stage.get(pid, self.step, busy_pids)
                    if victim is not None:
                        fill, first = self.fill.pop(victim)
                        ev.append((slot, victim, fill, first))  # sealed before reuse
                        self.sealed_early[victim] = (fill, first)
                    self.fill[pid] = (hi - p * Pi, p == 0)
                    opened.append((idx, slot))
                    req_stage[i] = slot
            if L >= Pi and sink >= 0:
                req_sink[i] = sink
        return _plan_tensors(ev, touch, toks, close, opened, sink_w), req_stage, req_sink


def _transpose(items: list[tuple], n: int) -> list[list[int]]:
    return [list(c) for c in zip(*items)] if items else [[] for _ in range(n)]


def _plan_tensors(ev, touch, toks, close, opened, sink_w) -> WritePlan:
    """One int64 tensor for the whole plan, split into the WritePlan fields (contiguous views);
    per-token indices expanded from the runs (vectorised; a decode step's runs are its tokens)."""
    idx, off0, count = _transpose(toks, 3)
    single = len(idx) == sum(count)
    cols = _transpose(ev, 4) + _transpose(touch, 5) + \
        ([idx, off0] if single else [[], []]) + [close] + _transpose(opened, 2) + \
        _transpose(sink_w, 3)
    flat = torch.tensor([x for c in cols for x in c], dtype=torch.long)
    fields = list(flat.split([len(c) for c in cols]))
    if not single:
        i, o, n = (torch.tensor(c, dtype=torch.long) for c in (idx, off0, count))
        fields[9] = torch.repeat_interleave(i, n)
        start = n.cumsum(0) - n
        fields[10] = torch.arange(fields[9].numel()) - torch.repeat_interleave(start - o, n)
    return WritePlan(*fields)


def _k_valid(layout: HackLayout, fill: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """[N, Π] tokens that set a partition's K ranges: written ones, sinks left out."""
    t = torch.arange(layout.partition, device=fill.device)[None, :]
    return (t < fill[:, None]) & ~(first[:, None] & (t < SINK_TOKENS))


def _seal(cache: HackCache, pid: torch.Tensor, x: torch.Tensor, valid: torch.Tensor) -> None:
    D, ppb = cache.layout.head_size, cache.pages.shape[2]
    rec = encode_records(cache.layout, x[..., :D], x[..., D:], valid)
    cache.pages[pid // ppb, :, pid % ppb] = rec


def apply_writes(cache: HackCache, plan: WritePlan, key: torch.Tensor,
                 value: torch.Tensor) -> None:
    """Write one step's new tokens (``key/value [num_tokens, H, D]``) into ``cache``: in place by
    the CPU extension (``cpu_kernel.write_cpu``) when it is available, else ``apply_writes_ref``."""
    from vllm_ext.kernels import cpu_kernel

    if not cpu_kernel.write_cpu(cache, plan, key, value):
        apply_writes_ref(cache, plan, key, value)


def apply_writes_ref(cache: HackCache, plan: WritePlan, key: torch.Tensor,
                     value: torch.Tensor) -> None:
    """Torch write path (the oracle of the C++ one): gather the touched partitions into a 16-bit
    scratch, add the new tokens, seal the full ones, scatter the open ones back."""
    dev, L, Pi = cache.pages.device, cache.layout, cache.layout.partition
    p = WritePlan(**{k: v.to(dev) for k, v in vars(plan).items()})
    if p.evict_slot.numel():
        _seal(cache, p.evict_pid, cache.stage[p.evict_slot],
              _k_valid(L, p.evict_fill, p.evict_first.bool()))
    T = p.touch_pid.numel()
    if T == 0:
        return
    H, D = cache.stage.shape[1], L.head_size
    scratch = torch.zeros(T, H, Pi, 2 * D, dtype=cache.stage.dtype, device=dev)
    cont = (p.touch_prev >= 0).nonzero().flatten()
    scratch[cont] = cache.stage[p.touch_prev[cont]]
    reo = (p.touch_reopen > 0).nonzero().flatten()
    if reo.numel():
        pid, ppb = p.touch_pid[reo], cache.pages.shape[2]
        k, v = dequantize_records(L, cache.pages[pid // ppb, :, pid % ppb])
        scratch[reo] = torch.cat([k, v], -1).to(scratch.dtype)
        with_sink = reo[p.touch_sink[reo] >= 0]
        scratch[with_sink, :, :SINK_TOKENS] = cache.sinks[p.touch_sink[with_sink]]
    n = p.tok_touch.numel()
    kv = torch.cat([key[:n], value[:n]], -1).to(scratch.dtype)
    scratch[p.tok_touch, :, p.tok_off] = kv
    if p.close_idx.numel():
        full = torch.full_like(p.close_idx, Pi)
        _seal(cache, p.touch_pid[p.close_idx], scratch[p.close_idx],
              _k_valid(L, full, p.touch_first[p.close_idx].bool()))
    cache.stage[p.open_slot] = scratch[p.open_idx]
    if p.sink_tok.numel():
        cache.sinks[p.sink_slot, :, p.sink_off] = kv[p.sink_tok]


def prefill_cache(layout: HackLayout, ks: list[torch.Tensor], vs: list[torch.Tensor],
                  block_size: int = 128, dtype=torch.bfloat16):
    """Write whole sequences (``k, v [L_i, H, D]``) into a fresh cache in one step, as a
    prefill would; returns ``(cache, batch)`` with every sequence's tokens as queries."""
    n_blk = [(k.shape[0] + block_size - 1) // block_size for k in ks]
    table = torch.zeros(len(ks), max(n_blk), dtype=torch.int32)
    for i, n in enumerate(n_blk):
        table[i, :n] = torch.arange(1, n + 1) + sum(n_blk[:i])
    slots = len(ks) + 1
    cache = HackCache.allocate(layout, sum(n_blk) + 1, ks[0].shape[1], block_size, slots, slots,
                               dtype, ks[0].device)
    lens = [k.shape[0] for k in ks]
    qsl = [0] + torch.tensor(lens).cumsum(0).tolist()
    plan, stage, sink = HackPlanner(layout, block_size, slots, slots).plan(qsl, lens, table)
    apply_writes(cache, plan, torch.cat(ks).to(dtype), torch.cat(vs).to(dtype))
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=ks[0].device)  # noqa: E731
    batch = HackBatch(i32(qsl), i32(lens), table.to(ks[0].device), i32(stage), i32(sink),
                      max(lens))
    return cache, batch
