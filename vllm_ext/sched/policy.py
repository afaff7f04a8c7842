"""Pure scheduling policies: no vLLM imports, shared by the engine adapter and the simulator.

A policy sees `RequestView`s (plain snapshots of a request) and answers two questions:
  * `sort_key(view)`: the order of `running` and `waiting` (lower runs first; in `running` the
    last entry is the one vLLM preempts when KV blocks run out);
  * `choose_victim(candidate, running)`: whether the best waiting request should preempt a
    running one now, and which.
A policy with `reorders = False` is never consulted for order, so vLLM's own FCFS path runs
untouched (this is how `fcfs` reproduces stock vLLM exactly). SRPT policies honour vLLM's
request ``priority`` first (lower value first, strict levels: a waiting request preempts only
a lower-priority or equal-priority-and-longer one), and their own order within a level.

Policies here:
  * `fcfs`   - vLLM's first-come-first-served, unchanged.
  * `oracle` - SRPT on the true remaining output length, which the client passes per request in
               ``vllm_xargs: {"ext_true_output_len": N}`` (a benchmark upper bound, not a
               predictor). Preempts a running request when the waiting head's remaining length
               plus a margin is below the victim's, at most `max_preemptions_per_request` times
               per victim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

TRUE_LEN_KEY = "ext_true_output_len"


@dataclass(frozen=True)
class RequestView:
    request_id: str
    arrival_time: float
    num_prompt_tokens: int
    num_output_tokens: int
    max_tokens: int
    num_preemptions: int = 0
    true_output_len: int | None = None
    predictions: dict[str, float] = field(default_factory=dict)
    now: float = 0.0  # the clock arrival_time is on (engine: time.time(); simulator: its own)
    priority: int = 0  # vLLM's request priority: lower runs first, before any policy order
    # when it entered the waiting queue in its present state (arrival, preemption, a tool
    # pause's end); None outside the waiting queue and where unknown (simulator)
    waiting_since: float | None = None

    @property
    def true_remaining(self) -> float:
        if self.true_output_len is None:
            return math.inf
        return max(0, self.true_output_len - self.num_output_tokens)


class Policy:
    """Base policy: FCFS order, never preempts on its own."""

    name = "base"
    reorders = False

    def sort_key(self, view: RequestView) -> tuple:
        return (view.arrival_time, view.request_id)

    def choose_victim(
        self, candidate: RequestView, running: Sequence[RequestView]
    ) -> RequestView | None:
        return None

    def first_prediction(self, view: RequestView) -> float | None:
        """The request's first predicted total output length (None: the policy predicts
        none); compared with the actual length at finish for `/metrics`."""
        return None

    def calibrate(self, step_s: float, recompute_steps_per_token: float) -> None:
        """The engine's (or simulator's) step cost now: seconds per decode step and decode
        steps per recomputed token. Policies that read neither ignore it."""


class FcfsPolicy(Policy):
    name = "fcfs"


@dataclass
class SrptPolicy(Policy):
    """SRPT on `remaining(view)` with margin-guarded, capped preemption."""

    margin: float = 0.0
    max_preemptions_per_request: int = 4
    # cost-aware preemption: decode steps one recomputed victim token costs, kept current by
    # the engine (`vllm_ext.sched.step_cost`); 0 = margin-only rule
    recompute_steps_per_token: float = 0.0
    charges_recompute: ClassVar[bool] = False  # TRAIL/SPJF: the engine keeps the cost current
    name = "srpt"
    reorders = True

    def remaining(self, view: RequestView) -> float:
        raise NotImplementedError

    def sort_key(self, view: RequestView) -> tuple:
        return (view.priority, self.remaining(view), view.arrival_time, view.request_id)

    def preemptible(self, view: RequestView) -> bool:
        return view.num_preemptions < self.max_preemptions_per_request

    def choose_victim(
        self, candidate: RequestView, running: Sequence[RequestView]
    ) -> RequestView | None:
        pool = [r for r in running if self.preemptible(r)]
        if not pool:
            return None
        victim = max(pool, key=self.sort_key)
        if candidate.priority != victim.priority:  # priority levels are strict
            return victim if candidate.priority < victim.priority else None
        if (self.remaining(candidate) + self.margin + self.recompute_cost(victim)
                < self.remaining(victim)):
            return victim
        return None

    def calibrate(self, step_s: float, recompute_steps_per_token: float) -> None:
        if self.charges_recompute:
            self.recompute_steps_per_token = recompute_steps_per_token

    def recompute_cost(self, victim: RequestView) -> float:
        """Decode steps the victim's re-prefill (prompt + tokens generated so far) costs."""
        return self.recompute_steps_per_token * (victim.num_prompt_tokens
                                                 + victim.num_output_tokens)


class OraclePolicy(SrptPolicy):
    name = "oracle"

    def first_prediction(self, view: RequestView) -> float | None:
        return view.true_output_len

    def remaining(self, view: RequestView) -> float:
        return view.true_remaining


def make_policy(name: str, margin: float = 0.0, max_preemptions_per_request: int = 4) -> Policy:
    if name == "fcfs":
        return FcfsPolicy()
    if name == "oracle":
        return OraclePolicy(margin=margin, max_preemptions_per_request=max_preemptions_per_request)
    raise ValueError(f"unknown policy {name!r}")
