"""A finished turn's KV kept for its session's next turn (LAMPS, arXiv 2410.18248, applied to
client-side tool round trips: ``--ext-session-keep off|lamps|preserve|swap``).

A client that runs its own tools sends each turn as a new request with the same
``session_id`` (vLLM's OpenAI field, ``X-Session-Id`` header or ``vllm_xargs``); the next
turn's prompt starts with this turn's prompt and output, so vLLM's prefix cache gives back the
full blocks nobody evicted in between. Under KV pressure they are evicted first. At a turn's
finish the same least-waste rule as a server-side pause (`vllm_ext.sched.lamps.choose_handling`)
picks, with T_call = the predicted gap until the follow-up arrives:
  preserve  its full blocks are pinned (one extra reference: not evictable) until the
            follow-up is scheduled, or ``keep_factor`` x the predicted gap has passed;
  swap      they go to the swap tier (`SwapConnector.save_request`); the follow-up loads them;
  discard   vLLM's way (freed; the prefix cache may still hit).
``preserve`` / ``swap`` force one handling (baselines); ``off`` (default) changes nothing.
The gap is the request's ``ext_followup_s`` hint (vllm_xargs) if given, else a running mean
of the gaps observed (finish -> the session's next arrival); with neither, discard.
A turn that ends at a stop string (the usual end of a client tool turn, ``stop: ["</call>"]``)
reaches the scheduler as an abort: vLLM 0.32's detokenizer finds the string and the engine
aborts the request (`EngineCore.abort_requests`: "client-aborted vs stop criteria met" is not
passed on). So an aborted turn whose sampling params carry stop strings is kept like a
finished one; other aborts (a client that went away) are not.
A pin never stalls the engine: when nothing runs and the head of the waiting queue does not
fit in the free blocks, pins are released, soonest deadline first (while requests run, their
finishes free blocks; a pin's cost to the batch is the memory x time the rule priced). Every follow-up's return is measured like
a preemption's (`count_returns`): context found computed vs re-prefilled, on ``/metrics``.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from vllm_ext.sched.lamps import choose_handling
from vllm_ext.sched.pauses import extra_args, pause_costs
from vllm_ext.sched.preempt_swap import count_returns, save_or_reason

logger = logging.getLogger("vllm_ext.swap")
FOLLOWUP_KEY = "ext_followup_s"   # vllm_xargs: the client's expected gap to its next turn (s)
FINISHED = ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED")


def _turn_ended(request) -> bool:
    """Finished, or aborted at a stop string (see the module docstring)."""
    status = getattr(request.status, "name", "")
    if status in FINISHED:
        return True
    return status == "FINISHED_ABORTED" and bool(getattr(request.sampling_params, "stop", None))


@dataclass
class Pin:
    blocks: list          # KVCacheBlocks holding one extra reference each
    until: float          # monotonic deadline


@dataclass
class SessionKeeps:
    keep_factor: float = 2.0      # a pin lasts this many predicted gaps at most
    max_sessions: int = 4096      # finished turns remembered for the gap (oldest dropped)
    pins: dict[str, Pin] = field(default_factory=dict)                  # session -> pin
    finished: OrderedDict = field(default_factory=OrderedDict)  # session -> (t, context)
    followups: dict[str, int] = field(default_factory=dict)     # req id -> previous context
    followup_session: dict[str, str] = field(default_factory=dict)     # req id -> session
    gap_s: float | None = None    # running mean of observed gaps
    gaps_seen: int = 0
    counts: Counter = field(default_factory=Counter)
    recompute_tokens: int = 0
    reused_tokens: int = 0

    def on_finish(self, sched, request, mode: str, tier) -> None:
        """Before vLLM frees a finished turn's blocks (its `_free_request`)."""
        session = getattr(request, "session_id", None)
        if mode == "off" or not session or not _turn_ended(request):
            return                            # an aborted turn has no follow-up to wait for
        now, context = time.monotonic(), request.num_computed_tokens
        self.finished.pop(session, None)
        self.finished[session] = (now, context)
        while len(self.finished) > self.max_sessions:
            self.finished.popitem(last=False)
        gap = extra_args(request).get(FOLLOWUP_KEY, self.gap_s)
        handling = mode if mode != "lamps" else self._least_waste(sched, tier, context, gap)
        self.release(sched, session)          # an older pin of the same session
        if handling == "swap" and not save_or_reason(tier, sched, request)[0]:
            handling = "discard"
        if handling == "preserve":
            handling = self._pin(sched, request, session, now, gap)
        self.counts[handling] += 1

    def _least_waste(self, sched, tier, context: int, gap) -> str:
        if gap is None:
            return "discard"                  # nothing to price the keep with yet
        return choose_handling(pause_costs(sched, context, float(gap), tier))

    def _pin(self, sched, request, session: str, now: float, gap) -> str:
        (blocks,) = sched.kv_cache_manager.get_blocks(request.request_id).blocks[:1]
        full = [b for b in blocks if b.block_hash is not None and not b.is_null]
        if not full:
            return "discard"
        sched.kv_cache_manager.block_pool.touch(full)
        until = now + self.keep_factor * float(gap) if gap is not None else float("inf")
        self.pins[session] = Pin(full, until)
        return "preserve"

    def on_arrival(self, sched, request) -> None:
        """A new request: if it continues a remembered session, learn the gap."""
        session = getattr(request, "session_id", None)
        seen = self.finished.pop(session, None) if session else None
        if seen is None:
            return
        finished_at, context = seen
        gap = time.monotonic() - finished_at
        self.gaps_seen += 1
        self.gap_s = gap if self.gap_s is None else self.gap_s + (gap - self.gap_s) / min(
            self.gaps_seen, 32)
        self.followups[request.request_id] = context
        self.followup_session[request.request_id] = session
        self.counts["followups"] += 1

    def before_schedule(self, sched) -> None:
        """Expired pins go; with nothing running, pins give way to a waiting head that does
        not fit (no stall)."""
        if not self.pins:
            return
        now = time.monotonic()
        for session in [s for s, p in self.pins.items() if p.until <= now]:
            self.release(sched, session)
            self.counts["expired"] += 1
        if self.pins and sched.waiting and not sched.running:
            head = sched.waiting.peek_request()
            own = self.followup_session.get(head.request_id)   # its own pin serves it
            need = -(-head.num_tokens // sched.block_size) + 1 - (
                len(self.pins[own].blocks) if own in self.pins else 0)
            pool = sched.kv_cache_manager.block_pool
            for session in sorted(self.pins, key=lambda s: self.pins[s].until):
                if pool.get_num_free_blocks() >= need:
                    break
                if session == own:
                    continue
                self.release(sched, session)
                self.counts["released_for_room"] += 1

    def after_schedule(self, sched, output) -> None:
        """Follow-ups scheduled in `output`: count what they reused, then drop their pin (the
        prefix match has taken its own references by now)."""
        if not self.followups:
            return
        started = [n.req_id for n in output.scheduled_new_reqs if n.req_id in self.followups]
        reused, recomputed = count_returns(self.followups, output)
        self.reused_tokens += reused
        self.recompute_tokens += recomputed
        for req_id in started:
            self.release(sched, self.followup_session.pop(req_id, None))

    def release(self, sched, session) -> None:
        pin = self.pins.pop(session, None)
        if pin is not None:
            sched.kv_cache_manager.block_pool.free_blocks(reversed(pin.blocks))

    def reset(self, sched) -> None:
        """Keeping turned off: every pin released, nothing per request or session left."""
        for session in list(self.pins):
            self.release(sched, session)
        self.finished.clear()
        self.followups.clear()
        self.followup_session.clear()

    def forget(self, sched, req_id: str) -> None:
        self.followups.pop(req_id, None)
        self.followup_session.pop(req_id, None)

    def sizes(self) -> dict:
        return {"session_followups": len(self.followups),
                "session_followup_ids": len(self.followup_session)}

    def to_dict(self) -> dict:
        return {**{k: self.counts[k] for k in ("preserve", "discard", "swap", "followups",
                                               "expired", "released_for_room")},
                "pinned_blocks": sum(len(p.blocks) for p in self.pins.values()),
                "gap_s": self.gap_s, "recompute_tokens": self.recompute_tokens,
                "reused_tokens": self.reused_tokens}
