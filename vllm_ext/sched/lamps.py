"""LAMPS (arXiv 2410.18248): requests that pause for API calls, ranked by memory x time.

Two pure pieces, shared by the engine (`vllm_ext.sched.pauses`) and tests:

* `choose_handling`: InferCept's least-waste rule for the KV of a request paused for a call.
  Waste is memory (tokens) x time (s) that holds memory without producing tokens:
    preserve  T_call x C                       (its C context tokens sit idle through the call)
    discard   T_recompute(C) x (C + B)         (on return the re-prefill of C stalls it and
                                                the B tokens of the running batch)
    swap      2 T_swap(C) x B                  (out and back; offered only with a swap tier)
  T_call is the tool's predicted duration (per tool, learned online: `vllm_ext.tools.history`),
  T_recompute comes from the engine's measured step cost (`vllm_ext.sched.step_cost`), never
  from constants.

* `LampsPolicy`: the waiting order. A request's rank (lower first) is the memory-time it will
  hold over its remaining life: while decoding r more tokens from context C it holds
  C r + r^2 / 2 token-steps; a request that calls tools also holds, through a call, the least
  waste above (in token-steps, at the latest call's predicted duration, batch and swap tier
  cost, so a tier makes swap a candidate in the rank too). r is the TRAIL length
  prediction (`TrailPolicy.remaining`).
  Starvation guard: a request waiting `starvation_steps` decode steps since it entered the
  waiting queue (arrival, return from a call or a preemption) goes first (LAMPS's iteration
  threshold; counting from arrival instead put every request back from a call, and at load
  every request, past it: FCFS). The engine re-sorts on events (arrival, resume, predictions)
  and when a request passes the threshold, not on a fixed period.
  LAMPS orders admission; it does not preempt running requests. With admission "peak" the
  engine offers vLLM only the ranked head that fits the KV pool at its predicted peak
  (`vllm_ext.sched.admission`). With ``preempt`` (``--ext-lamps-preempt``, an extension, not
  in the paper) the ranked head may preempt a running request by the length estimator's rule
  (TRAIL's limited preemption: a shorter predicted remaining plus the victim's recompute, the
  victim early in its life, a few times per request at most).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from vllm_ext.sched.policy import Policy, RequestView

HANDLINGS = ("preserve", "discard", "swap")


@dataclass(frozen=True)
class PauseCosts:
    context_tokens: int          # C: tokens whose KV the paused request holds
    call_s: float                # predicted call duration
    recompute_s_per_token: float  # prefill seconds per recomputed token (0: unknown)
    batch_tokens: int = 0        # B: tokens held by the running batch
    swap_s_per_token: float | None = None  # one-way transfer seconds per token; None: no tier


def waste(handling: str, c: PauseCosts) -> float:
    if handling == "preserve":
        return c.call_s * c.context_tokens
    if handling == "discard":
        return c.recompute_s_per_token * c.context_tokens * (c.context_tokens + c.batch_tokens)
    if handling == "swap":
        if c.swap_s_per_token is None:
            return math.inf
        return 2 * c.swap_s_per_token * c.context_tokens * c.batch_tokens
    raise ValueError(f"unknown handling {handling!r}; known: {', '.join(HANDLINGS)}")


def choose_handling(c: PauseCosts) -> str:
    """The least-waste handling; preserve on ties (nothing to undo) and while the step cost is
    still unknown (no measurement yet: recompute can't be priced)."""
    if c.recompute_s_per_token <= 0:
        return "preserve"
    return min(HANDLINGS, key=lambda h: (waste(h, c), HANDLINGS.index(h)))


@dataclass
class LampsPolicy(Policy):
    """Memory-time ranking over a remaining-length estimator (a `TrailPolicy`)."""

    lengths: Policy | None = None       # gives remaining(view); TrailPolicy in the engine
    starvation_steps: int = 100
    admission: str = "vllm"             # "peak": by predicted peak KV (vllm_ext.sched.admission)
    preempt: bool = False               # the waiting head may preempt (the estimator's rule)
    step_s: float = 0.0                 # decode step (s), kept current by the engine
    recompute_steps_per_token: float = 0.0
    call_s: float = 1.0                 # latest call's predicted duration (engine keeps current)
    batch_tokens: int = 0               # B at the latest call (engine keeps current)
    swap_s_per_token: float | None = None  # the swap tier's cost; None: no tier (swap not offered)
    tool_users: set = field(default_factory=set)  # request ids that paused for a call
    name = "lamps"
    reorders = True

    def on_arrival(self, request_id: str, prompt_ids) -> None:
        hook = getattr(self.lengths, "on_arrival", None)
        if hook is not None:
            hook(request_id, prompt_ids)

    def observe(self, request_id: str, values: dict, generated: int) -> None:
        hook = getattr(self.lengths, "observe", None)
        if hook is not None:
            hook(request_id, values, generated)

    def forget(self, request_id: str) -> None:
        self.tool_users.discard(request_id)
        hook = getattr(self.lengths, "forget", None)
        if hook is not None:
            hook(request_id)

    def first_prediction(self, view: RequestView) -> float | None:
        return self.lengths.first_prediction(view) if self.lengths is not None else None

    def calibrate(self, step_s: float, recompute_steps_per_token: float) -> None:
        self.step_s, self.recompute_steps_per_token = step_s, recompute_steps_per_token
        if self.lengths is not None:
            self.lengths.calibrate(step_s, recompute_steps_per_token)

    def remaining(self, view: RequestView) -> float:
        left = max(1.0, view.max_tokens - view.num_output_tokens)
        r = self.lengths.remaining(view) if self.lengths is not None else math.inf
        return min(r, left)

    def memory_time(self, view: RequestView) -> float:
        """Token-steps the request will hold from now on (see the module docstring)."""
        c = view.num_prompt_tokens + view.num_output_tokens
        r = self.remaining(view)
        held = c * r + r * r / 2
        if view.request_id in self.tool_users and self.step_s > 0:
            costs = PauseCosts(int(c + r), self.call_s,
                               self.recompute_steps_per_token * self.step_s,
                               self.batch_tokens, self.swap_s_per_token)
            held += waste(choose_handling(costs), costs) / self.step_s
        return held

    def overdue_at(self, view: RequestView) -> float:
        """LAMPS counts the iterations a request has waited since it entered the queue (a
        request back from a tool call or a preemption starts again), not its age."""
        if self.step_s <= 0:
            return math.inf
        since = view.arrival_time if view.waiting_since is None else view.waiting_since
        return since + self.starvation_steps * self.step_s

    def sort_key(self, view: RequestView) -> tuple:
        if view.now >= self.overdue_at(view):
            return (view.priority, 0, view.arrival_time, view.request_id)
        return (view.priority, 1, self.memory_time(view), view.arrival_time, view.request_id)

    def choose_victim(self, candidate: RequestView,
                      running: Sequence[RequestView]) -> RequestView | None:
        if not self.preempt or self.lengths is None:
            return None
        return self.lengths.choose_victim(candidate, running)
