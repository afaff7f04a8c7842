"""Scheduler side of a request paused for a tool call (LAMPS, arXiv 2410.18248).

The pause itself is vLLM 0.32's streaming-input session: a resumable request whose turn ends
(at the ``</call>`` stop token the tool loop sets, `vllm_ext.tools.loop`) waits in
``WAITING_FOR_STREAMING_REQ``, and vLLM keeps its KV blocks and its request slot until the next
input chunk (the tool result) arrives. That is "preserve". This module adds "discard": when the
tool loop's notice (``ext_tool_pause``: the tool and its predicted duration) reaches the
scheduler, the request's blocks go back to the pool and its slot is released; when the result
arrives the request re-prefills its whole context (blocks still in the prefix cache are reused,
as vLLM's prefix caching does for any request). "min_waste" picks per call with
`vllm_ext.sched.lamps.choose_handling` at the engine's measured step cost.

vLLM counts paused sessions in ``num_waiting_for_streaming_input`` (they hold a slot) and
decrements it when a session resumes or is aborted; a discarded session has given its slot
back, so `resumed` and `finishing` restore the count just before vLLM decrements it.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from vllm_ext.sched.lamps import PauseCosts, choose_handling
from vllm_ext.tools.loop import SESSION_KEY


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
    recompute_tokens: int = 0

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
        batch_tokens = sum(r.num_computed_tokens for r in sched.running)
        step = sched.ext_step_cost
        batch = len(sched.running)
        costs = PauseCosts(request.num_computed_tokens, predicted_s,
                           step.steps_per_token(batch) * step.step_s(batch), batch_tokens)
        handling = choose_handling(costs) if configured == "min_waste" else configured
        if handling == "discard":
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
        self.recompute_tokens += request.num_computed_tokens
        return True

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
        extra = extra_args(request)
        self.sessions.pop(extra.get(SESSION_KEY), None)

    def sizes(self) -> dict[str, int]:
        return {"tool_sessions": len(self.sessions), "tool_paused": len(self.paused),
                "tool_discarded": len(self.discarded)}

    def to_dict(self) -> dict:
        return {"pauses": dict(self.counts), "pause_seconds": self.pause_seconds,
                "recompute_tokens": self.recompute_tokens}
