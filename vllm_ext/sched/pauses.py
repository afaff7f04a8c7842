"""Scheduler side of a request paused for a tool call (LAMPS, arXiv 2410.18248).

The pause itself is vLLM 0.32's streaming-input session: a resumable request whose turn ends
(at the ``</call>`` stop token the tool loop sets, `vllm_ext.tools.loop`) waits in
``WAITING_FOR_STREAMING_REQ``, and vLLM keeps its KV blocks and its request slot until the next
input chunk (the tool result) arrives. That is "preserve". This module adds "discard": when the
tool loop's notice (``ext_tool_pause``: the tool and its predicted duration) reaches the
scheduler, the request's blocks go back to the pool and its slot is released; when the result
arrives the request re-prefills its whole context (blocks still in the prefix cache are reused,
as vLLM's prefix caching does for any request). "swap" (with the swap tier on:
`vllm_ext.swap.connector`) first hands the request's full blocks to the tier, then frees them
like a discard; on resume the tier loads what the prefix cache no longer holds. A tier that is
off or failing turns swap into discard (logged once). "min_waste" picks per call with
`vllm_ext.sched.lamps.choose_handling` at the engine's measured step cost and, with the tier,
its measured transfer cost.

What a resume really recomputes is measured when the request is scheduled again
(`after_schedule`): its context at the pause minus the tokens vLLM found computed (local
prefix-cache hit + tier load).

vLLM counts paused sessions in ``num_waiting_for_streaming_input`` (they hold a slot) and
decrements it when a session resumes or is aborted; a discarded session has given its slot
back, so `resumed` and `finishing` restore the count just before vLLM decrements it.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from vllm_ext.sched.lamps import PauseCosts, choose_handling
from vllm_ext.sched.preempt_swap import count_returns, save_or_reason
from vllm_ext.tools.loop import SESSION_KEY

logger = logging.getLogger("vllm_ext.swap")


def extra_args(request) -> dict:
    """A vLLM request's ``sampling_params.extra_args`` (``vllm_xargs``), {} if none."""
    params = getattr(request, "sampling_params", None)
    return (params.extra_args if params is not None else None) or {}


@dataclass
class Pause:
    tool: str
    predicted_s: float
    handling: str
    since: float
    context_tokens: int


@dataclass
class ToolPauses:
    sessions: dict[str, str] = field(default_factory=dict)   # session tag -> request id
    paused: dict[str, Pause] = field(default_factory=dict)   # request id -> its current pause
    discarded: set[str] = field(default_factory=set)         # paused with KV freed
    counts: Counter = field(default_factory=Counter)         # pauses by handling
    pause_seconds: float = 0.0
    recompute_tokens: int = 0     # context tokens re-prefilled after a discard / swap
    reused_tokens: int = 0        # ... found computed instead (prefix cache + swap tier)
    swap_fallbacks: int = 0       # swap asked, discard done (tier off or failing)
    resuming: dict[str, int] = field(default_factory=dict)   # request id -> context at pause
    fallback_logged: bool = False

    def on_add(self, request) -> None:
        extra = extra_args(request)
        session = extra.get(SESSION_KEY)
        if isinstance(session, str):
            self.sessions[session] = request.request_id

    def pause(self, sched, session: str, tool: str, predicted_s: float, configured: str) -> dict:
        """Apply the handling for `session`'s call; returns what was done (for the caller)."""
        from vllm.v1.request import RequestStatus

        req_id = self.sessions.get(session)
        request = sched.requests.get(req_id) if req_id else None
        if request is None or request.status != RequestStatus.WAITING_FOR_STREAMING_REQ:
            return {"handling": None, "reason": "not paused"}
        tier = _tier(sched)
        costs = pause_costs(sched, request.num_computed_tokens, predicted_s, tier)
        handling = choose_handling(costs) if configured == "min_waste" else configured
        if handling == "swap" and not self._swap_out(sched, tier, request):
            handling = "discard"
        if handling in ("discard", "swap"):
            sched.kv_cache_manager.free(request)
            sched.num_waiting_for_streaming_input -= 1  # its slot is free too
            self.discarded.add(req_id)
        self.paused[req_id] = Pause(tool, predicted_s, handling, time.monotonic(),
                                    request.num_computed_tokens)
        self.counts[handling] += 1
        return {"handling": handling, "context_tokens": request.num_computed_tokens}

    def resumed(self, sched, request) -> bool:
        """Before vLLM applies the next input to `request`: True if it was discarded (the
        caller then recomputes it from scratch after the update)."""
        pause = self.paused.pop(request.request_id, None)
        if pause is not None:
            self.pause_seconds += time.monotonic() - pause.since
        if request.request_id not in self.discarded:
            return False
        self.discarded.discard(request.request_id)
        sched.num_waiting_for_streaming_input += 1  # vLLM decrements it for the resume
        self.resuming[request.request_id] = request.num_computed_tokens
        return True

    def after_schedule(self, output) -> None:
        """A resumed discarded / swapped request is scheduled: count what it recomputes."""
        if not self.resuming:
            return
        reused, recomputed = count_returns(self.resuming, output)
        self.reused_tokens += reused
        self.recompute_tokens += recomputed

    def _swap_out(self, sched, tier, request) -> bool:
        """Hand the request's blocks to the tier; False (-> discard, logged once) if it can't."""
        held, why = save_or_reason(tier, sched, request)
        if held:
            return True
        self.swap_fallbacks += 1
        if not self.fallback_logged:  # counted in swap_fallbacks after the first
            logger.warning("vllm-ext: swap handling falls back to discard: %s", why)
            self.fallback_logged = True
        return False

    def finishing(self, sched, request_ids) -> None:
        """Before vLLM's finish_requests: re-count discarded paused sessions it will
        decrement (an abort while paused)."""
        from vllm.v1.request import RequestStatus

        for req_id in list(request_ids):
            request = sched.requests.get(req_id)
            if (req_id in self.discarded and request is not None
                    and request.status == RequestStatus.WAITING_FOR_STREAMING_REQ):
                self.discarded.discard(req_id)
                sched.num_waiting_for_streaming_input += 1

    def forget(self, request) -> None:
        self.paused.pop(request.request_id, None)
        self.discarded.discard(request.request_id)
        self.resuming.pop(request.request_id, None)
        extra = extra_args(request)
        self.sessions.pop(extra.get(SESSION_KEY), None)

    def sizes(self) -> dict[str, int]:
        return {"tool_sessions": len(self.sessions), "tool_paused": len(self.paused),
                "tool_discarded": len(self.discarded), "tool_resuming": len(self.resuming)}

    def to_dict(self) -> dict:
        return {"pauses": dict(self.counts), "pause_seconds": self.pause_seconds,
                "recompute_tokens": self.recompute_tokens, "reused_tokens": self.reused_tokens,
                "swap_fallbacks": self.swap_fallbacks}


def pause_costs(sched, context_tokens: int, seconds: float, tier) -> PauseCosts:
    """The least-waste rule's inputs now: `context_tokens` idle for `seconds`, the engine's
    measured recompute cost and running batch, and the tier's swap cost (None: no tier)."""
    batch = len(sched.running)
    step = sched.ext_step_cost
    return PauseCosts(context_tokens, seconds, step.steps_per_token(batch) * step.step_s(batch),
                      sum(r.num_computed_tokens for r in sched.running),
                      tier.swap_s_per_token() if tier is not None else None)


def _tier(sched):
    """The scheduler's swap tier connector (vllm_ext.swap.connector) when it is on, else None."""
    connector = getattr(sched, "connector", None)
    if connector is None or type(connector).__name__ != "SwapConnector":
        return None
    return connector
