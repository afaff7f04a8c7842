"""Live configuration and measurement units (no engine): which settings may switch, the admin
route's checks, the cost-aware preemption rule, the step-cost fit, scheduler counters, paired
block ratios and their bootstrap intervals, and the EngineCore method vllm-ext adds."""
import inspect
import json

import numpy as np
import pytest

from vllm_ext.bench import paired
from vllm_ext.compat import changed_targets
from vllm_ext.config import LIVE_FIELDS, ExtConfig, ExtConfigError
from vllm_ext.sched.policy import OraclePolicy, RequestView
from vllm_ext.sched.stats import ERROR_BUCKETS, SchedStats
from vllm_ext.sched.step_cost import StepCostFit
from vllm_ext.server import admin


def test_live_changes_validate_and_refuse_fixed_settings():
    cfg = ExtConfig().with_live_changes({"policy": "trail", "probe_every": 16})
    assert (cfg.policy, cfg.probe_every) == ("trail", 16)
    with pytest.raises(ExtConfigError, match="kv_bits.*cannot change on a live server"):
        ExtConfig().with_live_changes({"kv_bits": 4})
    with pytest.raises(ExtConfigError, match="--ext-policy"):
        ExtConfig().with_live_changes({"policy": "nope"})
    with pytest.raises(ExtConfigError, match="--ext-probe-every"):
        ExtConfig().with_live_changes({"probe_every": 0})
    assert set(cfg.live_dict()) == set(LIVE_FIELDS)


def test_admin_token_checks():
    with pytest.raises(admin.AdminError) as off:
        admin.check_token({b"authorization": b"Bearer x"}, token="")
    assert off.value.status == 403
    for headers in ({}, {b"authorization": b"Bearer wrong"}, {b"authorization": b"sekret"}):
        with pytest.raises(admin.AdminError) as bad:
            admin.check_token(headers, token="sekret")
        assert bad.value.status == 401
    admin.check_token({b"authorization": b"Bearer sekret"}, token="sekret")


@pytest.mark.parametrize("body, message", [
    (b"not json", "not JSON"),
    (b'{"policy": "trail"}', "expected"),
    (b'{"config": {"kv_bits": 4}}', "cannot change on a live server"),
    (b'{"config": {"policy": "srtf"}}', "--ext-policy"),
    (b'{"config": {}, "drain": "yes"}', "drain must be true or false"),
    (b'{"config": {}, "drain_timeout_s": 0}', "drain_timeout_s"),
    (b'{"config": {}, "extra": 1}', "unknown field"),
])
def test_admin_request_rejects_bad_bodies(body, message):
    with pytest.raises(admin.AdminError, match=message) as err:
        admin.parse_request(body, ExtConfig())
    assert err.value.status == 400


def test_admin_request_accepts_live_change():
    cfg, options = admin.parse_request(
        json.dumps({"config": {"policy": "oracle"}, "drain": True}).encode(), ExtConfig())
    assert cfg.policy == "oracle" and options["drain"] and not options["reset_prefix_cache"]


def view(rid, prompt=10, out=0, true_len=None):
    return RequestView(rid, 0.0, prompt, out, 1000, 0, true_len)


def test_cost_aware_preemption_charges_the_victims_recompute():
    candidate = view("c", true_len=10)
    victim = view("v", prompt=100, out=100, true_len=250)  # 150 left, 200 tokens to recompute
    plain = OraclePolicy()
    assert plain.choose_victim(candidate, [victim]) is victim
    costly = OraclePolicy(recompute_steps_per_token=0.5)  # 200 tokens = 100 decode steps
    assert costly.recompute_cost(victim) == 100
    assert costly.choose_victim(candidate, [victim]) is victim        # 10 + 100 < 150
    costly.recompute_steps_per_token = 0.8                             # 10 + 160 >= 150
    assert costly.choose_victim(candidate, [victim]) is None


def test_step_cost_fit_recovers_a_linear_cost():
    fit = StepCostFit(min_samples=8, refit_every=1)
    assert fit.steps_per_token(2) == 0.0  # uncalibrated: margin-only rule
    rng = np.random.default_rng(0)
    for _ in range(64):
        tokens = int(rng.choice([2, 64, 128]))
        fit.add(tokens, 0.004 + 2e-5 * tokens)
    assert fit.base_s == pytest.approx(0.004, rel=1e-6)
    assert fit.per_token_s == pytest.approx(2e-5, rel=1e-6)
    assert fit.steps_per_token(2) == pytest.approx(2e-5 / (0.004 + 4e-5))
    fit.add(0, 1.0)  # idle or empty steps are not samples
    assert len(fit.samples) == 64


def test_sched_stats_histogram():
    stats = SchedStats()
    for err in (0, 4, 5, 600):
        stats.observe_error(err)
    stats.count_preemption("policy")
    d = stats.to_dict()
    assert d["error_counts"][0] == 2 and d["error_counts"][1] == 1 and d["error_counts"][-1] == 1
    assert len(d["error_counts"]) == len(ERROR_BUCKETS) + 1 and d["error_sum"] == 609
    assert d["preemptions"] == {"policy": 1, "kv_pressure": 0}
    with pytest.raises(KeyError):
        stats.count_preemption("cosmic-ray")


def test_block_order_first_round_given_then_shuffled():
    orders = paired.block_order(["a", "b", "c", "d"], 6, seed=1)
    assert orders[0] == ["a", "b", "c", "d"]
    assert all(sorted(o) == ["a", "b", "c", "d"] for o in orders)
    assert any(o != orders[0] for o in orders[1:])
    assert orders == paired.block_order(["a", "b", "c", "d"], 6, seed=1)


def rows_for(base, ratio_per_round):
    rows = []
    for rnd, (b, q) in enumerate(zip(base, ratio_per_round)):
        rows.append({"config": "base", "rate": 1.0, "round": rnd, "mean_e2el_ms": b})
        rows.append({"config": "x", "rate": 1.0, "round": rnd, "mean_e2el_ms": b * q})
    return rows


def test_paired_ratios_cancel_drift():
    # the machine's speed drifts 4x across rounds; the policy is 0.5x within every round
    rows = rows_for([1000, 4000, 2000, 800, 3000, 1500, 2500, 1200], [0.5] * 8)
    summary = paired.ratio_summary(rows, "base", "mean_e2el_ms", 1.0)["x"]
    assert summary["median"] == pytest.approx(0.5)
    assert summary["lo"] == pytest.approx(0.5) and summary["hi"] == pytest.approx(0.5)
    assert summary["mean_ratio"] == pytest.approx(0.5)


def test_bootstrap_ci_covers_the_median_and_narrows_with_less_spread():
    rng = np.random.default_rng(3)
    wide = rng.normal(0.6, 0.3, 12)
    narrow = rng.normal(0.6, 0.03, 12)
    lo_w, hi_w = paired.bootstrap_ci(wide)
    lo_n, hi_n = paired.bootstrap_ci(narrow)
    assert lo_w <= np.median(wide) <= hi_w and lo_n <= np.median(narrow) <= hi_n
    assert hi_n - lo_n < (hi_w - lo_w) / 3
    assert all(np.isnan(paired.bootstrap_ci([1.0])))


def test_ci_table_and_plot(tmp_path):
    rows = rows_for([1000, 1200, 900, 1100], [0.4, 0.6, 0.5, 0.55])
    table = paired.ci_table(rows, "base", metrics=("mean_e2el_ms",))
    assert "x" in table and "544 0.52x[" in table  # ratio of means 2175 / 4200
    paired.plot_paired(tmp_path / "p.png", rows, "base")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_engine_rpc_patch_targets_vllms_utility_dispatch():
    """Fails loudly if vLLM stops dispatching utilities by name or defines the method."""
    from vllm.v1.engine.core import EngineCore, EngineCoreProc

    from vllm_ext import engine_rpc

    source = inspect.getsource(EngineCoreProc._handle_client_request)
    assert "getattr(self, method_name)" in source
    assert not changed_targets(engine_rpc.VLLM_TARGETS), changed_targets(engine_rpc.VLLM_TARGETS)
    engine_rpc.install()
    assert EngineCore.ext_scheduler_call is engine_rpc.ext_scheduler_call

    class Core:
        scheduler = type("S", (), {"ext_ping": lambda self, x: x + 1})()
    assert engine_rpc.ext_scheduler_call(Core(), "ext_ping", [1]) == 2
    for bad in ("schedule", "ext_missing"):
        with pytest.raises(ValueError):
            engine_rpc.ext_scheduler_call(Core(), bad, [])


def test_scheduler_private_vllm_calls_are_unchanged():
    from vllm_ext.sched.scheduler import VLLM_TARGETS

    changed = changed_targets(VLLM_TARGETS)
    assert not changed, ("vLLM changed Scheduler methods PredictiveScheduler calls or "
                         "overrides; re-read them, then re-record VLLM_TARGETS:\n"
                         + "\n".join(changed))


def test_collector_renders_prometheus_families_with_types():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from vllm_ext.server.metrics import ExtCollector

    collector = ExtCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    assert generate_latest(registry) == b""  # nothing before the first refresh
    stats = SchedStats()
    stats.count_preemption("kv_pressure")
    for err in (3, 20, 700):
        stats.observe_error(err)
    collector.snapshot = {
        "scheduler": {**stats.to_dict(), "policy": "trail", "kv_bits": 4,
                      "step_cost": {"base_s": 0.008, "per_token_s": 6e-6}},
        "workers": [{"probe_runs": 3, "probe_seconds": 0.1}, {"probe_runs": 2, "probe_seconds": 0.2}],
        "expert_load": {"model.layers.0": 2.5}}
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert fams["vllm_ext_preemptions"].type == "counter"
    assert {s.labels["cause"]: s.value for s in fams["vllm_ext_preemptions"].samples
            if s.name.endswith("_total")} == {"policy": 0, "kv_pressure": 1}
    hist = {(s.name, s.labels.get("le")): s.value
            for s in fams["vllm_ext_prediction_abs_error_tokens"].samples}
    assert hist[("vllm_ext_prediction_abs_error_tokens_bucket", "4.0")] == 1
    assert hist[("vllm_ext_prediction_abs_error_tokens_bucket", "32.0")] == 2
    assert hist[("vllm_ext_prediction_abs_error_tokens_bucket", "+Inf")] == 3
    assert hist[("vllm_ext_prediction_abs_error_tokens_sum", None)] == 723
    assert fams["vllm_ext_probe_runs"].samples[0].value == 5  # summed over workers
    assert fams["vllm_ext_kv_cache_bits"].samples[0].value == 4
    assert {s.labels["term"] for s in fams["vllm_ext_step_cost_seconds"].samples} == {
        "base", "per_token"}
    assert fams["vllm_ext_expert_load_max_over_mean"].samples[0].value == 2.5


def test_scheduler_stats_payload_is_what_the_collector_reads():
    """ext_get_stats's payload: every field ExtCollector reads, from the real objects."""
    fit = StepCostFit()
    payload = {**SchedStats().to_dict(), "policy": "fcfs", "kv_bits": 16,
               "step_cost": fit.to_dict()}
    assert set(payload) >= {"preemptions", "error_buckets", "error_counts", "error_sum",
                            "policy_fallbacks", "policy", "kv_bits", "step_cost"}
    assert payload["step_cost"] == {"samples": 0, "base_s": None, "per_token_s": None}
    assert fit.step_s(2) == 0.0
