"""Simulator: invariants (nothing lost, KV never over budget, policies honoured) and M/G/1
closed forms (tolerances sized for the sample: the committed validation table uses more jobs)."""
import copy
import json

import numpy as np
import pytest

from vllm_ext.bench.workload import arrival_times
from vllm_ext.sched.policy import make_policy
from vllm_ext.sim.cluster import latency_stats, simulate
from vllm_ext.sim.queueing import mg1_fcfs_mean_response, mg1_srpt_mean_response
from vllm_ext.sim.replica import Replica, ReplicaConfig, SimRequest, StepCost


def _requests(n, rate, seed, prompt=(5, 60), out=(5, 120)):
    rng = np.random.default_rng(seed)
    t = arrival_times(n, rate, seed)
    return [SimRequest(f"r{i}", float(t[i]), int(rng.integers(*prompt)), int(o), int(o))
            for i, o in enumerate(rng.integers(*out, size=n))]


@pytest.mark.parametrize("policy", ["fcfs", "oracle"])
@pytest.mark.parametrize("replicas, router", [(1, "round_robin"), (3, "least_loaded")])
def test_no_request_lost_and_kv_within_budget(policy, replicas, router):
    cfg = ReplicaConfig(max_num_seqs=8, max_num_batched_tokens=64, num_blocks=24, block_size=16)
    reqs = _requests(300, rate=30.0, seed=3)
    done = simulate(reqs, cfg, lambda: make_policy(policy), replicas, router)
    assert sorted(r.request_id for r in done) == sorted(r.request_id for r in reqs)
    assert sum(r.preemptions for r in done) > 0  # the 24-block budget was binding
    for r in done:
        assert r.generated == r.output_len and r.arrival_s <= r.first_token_s <= r.finish_s


def test_kv_budget_respected_every_step():
    cfg = ReplicaConfig(max_num_seqs=8, max_num_batched_tokens=64, num_blocks=12, block_size=16)
    rep = Replica(cfg, make_policy("oracle"))
    for r in _requests(60, rate=1000.0, seed=5, prompt=(5, 40), out=(5, 60)):
        rep.add(r)
    steps = 0
    while rep.busy():
        assert rep.step() > 0
        assert rep.used_blocks() <= cfg.num_blocks
        steps += 1
    assert len(rep.finished) == 60 and rep.max_blocks_used <= cfg.num_blocks
    assert sum(r.preemptions for r in rep.finished) > 0  # the budget was actually binding


def test_request_too_large_for_kv_is_an_error():
    cfg = ReplicaConfig(num_blocks=2, block_size=16)
    with pytest.raises(ValueError, match="never fit"):
        simulate([SimRequest("big", 0.0, 100, 10, 10)], cfg, lambda: make_policy("fcfs"))


def test_oracle_beats_fcfs_mean_latency_under_load():
    cfg = ReplicaConfig(max_num_seqs=4, max_num_batched_tokens=256,
                        cost=StepCost(0.01, 0.0, 0.0))
    reqs = _requests(2000, rate=5.5, seed=1)
    fcfs = latency_stats(simulate(reqs, cfg, lambda: make_policy("fcfs")))
    oracle = latency_stats(simulate(reqs, cfg, lambda: make_policy("oracle")))
    assert oracle["mean_e2el_s"] < 0.9 * fcfs["mean_e2el_s"]


@pytest.mark.parametrize("policy, closed", [("fcfs", mg1_fcfs_mean_response),
                                            ("oracle", mg1_srpt_mean_response)])
def test_mg1_matches_closed_form(policy, closed):
    dt, sizes, rho, n = 0.01, np.arange(5, 101), 0.5, 6000
    lam = rho / (sizes.mean() * dt)
    out = np.random.default_rng(0).choice(sizes, n)
    t = arrival_times(n, lam, 1)
    reqs = [SimRequest(str(i), float(t[i]), 1, int(o), int(o)) for i, o in enumerate(out)]
    cfg = ReplicaConfig(max_num_seqs=1, recompute_on_preempt=False, cost=StepCost(dt, 0, 0))
    done = simulate(reqs, cfg, lambda: make_policy(policy, max_preemptions_per_request=10**9))
    sim = latency_stats(done)["mean_e2el_s"]
    assert sim == pytest.approx(closed(lam, sizes * dt), rel=0.05)


def test_closed_forms_sanity():
    # deterministic size 1, lambda 0.5: FCFS = 1 + 0.5 / (2 * 0.5) = 1.5 (M/D/1)
    assert mg1_fcfs_mean_response(0.5, [1.0]) == pytest.approx(1.5)
    # one size: SRPT == FCFS (no job is ever shorter than the running one)
    assert mg1_srpt_mean_response(0.5, [1.0]) == pytest.approx(1.5)
    # exponential-ish mix: SRPT strictly better
    sizes = np.linspace(0.1, 3, 30)
    assert mg1_srpt_mean_response(0.5, sizes) < mg1_fcfs_mean_response(0.5, sizes)
    with pytest.raises(ValueError):
        mg1_fcfs_mean_response(2.0, [1.0])


def test_noisy_trail_predictions_are_seeded_and_count_down():
    from vllm_ext.sched.policy import RequestView
    from vllm_ext.sim.predicted import NoisyTrailPolicy

    pol = NoisyTrailPolicy(sigma_initial=0.5, sigma_refined=0.3, refresh_every=8, seed=7)
    view = lambda g: RequestView("a", 0.0, 10, g, 500, true_output_len=100)  # noqa: E731
    twin = NoisyTrailPolicy(sigma_initial=0.5, sigma_refined=0.3, refresh_every=8, seed=7)
    assert pol.initial(view(0)) == twin.initial(view(0))  # seeded per request, not per call
    assert pol.initial(view(0)) != pytest.approx(100)            # there is an error
    assert pol.remaining(view(9)) == pytest.approx(pol.remaining(view(8)) - 1)  # count-down
    exact = NoisyTrailPolicy(sigma_initial=0.0, sigma_refined=0.0)
    assert exact.remaining(view(30)) == 70 and exact.initial(view(30)) == 100
    # TRAIL's limit: preemptible only while generated <= 0.8 x initial prediction
    assert exact.preemptible(view(80)) and not exact.preemptible(view(81))


def test_predicted_srpt_sits_between_fcfs_and_oracle():
    from vllm_ext.sim.predicted import NoisyTrailPolicy

    cfg = ReplicaConfig(max_num_seqs=4, max_num_batched_tokens=256,
                        cost=StepCost(0.01, 0.0, 0.0))
    reqs = _requests(2000, rate=5.5, seed=1)
    mean = {name: latency_stats(simulate(reqs, cfg, factory))["mean_e2el_s"] for name, factory in
            [("fcfs", lambda: make_policy("fcfs")), ("oracle", lambda: make_policy("oracle")),
             ("trail", lambda: NoisyTrailPolicy(sigma_initial=0.5, sigma_refined=0.3))]}
    assert mean["oracle"] < mean["trail"] < mean["fcfs"]


def test_loaded_decode_samples_leave_out_preemption_stalls():
    from vllm_ext.sim.profile import loaded_decode_samples

    # A decodes 60 tokens at 2 ms, is preempted for 200 ms, decodes 60 more; B decodes at 3 ms
    a = {"send_s": 0.0, "ttft_s": 0.01, "itl_s": [0.002] * 60 + [0.2] + [0.002] * 60, "error": None}
    b = {"send_s": 0.0, "ttft_s": 0.01, "itl_s": [0.003] * 180, "error": None}
    samples = {n: dt for n, _, dt in loaded_decode_samples([a, b])}
    assert set(samples) == {1, 2}
    assert samples[1] == pytest.approx(0.003)  # B alone, also while A was preempted
    assert 0.002 < samples[2] < 0.003          # the 200 ms stall is not a step


def test_recorded_predictions_feed_trail_at_prefill_and_every_k(tmp_path):
    from vllm_ext.sched.policy import RequestView
    from vllm_ext.sched.trail import LengthBins
    from vllm_ext.sim.recorded import RecordedPredictions, RecordedTrailPolicy

    bins = LengthBins((0.0, 10.0, 20.0, 40.0))               # midpoints 5, 15, 30
    long_then_short = np.array([[0, 0, 1.0]] * 8 + [[1.0, 0, 0]] * 12)  # 20 tokens
    rec = RecordedPredictions(bins.edges, [12.0], [long_then_short], [20])
    rec.save(tmp_path / "r.npz")
    rec = RecordedPredictions.load(tmp_path / "r.npz")
    assert rec.output_len == [20] and np.allclose(rec.probs[0], long_then_short)
    pol = RecordedTrailPolicy(bins=bins, smoothing=False, recorded=rec, every=8)
    view = lambda g: RequestView("0", 0.0, 5, g, 100)  # noqa: E731
    assert pol.remaining(view(0)) == 12.0                  # before prefill: prompt-only
    assert pol.remaining(view(1)) == 30.0 - 1              # prefill probe (row 0), counted down
    assert pol.initial(view(1)) == 30.0
    assert pol.remaining(view(7)) == 30.0 - 7
    assert pol.remaining(view(9)) == 5.0 - 1               # row 8: the probe now says short
    spjf = RecordedTrailPolicy(bins=bins, recorded=rec, refine=False)
    assert spjf.remaining(view(9)) == 12.0 - 9             # prompt-only, never refined


def test_preemptions_counted_by_cause_and_recompute_charged_like_the_engine():
    from vllm_ext.sim.predicted import NoisyTrailPolicy

    reqs = _requests(150, rate=40.0, seed=2, prompt=(5, 200), out=(5, 200))
    counts = {}
    for charged in (False, True):
        cfg = ReplicaConfig(max_num_seqs=2, max_num_batched_tokens=512, preemption_cost=charged,
                            cost=StepCost(0.002, 2e-3, 0.0))  # a recomputed token = 1/3 step
        rep = Replica(cfg, NoisyTrailPolicy(sigma_initial=0.0, sigma_refined=0.0,
                                            tail_factor=0.0))  # the cost rule alone
        pending = [copy.copy(r) for r in reqs]
        while pending or rep.busy():
            if pending and (not rep.busy() or pending[0].arrival_s <= rep.now):
                rep.now = max(rep.now, pending[0].arrival_s)
                rep.add(pending.pop(0))
            else:
                rep.step()
        assert len(rep.finished) == len(reqs)
        assert rep.preemptions["kv_pressure"] == 0  # unlimited KV: only the policy preempts
        assert rep.preemptions["policy"] == sum(r.preemptions for r in rep.finished)
        assert latency_stats(rep.finished)["preemptions"] == rep.preemptions["policy"]
        counts[charged] = rep.preemptions["policy"]
    assert 0 < counts[True] < counts[False]  # charging the recompute refuses some preemptions


def test_starvation_bound_holds_in_an_adversarial_stream_of_short_arrivals():
    """One long request, then a stream of short ones that keeps the only slot busy: plain SRPT
    preempts the long one and starves it until the stream ends; with the bound it becomes
    overdue 3 x its predicted service time after arrival and then runs to the end."""
    from vllm_ext.sim.predicted import NoisyTrailPolicy

    cost = StepCost(0.01, 0.0, 0.0)
    long = SimRequest("long", 0.0, 8, 200, 200)
    shorts = [SimRequest(f"s{i}", 0.05 + i * 0.04, 8, 5, 5) for i in range(600)]
    cfg = ReplicaConfig(max_num_seqs=1, max_num_batched_tokens=64, cost=cost)
    finish = {}
    for factor in (0.0, 3.0):
        done = simulate([long, *shorts], cfg, lambda f=factor: NoisyTrailPolicy(
            sigma_initial=0.0, sigma_refined=0.0, tail_factor=f))
        finish[factor] = {r.request_id: r for r in done}
        assert len(done) == 601
    starved, bounded = finish[0.0]["long"], finish[3.0]["long"]
    bound_s = 3.0 * 200 * cost.step_time(1, 1)  # 3 x predicted service
    assert starved.finish_s > max(r.arrival_s for r in shorts)  # waited out the whole stream
    # overdue at its deadline, then served to the end without preemption (+ one short's run)
    assert bounded.finish_s <= bound_s + 200 * cost.step_time(1, 1) + 0.1
    assert bounded.finish_s < starved.finish_s / 3


def test_replay_block_calibration_recovers_the_blocks_own_step_cost():
    """`simulate replay --calibrate-blocks`: a block whose steps took 10 ms with one request
    decoding and 14 ms with two gives that cost back (prefill slope from the profile)."""
    import numpy as np

    from vllm_ext.sim.cli import _block_cost

    a = {"send_s": 0.0, "ttft_s": 0.0, "itl_s": [0.010] * 100 + [0.014] * 100, "error": None}
    b = {"send_s": 0.9, "ttft_s": 0.1, "itl_s": [0.014] * 100 + [0.010] * 100, "error": None}
    prefill = [(64, 1, 0.020), (128, 1, 0.030), (256, 1, 0.050)]
    cost, overhead = _block_cost([a, b], prefill)
    assert cost.step_time(1, 1) == pytest.approx(0.010, rel=0.02)
    assert cost.step_time(2, 2) == pytest.approx(0.014, rel=0.02)
    assert cost.per_token_s == pytest.approx(0.030 / 192, rel=1e-6)
    assert np.isfinite(overhead)
    with pytest.raises(SystemExit, match="fewer than two"):
        _block_cost([a], prefill)  # one request: one concurrency only


def test_replay_maps_same_server_blocks_to_their_trace_positions():
    from pathlib import Path

    from vllm_ext.sim.cli import _block_offset

    assert _block_offset(Path("trail@10.5.b3.jsonl"), 40) == 120
    assert _block_offset(Path("trail@10.5.b0.jsonl"), 40) == 0
    assert _block_offset(Path("trail@10.5.r2.jsonl"), 40) == 0  # a repeat: the whole trace


def test_replay_calibrate_from_takes_the_reference_configs_block_of_the_same_round(tmp_path):
    """`--calibrate-from fcfs`: a preempting policy's block is replayed at the step cost of the
    fcfs block of its round (whose gaps are steps only), not at its own (here 3x slower)."""
    from vllm_ext.sim.cli import _replay_cost

    def block(step: float) -> list[dict]:
        return [{"send_s": 0.0, "ttft_s": 0.0, "itl_s": [step] * 200, "error": None},
                {"send_s": 0.5, "ttft_s": 0.0, "itl_s": [step * 1.4] * 100, "error": None}]
    for name, step in (("fcfs", 0.010), ("trail", 0.030)):
        (tmp_path / f"{name}@8.5.b2.jsonl").write_text(
            "\n".join(json.dumps(r) for r in block(step)) + "\n")
    prefill = [(64, 1, 0.020), (128, 1, 0.030), (256, 1, 0.050)]
    own = block(0.030)
    path = tmp_path / "trail@8.5.b2.jsonl"
    cost_own, _ = _replay_cost(path, "trail", own, prefill, None, None)
    cost_ref, _ = _replay_cost(path, "trail", own, prefill, "fcfs", None)
    assert cost_own.step_time(1, 1) == pytest.approx(0.030, rel=0.02)
    assert cost_ref.step_time(1, 1) == pytest.approx(0.010, rel=0.02)
    assert _replay_cost(path, "trail", own, [], "fcfs", "the profile") == "the profile"
    with pytest.raises(SystemExit, match="no block file"):
        _replay_cost(tmp_path / "trail@8.5.b3.jsonl", "trail", own, prefill, "fcfs", None)
