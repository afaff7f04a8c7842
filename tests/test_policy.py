"""Pure policy behaviour: ordering, victim choice, margin and preemption cap (no engine)."""
import math

from vllm_ext.sched.policy import FcfsPolicy, OraclePolicy, RequestView, make_policy


def view(rid, arrival, out=0, true_len=None, preempted=0):
    return RequestView(request_id=rid, arrival_time=arrival, num_prompt_tokens=5,
                       num_output_tokens=out, max_tokens=100, num_preemptions=preempted,
                       true_output_len=true_len)


def test_fcfs_never_reorders_or_preempts():
    p = FcfsPolicy()
    assert not p.reorders
    assert p.choose_victim(view("a", 0, true_len=1), [view("b", 0, true_len=99)]) is None


def test_oracle_orders_by_true_remaining_then_arrival():
    p = make_policy("oracle")
    views = [view("long", 0, true_len=50), view("short", 2, true_len=5),
             view("half", 1, out=40, true_len=50), view("tie", 3, true_len=5),
             view("unknown", -1)]
    order = [v.request_id for v in sorted(views, key=p.sort_key)]
    assert order == ["short", "tie", "half", "long", "unknown"]
    assert view("x", 0).true_remaining == math.inf


def test_oracle_victim_is_largest_remaining_and_respects_margin():
    p = OraclePolicy(margin=10)
    running = [view("r1", 0, true_len=30), view("r2", 0, true_len=80), view("r3", 0, true_len=50)]
    assert p.choose_victim(view("w", 1, true_len=5), running).request_id == "r2"
    assert p.choose_victim(view("w", 1, true_len=75), running) is None  # 75 + 10 >= 80


def test_oracle_preemption_cap():
    p = OraclePolicy(max_preemptions_per_request=2)
    running = [view("r1", 0, true_len=30), view("r2", 0, true_len=80, preempted=2)]
    assert p.choose_victim(view("w", 1, true_len=5), running).request_id == "r1"
    assert p.choose_victim(view("w", 1, true_len=5), running[1:]) is None


# ---- the scheduler adapter's cache of waiting-queue keys (no engine) -----------------------
class _CountingOracle(OraclePolicy):
    calls = 0

    def sort_key(self, v):
        type(self).calls += 1
        return super().sort_key(v)


def _adapter(requests):
    from types import SimpleNamespace

    from vllm.v1.core.sched.request_queue import FCFSRequestQueue
    from vllm.v1.request import RequestStatus

    from vllm_ext.sched.scheduler import _PredictiveMixin
    from vllm_ext.config import ExtConfig
    from vllm_ext.sched.stats import SchedStats
    from vllm_ext.sched.pauses import ToolPauses
    from vllm_ext.sched.preempt_swap import PreemptReturns
    from vllm_ext.sched.step_cost import StepCostFit
    from vllm_ext.sched.sessions import SessionKeeps

    class _Base:  # the Scheduler methods the mixin calls through super()
        def update_from_output(self, scheduler_output, model_runner_output):
            return {}

        def schedule(self):
            return "scheduled"

        def has_unfinished_requests(self):
            return bool(self.requests)

        def add_request(self, request):
            pass

        def _free_request(self, request, delay_free_blocks=False):
            del self.requests[request.request_id]
            return None, None

    class Adapter(_PredictiveMixin, _Base):
        pass

    s = object.__new__(Adapter)  # no vLLM engine: set what the mixin's methods read
    s.ext_policy, s.ext_predictions, s.ext_waiting_keys = _CountingOracle(), {}, {}
    s.ext_dirty, s.ext_running_seen = True, ()
    s.ext_step_cost, s.ext_last_update = StepCostFit(), None
    s.ext_pauses = ToolPauses()
    s.ext_returns = PreemptReturns()
    s.ext_sessions = SessionKeeps()
    s.ext_now, s.ext_due = 0.0, {"running": float("inf"), "waiting": float("inf")}
    s.ext_waiting_dirty = True
    s.ext_stats, s.ext_config = SchedStats(), ExtConfig(policy="oracle")
    s.vllm_config = SimpleNamespace(model_config=None)
    s.requests, s.running, s.waiting = {}, [], FCFSRequestQueue()
    for rid, arrival, true_len in requests:
        r = SimpleNamespace(request_id=rid, arrival_time=arrival, num_prompt_tokens=5,
                            status=RequestStatus.WAITING, prompt_token_ids=[1, 2, 3], priority=0,
                            num_output_tokens=0, max_tokens=100, num_preemptions=0,
                            sampling_params=SimpleNamespace(extra_args={"ext_true_output_len": true_len}))
        s.requests[rid] = r
        s.waiting.append(r)
    return s, SimpleNamespace


def test_waiting_keys_are_cached_and_refreshed_when_the_request_changes():
    s, ns = _adapter([("a", 0, 50), ("b", 1, 20), ("c", 2, 30)])
    _CountingOracle.calls = 0
    s._sort_waiting()
    assert [r.request_id for r in s.waiting] == ["b", "c", "a"]
    s._sort_waiting()
    assert _CountingOracle.calls == 3  # second sort: every key from the cache
    s.requests["a"].num_output_tokens = 45  # "a" ran 45 tokens and was preempted back
    s.requests["a"].num_preemptions = 1
    s._sort_waiting()
    assert [r.request_id for r in s.waiting] == ["a", "b", "c"] and _CountingOracle.calls == 4
    # a new prediction for "b" drops its key; requests gone from `waiting` leave the cache
    s.waiting.remove(s.requests["c"])
    s.update_from_output(ns(total_num_scheduled_tokens=2), ns(probe_values={"b": {"remaining": 1.0}}))
    assert "b" not in s.ext_waiting_keys
    s._sort_waiting()
    assert _CountingOracle.calls == 5 and set(s.ext_waiting_keys) == {"a", "b"}


def test_policy_is_reapplied_only_after_an_event():
    s, ns = _adapter([("a", 0, 50), ("b", 1, 20)])
    applied = []
    s._apply_policy = lambda: applied.append(1)
    assert s.schedule() == "scheduled" and len(applied) == 1
    s.schedule()
    assert len(applied) == 1                  # nothing happened: same order, no new preemption
    s.update_from_output(ns(total_num_scheduled_tokens=2), ns(probe_values={"a": {"remaining": 3.0}}))
    s.schedule()
    assert len(applied) == 2                  # new predictions
    s.running.append(s.requests["b"])         # admission / finish / preemption
    s.schedule()
    assert len(applied) == 3
    s.schedule()
    assert len(applied) == 3


def test_finished_and_aborted_requests_leave_no_state_and_errors_are_counted():
    from vllm.v1.request import RequestStatus

    s, ns = _adapter([("a", 0, 50), ("b", 1, 20)])
    step = ns(total_num_scheduled_tokens=2)
    s.update_from_output(step, ns(probe_values={"a": {"x": 1.0}, "b": {"x": 2.0}}))
    s._sort_waiting()
    assert set(s.ext_predictions) == set(s.ext_waiting_keys) == {"a", "b"}
    a, b = s.requests["a"], s.requests["b"]
    a.status, a.num_output_tokens = RequestStatus.FINISHED_STOPPED, 47
    s._free_request(a)
    b.status = RequestStatus.FINISHED_ABORTED
    s._free_request(b)
    assert not s.ext_predictions and not s.ext_waiting_keys and not s.requests
    stats = s.ext_stats.to_dict()
    assert sum(stats["error_counts"]) == 1 and stats["error_sum"] == 3  # |50 - 47|; abort not counted
    # a late step output for a freed request (async scheduling) is not stored
    s.update_from_output(step, ns(probe_values={"a": {"x": 1.0}}))
    assert not s.ext_predictions


def test_live_switch_rebuilds_the_policy_and_refuses_fixed_settings():
    import pytest

    from vllm_ext.config import ExtConfigError
    from vllm_ext.sched.policy import FcfsPolicy

    s, _ = _adapter([("a", 0, 50)])
    s.ext_dirty = False
    out = s.ext_apply_config({"policy": "fcfs", "preemption_margin": 7})
    assert isinstance(s.ext_policy, FcfsPolicy) and out["active_policy"] == "fcfs"
    assert s.ext_config.preemption_margin == 7 and s.ext_dirty
    with pytest.raises(ExtConfigError):
        s.ext_apply_config({"kv_bits": 4})
    assert s.ext_config.policy == "fcfs"


class _Broken(OraclePolicy):
    def __init__(self, where):
        super().__init__()
        self.where = where

    def _maybe_fail(self, where):
        if self.where == where:
            raise RuntimeError(f"boom in {where}")

    def sort_key(self, v):
        self._maybe_fail("sort_key")
        return super().sort_key(v)

    def observe(self, request_id, values, generated):
        self._maybe_fail("observe")

    def on_arrival(self, request_id, prompt_ids):
        self._maybe_fail("on_arrival")


import pytest  # noqa: E402


@pytest.mark.parametrize("where", ["sort_key", "observe", "on_arrival"])
def test_a_failing_policy_falls_back_to_fcfs_counted_and_named(where):
    from vllm_ext.sched.policy import FcfsPolicy

    s, ns = _adapter([("a", 0, 50), ("b", 1, 20), ("c", 2, 30)])
    s.ext_policy = _Broken(where)
    s.waiting.rotate(1)  # not in arrival order (as a policy would leave it)
    if where == "on_arrival":
        s.add_request(ns(request_id="d", prompt_token_ids=[1]))
    elif where == "observe":
        s.update_from_output(ns(total_num_scheduled_tokens=2), ns(probe_values={"a": {"x": 1.0}}))
    else:
        s.schedule()
    assert isinstance(s.ext_policy, FcfsPolicy)
    named = {"sort_key": "ordering"}.get(where, where)
    assert s.ext_stats.policy_fallbacks == 1 and named in s.ext_stats.fallback_reason
    assert s.ext_get_config()["fallback"] == s.ext_stats.fallback_reason
    assert [r.request_id for r in s.waiting][:3] == ["a", "b", "c"]  # arrival order again
    assert s.schedule() == "scheduled"  # and the engine keeps scheduling


def test_a_request_passing_its_starvation_bound_is_reordered_without_another_event():
    import time

    from vllm_ext.sched.trail import LengthBins, TrailPolicy

    s, ns = _adapter([("long", 0, 300), ("short", 1, 5)])
    s.ext_policy = TrailPolicy(bins=LengthBins((0.0, 100.0, 1000.0)), tail_factor=3.0)
    s.ext_policy.prompt_pred.update({"long": 300.0, "short": 5.0})
    s.ext_step_cost.base_s, s.ext_step_cost.per_token_s = 0.01, 0.0  # calibrated: 10 ms steps
    s.max_num_running_reqs, s.block_size = 4, 16
    s.kv_cache_manager = ns(block_pool=ns(get_num_free_blocks=lambda: 100))
    now = time.time()
    s.requests["long"].arrival_time = now - 9.0 + 0.3   # bound 3 x 300 x 10 ms = 9 s: due in 0.3 s
    s.requests["short"].arrival_time = now - 1.0
    for r in s.requests.values():
        r.num_tokens, r.max_tokens = 4, 1000
    s.schedule()
    assert [r.request_id for r in s.waiting] == ["short", "long"]  # SRPT
    s.ext_dirty = False
    s.schedule()
    assert [r.request_id for r in s.waiting] == ["short", "long"]  # nothing happened yet
    time.sleep(0.35)
    s.schedule()  # no arrival, prediction or running change: the deadline alone re-sorts
    assert [r.request_id for r in s.waiting] == ["long", "short"]


def test_priority_levels_come_first_and_are_strict_for_preemption():
    p = OraclePolicy()

    def v(rid, prio, true_len, out=0):
        return RequestView(rid, 0.0, 5, out, 100, 0, true_len, priority=prio)
    views = [v("low-short", 1, 3), v("high-long", 0, 90), v("high-short", 0, 10)]
    assert [x.request_id for x in sorted(views, key=p.sort_key)] == [
        "high-short", "high-long", "low-short"]
    # a higher-priority candidate preempts whatever the remaining lengths; a lower one never
    assert p.choose_victim(v("c", 0, 80), [v("r", 1, 20)]).request_id == "r"
    assert p.choose_victim(v("c", 1, 1), [v("r", 0, 90)]) is None
    assert p.choose_victim(v("c", 0, 5), [v("r", 0, 90)]).request_id == "r"  # SRPT within


def test_waiting_since_holds_while_the_request_waits_and_restarts_when_it_changes():
    s, ns = _adapter([("a", 0, 50), ("b", 1, 20)])
    s.ext_now = 5.0
    s._sort_waiting()
    assert {rid: entry[3] for rid, entry in s.ext_waiting_keys.items()} == {"a": 5.0, "b": 5.0}
    s.ext_now = 9.0
    s.ext_waiting_keys["a"] = s.ext_waiting_keys["a"][:2] + (8.0, 5.0)  # "a" passed its bound
    s.requests["b"].num_output_tokens = 12  # "b" ran and came back (a tool call's end)
    s._sort_waiting()
    assert s.ext_waiting_keys["a"][3] == 5.0  # re-keyed at its bound, still waiting since 5
    assert s.ext_waiting_keys["b"][3] == 9.0
