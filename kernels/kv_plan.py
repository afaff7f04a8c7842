"""The fast path of ``HackPlanner.plan``: same pools, same order of pool operations, same
WritePlan tensors and (stage, sink) slots as the reference loop (``HackPlanner._plan_ref``), with
less host Python per request.

Rule (HACK, arXiv 2502.03589; pools explained in ``kv_store``): the reference walks the live
requests in order and, per touched partition, drops / reuses / allocates a staging slot. This
version does the same walk, in the same order, so every dict insertion, every free-list push and
pop, and so every slot number, is the same. What it saves:

* the "busy" sets (blocks and partitions of this step, never evicted) are built only when a
  pool is full and must evict, which a step that fits in the pools never does;
* pool hits are inlined dict reads, and a decode token inside its open partition (not its
  first or last token: the common step) takes a short branch with no partition loop;
* the plan's columns are flat lists, packed by ``array`` and wrapped by ``torch.frombuffer``
  (no tuple transposes; ``torch.tensor`` on a list of ints costs ~3x more).

``tests/test_hack_kernels.py::test_fast_planner_matches_reference`` drives both through random
mixed steps (prefill chunks, decode, block reuse, evictions, closes, sinks) and compares.
"""
from __future__ import annotations

from array import array

import torch

from vllm_ext.kernels.quant import SINK_TOKENS


def _busy(planner, qsl: list[int], seq_lens: list[int], rows: list[list[int]]):
    """The reference's (busy_blocks, busy_pids before the walk)."""
    Pi, bs, ppb = planner.layout.partition, planner.block_size, planner.parts_per_block
    blocks, pids = set(), set()
    for i in range(len(seq_lens)):
        n = qsl[i + 1] - qsl[i]
        if n <= 0:
            continue
        blocks.add(rows[i][0])
        start = seq_lens[i] - n
        if start % Pi:
            tok = (start // Pi) * Pi
            pids.add(rows[i][tok // bs] * ppb + (tok % bs) // Pi)
    return blocks, pids


def plan_fast(planner, qsl: list[int], seq_lens: list[int], block_table: torch.Tensor):
    """``HackPlanner.plan`` (``planner.step`` is advanced here); returns the same triple."""
    from vllm_ext.kernels.kv_store import WritePlan

    planner.step += 1
    step = planner.step
    Pi, bs, ppb = planner.layout.partition, planner.block_size, planner.parts_per_block
    R = len(seq_lens)
    nblk = max([(L + bs - 1) // bs for L in seq_lens] + [1])
    rows = block_table[:R, :nblk].tolist()
    stage, sinks, fill, early = planner.stage, planner.sinks, planner.fill, planner.sealed_early
    st_slot, st_last, st_free = stage.slot, stage.last, stage.free
    sk_slot, sk_last, sk_free = sinks.slot, sinks.last, sinks.free
    ev_slot, ev_pid, ev_fill, ev_first = [], [], [], []
    t_pid, t_prev, t_reopen, t_first, t_sink = [], [], [], [], []
    k_idx, k_off, k_cnt = [], [], []
    close, o_idx, o_slot, s_tok, s_slot, s_off = [], [], [], [], [], []
    req_stage, req_sink = [-1] * R, [-1] * R
    busy = None  # (blocks, pids), built on the first eviction only
    for i in range(R):
        q0 = qsl[i]
        n = qsl[i + 1] - q0
        if n <= 0:
            continue
        L, row = seq_lens[i], rows[i]
        start, block0 = L - n, row[0]
        sink = -1
        if n == 1 and start >= SINK_TOKENS:          # decode token inside its open partition
            off = start % Pi
            base = start - off
            pid = row[base // bs] * ppb + (base % bs) // Pi
            if off and off != Pi - 1 and pid in st_slot:
                if block0 in sk_slot:
                    sink = sk_slot[block0]
                    sk_last[block0] = step
                slot = st_slot[pid]
                st_last[pid] = step
                idx = len(t_pid)
                t_pid.append(pid)
                t_prev.append(slot)
                t_reopen.append(0)
                t_first.append(1 if base == 0 else 0)
                t_sink.append(-1)
                k_idx.append(idx)
                k_off.append(off)
                k_cnt.append(1)
                fill[pid] = (off + 1, base == 0)
                o_idx.append(idx)
                o_slot.append(slot)
                req_stage[i] = slot
                if L >= Pi and sink >= 0:
                    req_sink[i] = sink
                continue
        if start < SINK_TOKENS:
            if start == 0 and block0 in sk_slot:      # sinks.drop
                sk_free.append(sk_slot.pop(block0))
                sk_last.pop(block0)
            if block0 in sk_slot:
                sink = sk_slot[block0]
                sk_last[block0] = step
            else:
                if not sk_free and busy is None:
                    busy = _busy(planner, qsl, seq_lens, rows)
                sink, _ = sinks.get(block0, step, busy[0] if busy else ())
            for pos in range(start, min(L, SINK_TOKENS)):
                s_tok.append(q0 + pos - start)
                s_slot.append(sink)
                s_off.append(pos)
        elif block0 in sk_slot:
            sink = sk_slot[block0]
            sk_last[block0] = step
        for p in range(start // Pi, (L - 1) // Pi + 1):
            base = p * Pi
            pid = row[base // bs] * ppb + (base % bs) // Pi
            lo = start if start > base else base
            hi = L if L < base + Pi else base + Pi
            prev = -1
            reopen = 0
            if lo == base:                           # fresh partition: forget stale state
                if pid in st_slot:
                    st_free.append(st_slot.pop(pid))
                    st_last.pop(pid)
                fill.pop(pid, None)
                early.pop(pid, None)
            elif pid in st_slot:
                prev = st_slot[pid]
            else:                                    # sealed early: restore its tokens
                reopen = early.pop(pid, (lo - base, p == 0))[0]
            idx = len(t_pid)
            t_pid.append(pid)
            t_prev.append(prev)
            t_reopen.append(reopen)
            t_first.append(1 if p == 0 else 0)
            t_sink.append(sink if p == 0 and reopen else -1)
            k_idx.append(idx)
            k_off.append(lo - base)
            k_cnt.append(hi - lo)
            if hi == base + Pi:
                close.append(idx)
                if pid in st_slot:
                    st_free.append(st_slot.pop(pid))
                    st_last.pop(pid)
                fill.pop(pid, None)
                continue
            if pid in st_slot:
                slot = st_slot[pid]
                st_last[pid] = step
            else:
                bp = ()
                if not st_free:
                    if busy is None:
                        busy = _busy(planner, qsl, seq_lens, rows)
                    bp = busy[1].union(t_pid)
                slot, victim = stage.get(pid, step, bp)
                if victim is not None:
                    vf = fill.pop(victim)
                    ev_slot.append(slot)
                    ev_pid.append(victim)
                    ev_fill.append(vf[0])
                    ev_first.append(1 if vf[1] else 0)
                    early[victim] = vf
            fill[pid] = (hi - base, p == 0)
            o_idx.append(idx)
            o_slot.append(slot)
            req_stage[i] = slot
        if L >= Pi and sink >= 0:
            req_sink[i] = sink
    single = len(k_idx) == sum(k_cnt)
    cols = [ev_slot, ev_pid, ev_fill, ev_first, t_pid, t_prev, t_reopen, t_first, t_sink,
            k_idx if single else [], k_off if single else [], close, o_idx, o_slot,
            s_tok, s_slot, s_off]
    buf = array("q", [x for c in cols for x in c])
    flat = torch.frombuffer(buf, dtype=torch.long) if buf else torch.zeros(0, dtype=torch.long)
    fields = list(flat.split_with_sizes([len(c) for c in cols]))
    if not single:
        i, o, c = (torch.tensor(x, dtype=torch.long) for x in (k_idx, k_off, k_cnt))
        fields[9] = torch.repeat_interleave(i, c)
        first = c.cumsum(0) - c
        fields[10] = torch.arange(fields[9].numel()) - torch.repeat_interleave(first - o, c)
    return WritePlan(*fields), req_stage, req_sink
