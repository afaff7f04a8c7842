"""`PredictiveScheduler`: vLLM's V1 scheduler with ordering and preemption delegated to a policy.

Loaded with ``--scheduler-cls vllm_ext.sched.scheduler.PredictiveScheduler``. Like vLLM's own
default it is an `AsyncScheduler` when the engine runs async scheduling (the default, on CPU
too) and a plain `Scheduler` otherwise: a custom class that only subclasses `Scheduler`
silently loses async scheduling (measured: ~1.2x mean latency on the CPU engine). Before a
``Scheduler.schedule()`` call that follows an event (arrival, new predictions, a change of the
running set; see ``schedule``) it
  1. sorts ``running`` by the policy key (vLLM schedules in that order and, when KV blocks run
     out, preempts the last entry, i.e. the one the policy likes least);
  2. lets the best waiting request preempt one running request the policy names (budgeted per
     step; vLLM itself never preempts for admission);
  3. sorts ``waiting`` by the policy key.
Then vLLM's own ``schedule()`` runs unchanged. Policies with ``reorders = False`` (``fcfs``)
skip all three, so the stock FCFS behaviour is reproduced exactly.

Predictions from the ProbeWorker arrive as ``ModelRunnerOutput.probe_values`` and are kept per
request for the policy. A policy error is logged once and the scheduler falls back to FCFS.
Per-request state (predictions, sort keys, the policy's trackers) is dropped in
``_free_request``, which vLLM calls for every finished and aborted request.

Live configuration, state and counters (the ``ext_*`` methods) are `vllm_ext.sched.admin`.
For trail/spjf the recompute of a victim is charged against a preemption at the step cost
measured here (`vllm_ext.sched.step_cost`).
"""
from __future__ import annotations

import math
import time

from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import FCFSRequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from vllm_ext.compat import changed_targets
from vllm_ext.config import ExtConfig
from vllm_ext.sched.admin import AdminMixin
from vllm_ext.sched.admission import hold_back, restore
from vllm_ext.sched.build import build_policy
from vllm_ext.sched.pauses import ToolPauses, extra_args
from vllm_ext.sched.preempt_swap import PreemptReturns
from vllm_ext.sched.policy import TRUE_LEN_KEY, FcfsPolicy, RequestView
from vllm_ext.sched.sessions import SessionKeeps
from vllm_ext.sched.stats import SchedStats
from vllm_ext.sched.step_cost import StepCostFit
from vllm_ext.swap.connector import tier_of
from vllm_ext.telemetry.engine import SchedulerTelemetry

logger = init_logger(__name__)

_SCHED = "vllm.v1.core.sched.scheduler:Scheduler."
# the private Scheduler methods this module calls or overrides (vllm_ext.compat.fingerprint);
# tests/test_live_config.py fails if vLLM changes them: re-read, then re-record
VLLM_TARGETS: dict[str, tuple[str, str]] = {
    _SCHED + "_preempt_request": (
        "(self, request: vllm.v1.request.Request, timestamp: float, drop_stale_output: bool = "
        "False) -> None", "979be013f1f2b30c"),
    _SCHED + "_free_request": (
        "(self, request: vllm.v1.request.Request, delay_free_blocks: bool = False) -> "
        "tuple[dict[str, typing.Any] | None, dict[str, typing.Any] | None]", "024636560a9c7436"),
    _SCHED + "_request_blocks_can_be_freed": (
        "(self, request: vllm.v1.request.Request) -> bool", "9e0d143c4da5adfa"),
    # tool pauses (vllm_ext.sched.pauses) ride on vLLM's streaming-input sessions
    _SCHED + "_update_request_as_session": (
        "(self, session: vllm.v1.request.Request, update: vllm.v1.request.StreamingUpdate) -> "
        "None", "6ee14a2db5d6fdfe"),
    _SCHED + "_handle_stopped_request": (
        "(self, request: vllm.v1.request.Request) -> bool", "88c413835d8fefc0"),
    _SCHED + "finish_requests": (
        "(self, request_ids: str | collections.abc.Iterable[str] | None, finished_status: "
        "vllm.v1.request.RequestStatus) -> list[vllm.v1.request.Request]", "77866ce0b50a3438"),
}


class _PredictiveMixin(AdminMixin):
    ext_telemetry = None  # a SchedulerTelemetry with --ext-telemetry (vllm_ext.telemetry.engine)

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        self.ext_config = ExtConfig.from_vllm_config(vllm_config)
        self.ext_policy = build_policy(self.ext_config, vllm_config.model_config)
        self.ext_predictions: dict[str, dict[str, float]] = {}
        # sort keys of waiting requests: they hold while a request waits (no tokens, no new
        # predictions), so a deep queue is not re-keyed every step; entry = (state, key)
        self.ext_waiting_keys: dict[str, tuple[tuple[int, int], tuple]] = {}
        # the policy is re-applied only after an event that can change its answer (see
        # `schedule`); between events keys only count down together
        self.ext_dirty = True
        # the waiting order changes only with arrivals, preemptions (a change of the running
        # set) and predictions for a waiting request, not with the running requests' refinements
        self.ext_waiting_dirty = True
        self.ext_running_seen: tuple[str, ...] = ()
        self.ext_stats = SchedStats()
        self.ext_preempt_cause = "kv_pressure"  # "policy" while _preempt_for preempts
        self.ext_step_cost = StepCostFit()
        self.ext_pauses = ToolPauses()  # requests paused for a tool call (LAMPS)
        self.ext_returns = PreemptReturns()  # preempted requests: swap, recompute on return
        self.ext_sessions = SessionKeeps()  # finished turns kept for their session's next one
        self.ext_telemetry = SchedulerTelemetry.build(self.ext_config)  # or None
        self.ext_last_update: float | None = None  # perf_counter of the last busy step's end
        # starvation bound: the next time a running / waiting request becomes overdue
        self.ext_now = time.time()
        self.ext_due = {"running": math.inf, "waiting": math.inf}
        if self.ext_policy.reorders and not isinstance(self.waiting, FCFSRequestQueue):
            logger.warning("vllm-ext: waiting queue is not FCFS (--scheduling-policy priority); "
                           "policy %s orders running requests only", self.ext_policy.name)
        changed = changed_targets(VLLM_TARGETS)
        if changed:  # a warning, not a failure: a GPU 0.32.x patch release may be benign
            logger.warning("vllm-ext: vLLM Scheduler methods this scheduler relies on changed "
                           "since they were checked (vllm_ext.sched.scheduler.VLLM_TARGETS): %s",
                           "; ".join(changed))
        logger.info("vllm-ext PredictiveScheduler: policy=%s", self.ext_policy.name)

    # ---- vLLM hooks ------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        on_arrival = getattr(self.ext_policy, "on_arrival", None)
        if on_arrival is not None:
            self._guard(on_arrival, request.request_id, request.prompt_token_ids or [])
        self.ext_dirty = self.ext_waiting_dirty = True
        self.ext_pauses.on_add(request)
        self._keep("on_arrival", request)
        super().add_request(request)
        if self.ext_telemetry is not None:
            self.ext_telemetry.on_request(request, self)

    def _update_request_as_session(self, session: Request, update) -> None:
        """A paused request's next input (a tool result) arrived: one whose KV was discarded
        for the call re-prefills its whole context, from the waiting queue."""
        discarded = self.ext_pauses.resumed(self, session)
        super()._update_request_as_session(session, update)
        self.ext_dirty = self.ext_waiting_dirty = True
        if discarded:
            session.num_computed_tokens = 0
            if session in self.kv_holding_waiting:
                self.kv_holding_waiting.remove_request(session)
                self.waiting.add_request(session)

    def finish_requests(self, request_ids, finished_status):
        if request_ids is not None:
            request_ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.ext_pauses.finishing(self, self.requests if request_ids is None else request_ids)
        return super().finish_requests(request_ids, finished_status)

    def schedule(self, *args, **kwargs):
        """Apply the policy, then vLLM's schedule. The policy runs only after an event: an
        arrival, new predictions, or a change of the running set (admission, finish,
        preemption), or the moment a request passes the starvation bound (`ext_due`). In
        between, every running request's remaining length counts down by one per token and
        waiting keys are fixed, so the order holds and no new preemption can become due
        (victims only get shorter and less preemptible)."""
        if self.ext_telemetry is not None:  # hot-prefix hint (vllm_ext.telemetry.engine)
            self.ext_telemetry.before_schedule(self.waiting)
        if self.ext_policy.reorders:
            self.ext_now = time.time()  # the clock of request.arrival_time
            if (self.ext_running_seen != self._running_ids()
                    or self.ext_now >= min(self.ext_due.values())):  # a request is overdue
                self.ext_dirty = self.ext_waiting_dirty = True
            if self.ext_dirty:
                try:
                    self._apply_policy()
                except Exception:
                    self._fall_back("ordering")
                self.ext_dirty = False
        self._keep("before_schedule")
        held = self._hold_back()
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            restore(self, held)
        self.ext_pauses.after_schedule(output)
        self.ext_returns.after_schedule(output)
        self._keep("after_schedule", output)
        self.ext_running_seen = self._running_ids()
        return output

    def _hold_back(self) -> list:
        """lamps with admission "peak": the waiting requests not offered to vLLM this step."""
        if (getattr(self.ext_policy, "admission", "vllm") != "peak"
                or not isinstance(self.waiting, FCFSRequestQueue)):
            return []
        try:
            return hold_back(self)
        except Exception:
            self._fall_back("admission")
            return []

    def _running_ids(self) -> tuple[str, ...]:
        return tuple(r.request_id for r in self.running)

    def update_from_output(self, scheduler_output, model_runner_output):
        values = getattr(model_runner_output, "probe_values", None)
        if values:  # async scheduling: a step may still carry a request freed since
            values = {r: v for r, v in values.items() if r in self.requests}
        if values:
            self.ext_predictions.update(values)
            self.ext_dirty = True
            for req_id in values:
                if self.ext_waiting_keys.pop(req_id, None) is not None:
                    self.ext_waiting_dirty = True
            observe = getattr(self.ext_policy, "observe", None)
            for req_id, vals in values.items() if observe else ():
                request = self.requests.get(req_id)
                if request is not None:  # generated count before this step's token
                    self._guard(observe, req_id, vals, request.num_output_tokens)
            if getattr(self.ext_policy, "rekey_waiting", False):  # e.g. a prompt got scored
                self.ext_policy.rekey_waiting = False
                self.ext_waiting_keys, self.ext_waiting_dirty = {}, True
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self._time_step(scheduler_output.total_num_scheduled_tokens)
        return outputs

    def _time_step(self, tokens: int) -> None:
        """Step cost for cost-aware preemption: the time between two step ends while the
        engine stayed busy (an idle engine's wait for arrivals is not a step)."""
        now = time.perf_counter()
        if self.ext_last_update is not None:
            self.ext_step_cost.add(tokens, now - self.ext_last_update)
        self.ext_last_update = now if self.has_unfinished_requests() else None

    def _free_request(self, request: Request, *args, **kwargs):
        """vLLM frees every finished or aborted request here: record the first prediction's
        error, then drop the request's state (nothing per request outlives it)."""
        req_id = request.request_id
        try:
            predicted = self.ext_policy.first_prediction(self.view(request))
            if predicted is not None and request.status != RequestStatus.FINISHED_ABORTED:
                self.ext_stats.observe_error(abs(predicted - request.num_output_tokens))
        except Exception:
            logger.exception("vllm-ext: prediction error of %s not recorded", req_id)
        self.ext_predictions.pop(req_id, None)
        self.ext_waiting_keys.pop(req_id, None)
        self.ext_pauses.forget(request)
        self.ext_returns.forget(req_id)
        self._keep("forget", req_id)
        self._keep("on_finish", request, self.ext_config.session_keep, tier_of(self))
        if self.ext_telemetry is not None:
            self.ext_telemetry.forget(req_id)
        forget = getattr(self.ext_policy, "forget", None)
        if forget is not None:
            self._guard(forget, req_id)
        return super()._free_request(request, *args, **kwargs)

    def _keep(self, hook: str, *args) -> None:
        """A `SessionKeeps` hook (no-op while --ext-session-keep is off); an error is logged
        and turns session keeping off (pins released: vLLM's way again)."""
        if self.ext_config.session_keep == "off":
            return
        try:
            getattr(self.ext_sessions, hook)(self, *args)
        except Exception:
            logger.exception("vllm-ext: session keeping failed in %s; turned off", hook)
            self.ext_config = self.ext_config.with_live_changes({"session_keep": "off"})
            self.ext_sessions.reset(self)

    def _preempt_request(self, request: Request, *args, **kwargs) -> None:
        self.ext_stats.count_preemption(self.ext_preempt_cause)
        self.ext_returns.on_preempt(self, request, self.ext_config.preempt_mode, tier_of(self))
        return super()._preempt_request(request, *args, **kwargs)

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:
            self._fall_back(getattr(fn, "__name__", "a policy call"))

    def _fall_back(self, where: str) -> None:
        """A failing policy is replaced by FCFS for the engine's lifetime: logged once with its
        traceback, counted (``vllm_ext_policy_fallbacks_total``), named in /v1/ext/config,
        and the waiting queue goes back to arrival order."""
        logger.exception("vllm-ext: policy %s failed in %s; falling back to FCFS",
                         self.ext_policy.name, where)
        self.ext_stats.fallback(f"{self.ext_policy.name} failed in {where}")
        self.ext_policy = FcfsPolicy()
        if isinstance(self.waiting, FCFSRequestQueue):
            ordered = sorted(self.waiting, key=lambda r: (r.arrival_time, r.request_id))
            self.waiting.clear()
            self.waiting.extend(ordered)

    # ---- policy application ----------------------------------------------------------------
    def view(self, request: Request, waiting_since: float | None = None) -> RequestView:
        true_len = extra_args(request).get(TRUE_LEN_KEY)
        return RequestView(
            request_id=request.request_id,
            arrival_time=request.arrival_time,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            max_tokens=request.max_tokens,
            num_preemptions=request.num_preemptions,
            true_output_len=true_len if isinstance(true_len, int) else None,
            predictions=self.ext_predictions.get(request.request_id, {}),
            now=self.ext_now,
            priority=request.priority,
            waiting_since=waiting_since,
        )

    def _apply_policy(self) -> None:
        batch = len(self.running)
        self.ext_policy.calibrate(self.ext_step_cost.step_s(batch),
                                  self.ext_step_cost.steps_per_token(batch)
                                  if self.ext_config.preemption_cost else 0.0)
        views = {r.request_id: self.view(r) for r in self.running}
        self.ext_due["running"] = min((self._due(v) for v in views.values()), default=math.inf)
        self.running.sort(key=lambda r: self.ext_policy.sort_key(views[r.request_id]))
        if isinstance(self.waiting, FCFSRequestQueue) and self.waiting:
            if self.ext_waiting_dirty:
                self._sort_waiting()
            for _ in range(self.ext_config.max_preemptions_per_step):
                if not self._preempt_for(self.waiting[0], views):
                    break
                self._sort_waiting()
        self.ext_waiting_dirty = False

    def _sort_waiting(self) -> None:
        # the cache is rebuilt from the requests waiting now, so admitted and finished ones
        # leave it without a pass of their own
        known, self.ext_waiting_keys = self.ext_waiting_keys, {}
        self.ext_due["waiting"] = math.inf
        ordered = sorted(self.waiting, key=lambda r: self._waiting_key(r, known))
        self.waiting.clear()
        self.waiting.extend(ordered)

    def _waiting_key(self, request: Request, known: dict) -> tuple:
        """Cached per request while it waits; entry = (state, key, when it becomes overdue,
        since when it waits in this state): a key holds until the request's state changes
        (it ran, was preempted, paused or resumed) or it passes the starvation bound."""
        state = (request.num_output_tokens, request.num_preemptions, request.status)
        cached = known.get(request.request_id)
        if cached is None or cached[0] != state or self.ext_now >= cached[2]:
            since = cached[3] if cached is not None and cached[0] == state else self.ext_now
            view = self.view(request, waiting_since=since)
            cached = (state, self.ext_policy.sort_key(view), self._due(view), since)
        self.ext_waiting_keys[request.request_id] = cached
        self.ext_due["waiting"] = min(self.ext_due["waiting"], cached[2])
        return cached[1]

    def _due(self, view: RequestView) -> float:
        """When `view` passes the policy's starvation bound; inf if it has or never will."""
        overdue_at = getattr(self.ext_policy, "overdue_at", None)
        at = overdue_at(view) if overdue_at is not None else math.inf
        return at if at > view.now else math.inf

    def _has_room_for(self, request: Request) -> bool:
        if len(self.running) >= self.max_num_running_reqs:
            return False
        need = math.ceil(request.num_tokens / self.block_size) + len(self.running)
        return self.kv_cache_manager.block_pool.get_num_free_blocks() >= need

    def _preempt_for(self, candidate: Request, views: dict[str, RequestView]) -> bool:
        """Preempt the policy's victim for `candidate` if it cannot be admitted as is."""
        if candidate.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            return False
        if self._has_room_for(candidate):
            return False
        running = [views[r.request_id] for r in self.running
                   if r.status == RequestStatus.RUNNING and self._request_blocks_can_be_freed(r)]
        victim_view = self.ext_policy.choose_victim(self.view(candidate), running)
        if victim_view is None:
            return False
        victim = next(r for r in self.running if r.request_id == victim_view.request_id)
        self.running.remove(victim)
        self.ext_preempt_cause = "policy"
        try:
            self._preempt_request(victim, time.monotonic())
        finally:
            self.ext_preempt_cause = "kv_pressure"
        logger.debug("vllm-ext: %s preempted %s for %s", self.ext_policy.name,
                     victim.request_id, candidate.request_id)
        return True


class PredictiveSyncScheduler(_PredictiveMixin, Scheduler):
    """PredictiveScheduler for engines without async scheduling."""


class PredictiveScheduler(_PredictiveMixin, AsyncScheduler):
    """The class to name in ``--scheduler-cls``; becomes `PredictiveSyncScheduler` when the
    engine's async scheduling is off, as vLLM itself picks Scheduler vs AsyncScheduler."""

    def __new__(cls, *args, **kwargs):
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is PredictiveScheduler and not vllm_config.scheduler_config.async_scheduling:
            sync = object.__new__(PredictiveSyncScheduler)
            sync.__init__(*args, **kwargs)  # not an instance of cls: Python won't call it
            return sync
        return super().__new__(cls)
