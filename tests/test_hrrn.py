"""HRRN (highest response ratio next) without an engine: the ratio against an independent
computation, aging past newer short requests, strict priority levels, no preemption, the key
clock the engine adapter re-sorts on, the estimator hooks, and a bounded wait in the simulator
under an adversarial stream of short arrivals."""
import math
import time
from types import SimpleNamespace

import pytest

from vllm_ext.config import ExtConfig
from vllm_ext.sched.hrrn import HrrnPolicy
from vllm_ext.sched.policy import FcfsPolicy, OraclePolicy, RequestView
from vllm_ext.sched.trail import LengthBins, PromptModel, TrailPolicy

STEP = 0.01


class Fixed:
    """An estimator: a fixed predicted remaining length per request id."""

    def __init__(self, remaining):
        self.table = dict(remaining)

    def remaining(self, view):
        return self.table.get(view.request_id, math.inf)


def v(rid, arrival, now, out=0, max_tokens=1000, priority=0, true_len=None):
    return RequestView(rid, arrival, 5, out, max_tokens, 0, true_len, now=now,
                       priority=priority)


def expected_ratio(now, arrival, remaining_tokens, step_s=STEP):
    service = remaining_tokens * step_s
    return (now - arrival + service) / service


def test_ratio_and_order_match_an_independent_computation():
    rem = {"a": 200, "b": 5, "c": 40, "d": 12, "e": 90}
    arrivals = {"a": 0.0, "b": 2.9, "c": 2.0, "d": 2.5, "e": 1.0}
    p = HrrnPolicy(estimator=Fixed(rem), refresh_s=0.0, step_s=STEP)
    now = 3.0
    views = [v(rid, arrivals[rid], now) for rid in rem]
    want = {rid: expected_ratio(now, arrivals[rid], rem[rid]) for rid in rem}
    for view in views:
        assert p.ratio(view) == pytest.approx(want[view.request_id], rel=1e-12)
    # a: 1 + 3 / 2 = 2.5; b: 1 + 0.1 / 0.05 = 3; c: 1 + 1 / 0.4 = 3.5; d: 1 + 0.5 / 0.12;
    # e: 1 + 2 / 0.9
    assert want["a"] == pytest.approx(2.5) and want["c"] == pytest.approx(3.5)
    order = [x.request_id for x in sorted(views, key=p.sort_key)]
    assert order == sorted(rem, key=lambda rid: -want[rid]) == ["d", "c", "e", "b", "a"]
    # the order does not depend on the step cost (it cancels), nor need it be measured
    other = HrrnPolicy(estimator=Fixed(rem), refresh_s=0.0, step_s=0.0)
    assert [x.request_id for x in sorted(views, key=other.sort_key)] == order
    assert math.isnan(other.ratio(views[0]))


def test_a_waiting_long_requests_ratio_grows_and_overtakes_newer_short_ones():
    p = HrrnPolicy(estimator=Fixed({"long": 200, "short": 5}), refresh_s=0.0, step_s=STEP)
    ratios = []
    for now in (0.5, 1.0, 1.5, 1.59, 1.61, 2.0, 4.0):
        long, short = v("long", 0.0, now), v("short", now - 0.04, now)  # a fresh short one
        ratios.append(p.ratio(long))
        assert p.ratio(short) == pytest.approx(1.8)       # 1 + 0.04 / 0.05, whenever it came
        first = min((long, short), key=p.sort_key).request_id
        # crossing: 1 + now / 2 = 1.8 at now = 1.6 s
        assert first == ("short" if now < 1.6 else "long"), now
    assert ratios == sorted(ratios) and ratios[0] == pytest.approx(1.25)


def test_ties_go_to_the_shorter_service_then_arrival():
    p = HrrnPolicy(estimator=Fixed({"x": 50, "y": 10, "z": 10}))
    views = [v("x", 1.0, 1.0), v("y", 1.0, 1.0), v("z", 1.0, 1.0)]  # none has waited
    assert [x.request_id for x in sorted(views, key=p.sort_key)] == ["y", "z", "x"]
    views = [v("x", 1.0, 1.0), v("y", 1.0, 1.0), v("z", 0.999999, 0.999999)]
    assert [x.request_id for x in sorted(views, key=p.sort_key)] == ["z", "y", "x"]


def test_priority_levels_are_strict_and_hrrn_never_preempts():
    p = HrrnPolicy(estimator=Fixed({"old-low": 5, "new-high": 500, "mid": 50}),
                   refresh_s=0.0, step_s=STEP)
    views = [v("old-low", 0.0, 100.0, priority=1),       # ratio 2001: still after level 0
             v("new-high", 100.0, 100.0, priority=0),    # ratio 1
             v("mid", 99.0, 100.0, priority=0)]
    assert p.ratio(views[0]) > 1000 and p.ratio(views[1]) == 1.0
    assert [x.request_id for x in sorted(views, key=p.sort_key)] == [
        "mid", "new-high", "old-low"]
    # SGLang's HRRN orders the waiting queue only: no policy preemption, not even for a higher
    # priority level (it goes ahead of every lower-priority waiting request instead)
    assert p.choose_victim(views[1], [views[0]]) is None
    assert p.choose_victim(views[2], [v("r", 0.0, 100.0, priority=5)]) is None


def test_the_key_clock_exact_by_default_or_on_ticks():
    exact = HrrnPolicy(estimator=Fixed({"a": 10}))
    assert exact.refresh_s == 0 and exact.sort_key(v("a", 1.0, 1.101))[1] == pytest.approx(
        -0.101 / 10)
    assert 1.101 < exact.overdue_at(v("a", 1.0, 1.101)) < 1.1011   # re-keyed every step
    p = HrrnPolicy(estimator=Fixed({"a": 10}), refresh_s=0.05)
    keys = [p.sort_key(v("a", 1.0, now)) for now in (1.101, 1.149, 1.151)]
    assert keys[0] == keys[1] != keys[2]
    assert keys[0][1] == pytest.approx(-0.15 / 10)       # the clock reads the next tick, 1.15
    assert p.overdue_at(v("a", 1.0, 1.101)) == pytest.approx(1.15)   # ... and holds until it
    for now in (0.15, 0.3, 1.0, 2.45, 0.1 + 0.2):         # on a tick (as floats go): after now
        at = p.overdue_at(v("a", 0.0, now))
        assert now < at <= now + 0.05 + 1e-9 and round(at / 0.05) * 0.05 == pytest.approx(at)
    assert exact.sort_key(v("a", 2.0, 1.9))[1] == 0      # no negative wait


def test_estimator_hooks_tables_and_the_max_tokens_cap():
    est = TrailPolicy(bins=LengthBins((0.0, 10.0, 100.0)), refine=False, tail_factor=0.0,
                      prompt_model=PromptModel(tuple([40.0] + [0.0] * 65)))
    p = HrrnPolicy(estimator=est, step_s=STEP)
    assert p.prompt_pred is est.prompt_pred and p.trackers is est.trackers  # counted by state
    p.on_arrival("a", [1, 2, 3])
    p.observe("a", {"bin0": 1.0}, 0)                     # spjf: never refined
    assert p.service_tokens(v("a", 0.0, 0.0, out=10)) == 30
    assert p.service_tokens(v("a", 0.0, 0.0, out=10, max_tokens=25)) == 15   # capped
    assert p.first_prediction(v("a", 0.0, 0.0)) == 40
    assert p.service_tokens(v("unknown", 0.0, 0.0, out=7, max_tokens=100)) == 93
    p.calibrate(0.02, 0.1)
    assert p.step_s == est.step_s == 0.02
    p.forget("a")
    assert not est.prompt_pred and p.service_tokens(v("a", 0.0, 0.0, out=1, max_tokens=9)) == 8


def test_registered_as_a_policy_and_built_on_the_length_probes_prompt_model(model_path):
    from transformers import AutoConfig

    from vllm_ext.sched.scheduler import build_policy

    cfg = ExtConfig(policy="hrrn")
    assert not cfg.needs_probes()                        # prompt-only: workers run no probe
    model_config = SimpleNamespace(hf_config=AutoConfig.from_pretrained(model_path),
                                   model=model_path)
    p = build_policy(cfg, model_config)
    assert isinstance(p, HrrnPolicy) and p.name == "hrrn" and p.reorders
    assert p.estimator.name == "spjf" and p.estimator.prompt_model is not None
    p.on_arrival("r", [5, 6, 7])
    assert 1 <= p.service_tokens(v("r", 0.0, 0.0)) < 1000
    # no length probe for the model: FCFS with a warning, as trail/spjf
    blank = SimpleNamespace(hf_config=SimpleNamespace(model_type="none"), model=None)
    assert isinstance(build_policy(cfg, blank), FcfsPolicy)


def test_live_switch_to_hrrn_and_the_adapter_resorts_at_a_tick_without_another_event(
        model_path):
    from transformers import AutoConfig

    from test_policy import _adapter

    s, ns = _adapter([("long", 0, 300), ("short", 1, 5)])
    s.vllm_config.model_config = SimpleNamespace(
        hf_config=AutoConfig.from_pretrained(model_path), model=model_path)
    s.ext_apply_config({"policy": "hrrn"})                 # the admin route's path
    assert s.ext_get_config()["active_policy"] == "hrrn"
    assert set(s.ext_policy.prompt_pred) == {"long", "short"}   # learnt the waiting prompts
    s.ext_policy = HrrnPolicy(estimator=OraclePolicy(), refresh_s=0.05)  # true lengths
    s.max_num_running_reqs, s.block_size = 4, 16
    s.kv_cache_manager = ns(block_pool=ns(get_num_free_blocks=lambda: 100))
    for r in s.requests.values():
        r.num_tokens, r.max_tokens = 4, 1000
    now = time.time()
    # long: waited 6.1 s for 300 tokens (6.1 / 300 = 0.0203); short: just arrived, and on the
    # 50 ms ticks its wait reads at most 0.05 s (0.05 / 5 = 0.01)
    s.requests["long"].arrival_time = now - 6.1
    s.requests["short"].arrival_time = now
    s.schedule()
    assert [r.request_id for r in s.waiting] == ["long", "short"]
    s.ext_dirty = False
    s.schedule()
    assert [r.request_id for r in s.waiting] == ["long", "short"]  # cached keys, same tick
    time.sleep(0.15)  # short: >= 0.15 / 5 = 0.03 > long: <= 6.3 / 300 = 0.021
    s.schedule()      # no arrival, prediction or running change: the key clock re-sorts
    assert [r.request_id for r in s.waiting] == ["short", "long"]


def test_bounded_wait_under_an_adversarial_stream_of_short_arrivals():
    """The slot is taken, a long request arrives, then short ones keep arriving exactly as
    fast as they are served, so a short one is always waiting. SRPT-style order (spjf) serves
    the long one only after the stream ends; HRRN once its ratio passes the waiting short
    one's, wait_long / 200 > wait_short / 5 (exact clock), and within a bound on ticks too."""
    from vllm_ext.sim.cli import _policy
    from vllm_ext.sim.cluster import latency_stats, simulate
    from vllm_ext.sim.predicted import NoisyTrailPolicy
    from vllm_ext.sim.replica import ReplicaConfig, SimRequest, StepCost

    first = SimRequest("first", 0.0, 8, 5, 5)
    long = SimRequest("long", 0.001, 8, 200, 200)
    shorts = [SimRequest(f"s{i}", 0.013 + i * 0.05, 8, 5, 5) for i in range(600)]
    cfg = ReplicaConfig(max_num_seqs=1, max_num_batched_tokens=64, cost=StepCost(STEP, 0, 0))
    factories = {name: _policy(name, sigma=(0.0, 0.0), tail_factor=0.0)  # exact predictions
                 for name in ("hrrn", "spjf", "fcfs")}
    factories["hrrn tick"] = lambda: HrrnPolicy(refresh_s=0.05, estimator=NoisyTrailPolicy(
        sigma_initial=0.0, refine=False, tail_factor=0.0))
    assert isinstance(factories["hrrn"](), HrrnPolicy)
    runs = {}
    for name, factory in factories.items():
        done = simulate([first, long, *shorts], cfg, factory)
        assert len(done) == 602
        if name.startswith("hrrn"):
            assert latency_stats(done)["preemptions"] == 0   # HRRN never preempts
        runs[name] = {r.request_id: r for r in done}
    service = 200 * STEP                                 # the long one's run: 200 one-token steps
    # independently: a short one (5 steps) ends at each 0.05 s; the one waiting then is s_k,
    # arrived at 0.013 + 0.05 k; the long one starts at the first such end where its ratio wins
    start = next(t for t in (0.05 * (k + 1) for k in range(600))
                 if (t - long.arrival_s) / 200 > (t - (0.013 + 0.05 * (round(t / 0.05) - 1))) / 5)
    assert start == pytest.approx(1.5)
    assert runs["hrrn"]["long"].finish_s == pytest.approx(start + service, abs=1e-6)
    # on 50 ms ticks every wait is over-estimated by <= 50 ms: it starts once
    # wait_long > 200 / 5 x (0.05 + 0.05), at the next short one's end at the latest
    bound = long.arrival_s + 40 * (0.05 + 0.05) + 0.05 + service
    assert start + service < runs["hrrn tick"]["long"].finish_s <= bound
    assert runs["fcfs"]["long"].finish_s == pytest.approx(0.05 + service, abs=1e-6)
    assert runs["spjf"]["long"].finish_s > max(r.arrival_s for r in shorts)  # starved to the end
    # and the short ones are not starved either: each waits at most the long run + one short
    for name in ("hrrn", "hrrn tick"):
        waits = [runs[name][r.request_id].first_token_s - r.arrival_s for r in shorts]
        assert max(waits) <= service + 0.1
