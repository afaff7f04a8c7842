"""HRRN, highest response ratio next (Brinch Hansen 1971; SGLang's ``--schedule-policy hrrn``).

Rule (policy ``hrrn``): at time t a request's response ratio is

    R = (wait + service) / service = 1 + wait / service,

with ``wait = t - arrival_time`` (its time in the system so far) and ``service`` = its
predicted remaining output tokens x the engine's decode step (``step_s``). Highest R first;
vLLM's request ``priority`` comes before it (lower value first, strict levels); ties (equal R,
e.g. requests that have not waited yet) go to the shorter predicted service, then arrival.
A new request starts at R = 1 and a waiting one's R grows without bound at slope 1 / service,
so short requests go first (SJF) but a long one is not starved: it overtakes a fresh short
request once wait_long / service_long > wait_short / service_short. (A request preempted by
vLLM for KV blocks keeps its arrival time, so its time served counts as waited and it resumes
early.) SGLang's HRRN ranks by prefill work instead (service = uncached prompt tokens, wait =
prefill tokens processed since arrival); here service is the predicted decode, which is most
of a request's time on the testbed and in reasoning workloads.

``step_s`` is one engine-wide value, so it cancels in the order (R_i > R_j iff
wait_i / remaining_i > wait_j / remaining_j): the order needs no measured step cost, and
`ratio` reports R itself once the engine has calibrated the step.

Prediction: any estimator with ``remaining(view)`` (tokens). The engine gives the length
probe's prompt-only model counted down per generated token (``spjf``'s estimate, a
`vllm_ext.sched.trail.TrailPolicy` with ``refine=False``); the simulator gives noisy or
recorded predictions, or the true length. The estimate is capped by what ``max_tokens``
leaves, which also serves as the service of a request the estimator knows nothing about
(inf), so every request ages. The estimator's per-request hooks (``on_arrival``,
``observe``, ``forget``, ``first_prediction``) are passed through, and its per-request
tables are shared by reference, so the engine's state report counts them.

Preemption: none. SGLang's HRRN orders the waiting queue only; here too `choose_victim` never
names a victim: a request admitted runs to its end (a higher-priority arrival waits for a
free slot, ahead of every lower-priority waiting request). vLLM's own KV-pressure preemption
takes the last running request, which in this order is the lowest priority level, then the
lowest ratio.

Clock: by default (``refresh_s = 0``) keys read the exact clock and expire at once
(`overdue_at`, the engine adapter's "this key holds until" hook, shared with TRAIL's
starvation bound), so the engine re-keys and re-sorts its queues at every step while requests
are present, as SGLang re-sorts at every schedule call. That costs about 8 us per waiting
request per step on this CPU (2 ms at 256 waiting), where the other policies' keys are cached.
``refresh_s > 0`` trades exactness for that cost: keys read the clock rounded up to the next
multiple of ``refresh_s`` and hold until it, so all cached keys share one clock and the queues
are re-sorted once per tick; every wait is then over-estimated by at most ``refresh_s``, which
favours short requests (a long request's promotion comes up to service_long / service_short x
refresh_s later).
Pure python: the engine adapter and the simulator use the same objects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vllm_ext.sched.policy import Policy, RequestView


@dataclass
class HrrnPolicy(Policy):
    estimator: Any = None          # has remaining(view) -> predicted remaining tokens
    refresh_s: float = 0.0         # key clock tick (s); 0 = exact, re-keyed every step
    step_s: float = 0.0            # decode step (s), kept current by the engine; for `ratio`
    name = "hrrn"
    reorders = True

    def __post_init__(self) -> None:
        for key, value in getattr(self.estimator, "__dict__", {}).items():
            if isinstance(value, dict) and key not in vars(self):
                setattr(self, key, value)  # the estimator's per-request tables, same objects

    # ---- the rule ----------------------------------------------------------------------------
    def clock(self, view: RequestView) -> float:
        """The key clock: now, or the next tick strictly after it."""
        if self.refresh_s <= 0:
            return view.now
        tick = (math.floor(view.now / self.refresh_s) + 1) * self.refresh_s
        return tick if tick > view.now else tick + self.refresh_s

    def wait(self, view: RequestView) -> float:
        return max(0.0, self.clock(view) - view.arrival_time)

    def service_tokens(self, view: RequestView) -> float:
        """Predicted remaining tokens, capped by what ``max_tokens`` leaves, at least 1."""
        left = max(1.0, view.max_tokens - view.num_output_tokens)
        predicted = self.estimator.remaining(view) if self.estimator is not None else math.inf
        return max(1.0, min(predicted, left))

    def ratio(self, view: RequestView) -> float:
        """R = (wait + service) / service on the key clock; nan before the step is measured."""
        if self.step_s <= 0:
            return math.nan
        service = self.service_tokens(view) * self.step_s
        return (self.wait(view) + service) / service

    def sort_key(self, view: RequestView) -> tuple:
        service = self.service_tokens(view)
        return (view.priority, -self.wait(view) / service, service, view.arrival_time,
                view.request_id)

    def overdue_at(self, view: RequestView) -> float:
        """When this request's key stops holding: the tick its clock reads, or at once."""
        if self.refresh_s <= 0:
            return math.nextafter(view.now, math.inf)
        return self.clock(view)

    # choose_victim: Policy's (never preempts)

    def calibrate(self, step_s: float, recompute_steps_per_token: float) -> None:
        self.step_s = step_s
        self._pass("calibrate", step_s, recompute_steps_per_token)

    # ---- the estimator's per-request hooks -------------------------------------------------
    def on_arrival(self, request_id: str, prompt_ids) -> None:
        self._pass("on_arrival", request_id, prompt_ids)

    def observe(self, request_id: str, values: dict, generated: int) -> None:
        self._pass("observe", request_id, values, generated)

    def forget(self, request_id: str) -> None:
        self._pass("forget", request_id)

    def first_prediction(self, view: RequestView) -> float | None:
        return self._pass("first_prediction", view)

    def _pass(self, hook: str, *args):
        fn = getattr(self.estimator, hook, None)
        return fn(*args) if fn is not None else None
