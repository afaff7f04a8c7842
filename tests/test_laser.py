"""LASER routing rule, load counters, load statistics and the vLLM patch (no engine needed).

* Crafted gates: peaked -> exactly vLLM's top-k; flat -> the least-loaded experts of the pool;
  weights renormalised as vLLM's `renormalize` flag says; always k distinct experts
  (hypothesis), and exact sequential greedy when a pass has <= `rounds` tokens.
* Eager == torch.compile on CPU, for the function and for the stateful `ExtRouting` module.
* The routing state on real vLLM router objects (CPURouter, FusedTopKRouter,
  GroupedTopKRouter), the load statistics against vLLM's own expert placement, and the patch:
  recorded vLLM signatures/sources, lazy install, topk engines untouched.
"""
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_ext.moe.laser import (LaserParams, group_limit, is_peaked, laser_route, laser_topk,
                                token_rounds)
from vllm_ext.moe.load_stats import expert_devices, load_report
from vllm_ext.moe.router import (ExpertLoad, ExtRouting, RouterSpec, attach_ext_routing,
                                 expert_loads, laser_params, layer_band, router_spec)

E, K = 8, 2
FLAT = LaserParams(eps_high=1.0, pool_threshold=1.0, pool_max=E, rounds=8)


def route(logits, load, params=FLAT, k=K, **kw):
    return laser_route(torch.as_tensor(logits, dtype=torch.float32), k,
                       torch.as_tensor(load, dtype=torch.float32), params, **kw)


# ---- the rule on crafted gates ------------------------------------------------------------------

def test_peaked_gate_gives_exactly_vllm_topk():
    from vllm.model_executor.layers.fused_moe.router.cpu_router import _softmax_topk

    torch.manual_seed(0)
    logits = torch.randn(16, E) * 4
    load = torch.rand(E) * 100  # any load: peaked tokens ignore it
    for renormalize in (True, False):
        r = route(logits, load, LaserParams(eps_high=0.0), renormalize=renormalize)
        w_ref, ids_ref = _softmax_topk(logits, K, renormalize)
        order = ids_ref.long().sort(dim=-1)
        ours = r.ids.long().sort(dim=-1)
        assert torch.equal(ours.values, order.values)
        torch.testing.assert_close(r.weights.gather(1, ours.indices),
                                   w_ref.gather(1, order.indices), rtol=1e-6, atol=1e-6)
        assert not r.flat.any() and not r.moved.any()


def test_flat_gate_picks_least_loaded_in_pool_ties_by_score():
    logits = torch.tensor([[0.05, 0.04, 0.03, 0.02, 0.01, 0.0, -0.01, -0.02]])
    load = torch.tensor([9.0, 9.0, 1.0, 5.0, 1.0, 0.0, 0.0, 0.0])
    r = route(logits, load, LaserParams(eps_high=1.0, pool_threshold=1.0, pool_max=5))
    assert r.ids.tolist() == [[2, 4]]  # pool = top-5; loads 1, 1 beat 5, 9, 9; 2 scores higher
    assert r.flat.tolist() == [True] and r.moved.tolist() == [True]


def test_pool_threshold_excludes_far_experts_even_if_idle():
    logits = torch.log(torch.tensor([[0.30, 0.28, 0.26, 0.04, 0.04, 0.04, 0.02, 0.02]]))
    load = torch.tensor([10.0, 10.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    r = route(logits, load, LaserParams(eps_high=1.0, pool_threshold=0.2, pool_max=8))
    assert set(r.ids[0].tolist()) <= {0, 1, 2}  # 0.04 is not within 20% of 0.30
    r = route(logits, load, LaserParams(eps_high=1.0, pool_threshold=0.2, pool_max=2))
    assert sorted(r.ids[0].tolist()) == [0, 1]  # pool capped at top-2 = top-k


def test_peakedness_tests():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert is_peaked(probs, 2, 0.9, 0.0).tolist() == [True, False]
    assert is_peaked(probs, 2, 0.95, 0.0).tolist() == [False, False]
    assert is_peaked(probs, 2, 1.0, 0.6).tolist() == [True, False]  # H/log4 ~ 0.58
    assert is_peaked(probs, 2, 1.0, 1.0).tolist() == [True, True]


@pytest.mark.parametrize("renormalize", [True, False])
def test_weights_follow_vllm_renormalize_semantics(renormalize):
    logits = torch.randn(5, E)
    r = route(logits, torch.arange(E, dtype=torch.float32), renormalize=renormalize)
    probs = torch.softmax(logits, dim=-1).gather(1, r.ids.long())
    expected = probs / probs.sum(-1, keepdim=True) if renormalize else probs
    torch.testing.assert_close(r.weights, expected)
    assert r.weights.dtype == torch.float32 and r.ids.dtype == torch.int32


def test_scaling_and_sigmoid_scoring():
    logits = torch.randn(3, E)
    r = route(logits, torch.zeros(E), scoring_func="sigmoid", renormalize=False,
              routed_scaling_factor=2.5)
    torch.testing.assert_close(r.weights, 2.5 * logits.sigmoid().gather(1, r.ids.long()))


def test_load_is_updated_within_the_pass():
    r = route(torch.zeros(4, E), torch.zeros(E))  # 4 identical flat tokens, 4 rounds of 1
    assert sorted(r.ids.flatten().tolist()) == list(range(E))  # each expert exactly once


def test_least_loaded_baseline_ignores_peakedness():
    logits = torch.tensor([[10.0, 9.0, 1, 1, 0, 0, 0, 0]])
    load = torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0])
    assert sorted(route(logits, load, LaserParams(eps_high=0.5)).ids[0].tolist()) == [0, 1]
    ll = LaserParams(mode="least_loaded", pool_max=4)
    assert sorted(route(logits, load, ll).ids[0].tolist()) == [2, 3]


def test_group_limit_keeps_best_groups_only():
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.05, 0.05, 0.8, 0.1]])
    limited = group_limit(scores, num_expert_group=4, topk_group=2)
    assert (limited > 0).tolist() == [[True, True, False, False, False, False, True, True]]
    r = route(torch.log(scores), torch.tensor([0.0, 9, 0, 0, 0, 0, 9, 9]), num_expert_group=4,
              topk_group=2)
    assert set(r.ids[0].tolist()) <= {0, 1, 6, 7}


def test_token_rounds_are_contiguous_and_cover_all_rounds():
    assert token_rounds(3, 8, torch.device("cpu")).tolist() == [0, 2, 5]
    assert token_rounds(10, 4, torch.device("cpu")).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    assert token_rounds(0, 4, torch.device("cpu")).tolist() == []


def sequential_reference(logits, k, load, params):
    """Token-by-token greedy: the exact rule the rounds approximate."""
    scores = torch.softmax(logits.float(), dim=-1)
    flat = ~is_peaked(scores, k, params.eps_high, params.entropy_max)
    load = load.clone().tolist()
    out = []
    for t in range(scores.shape[0]):
        s = scores[t].tolist()
        ranked = sorted(range(len(s)), key=lambda e: -s[e])[:min(max(params.pool_max or 2 * k, k), len(s))]
        pool = [e for i, e in enumerate(ranked)
                if i < k or (flat[t] and s[e] > 0 and s[e] >= (1 - params.pool_threshold) * s[ranked[0]])]
        chosen = sorted(pool, key=lambda e: (load[e], ranked.index(e)))[:k]
        for e in chosen:
            load[e] += 1
        out.append(sorted(chosen))
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), tokens=st.integers(1, 40), experts=st.sampled_from([4, 8, 16]),
       k=st.integers(1, 4), pool_max=st.integers(0, 16), rounds=st.integers(1, 16),
       eps=st.floats(0.0, 1.0), tau=st.floats(0.0, 1.0), scale=st.floats(0.1, 6.0),
       mode=st.sampled_from(["laser", "least_loaded"]), renormalize=st.booleans())
def test_properties(seed, tokens, experts, k, pool_max, rounds, eps, tau, scale, mode, renormalize):
    k = min(k, experts)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=gen) * scale
    load = torch.randint(0, 5, (experts,), generator=gen).float()
    params = LaserParams(mode=mode, eps_high=eps, pool_threshold=tau, pool_max=pool_max,
                         rounds=rounds)
    r = route(logits, load, params, k=k, renormalize=renormalize)
    ids = r.ids.long()
    assert ids.shape == (tokens, k)
    assert all(len(set(row)) == k for row in ids.tolist())  # k distinct, always
    assert ((ids >= 0) & (ids < experts)).all()
    assert (r.weights >= 0).all()
    if renormalize:
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(tokens))
    if mode == "laser":  # peaked tokens: exactly plain top-k
        topk = torch.softmax(logits, -1).topk(k, dim=-1).indices.sort(-1).values
        peaked = ~r.flat
        assert torch.equal(ids.sort(-1).values[peaked], topk[peaked])
        if tokens <= rounds:
            assert ids.sort(-1).values.tolist() == sequential_reference(logits, k, load, params)


# ---- eager == compiled ---------------------------------------------------------------------------

def test_compiled_function_matches_eager():
    torch._dynamo.reset()
    compiled = torch.compile(laser_topk, dynamic=True, fullgraph=True)
    params = LaserParams(eps_high=0.6, pool_threshold=0.5, pool_max=4, rounds=4)
    for tokens in (1, 7, 33):
        logits = torch.randn(tokens, E) * 2
        load = torch.rand(E) * 10
        w, ids = laser_topk(logits, K, load, params)
        cw, cids = compiled(logits, K, load, params)
        assert torch.equal(ids, cids)
        torch.testing.assert_close(w, cw, rtol=0, atol=1e-6)


def test_compiled_stateful_routing_matches_eager():
    torch._dynamo.reset()
    spec = RouterSpec(top_k=K, renormalize=True)
    params = LaserParams(eps_high=0.6, rounds=4)
    eager = ExtRouting(spec, params, ExpertLoad(E, decay=0.5))
    comp = ExtRouting(spec, params, ExpertLoad(E, decay=0.5))
    compiled = torch.compile(comp, dynamic=True, fullgraph=True)
    for tokens in (5, 1, 12, 3):  # the load window carries across steps
        logits = torch.randn(tokens, E)
        w, ids = eager(None, logits, None)
        cw, cids = compiled(None, logits, None)
        assert torch.equal(ids, cids)
        torch.testing.assert_close(w, cw, rtol=0, atol=1e-6)
    for name, buf in eager.load.named_buffers():
        torch.testing.assert_close(buf, dict(comp.load.named_buffers())[name])
    assert int(comp.load.steps) == 4 and float(comp.load.total.sum()) == 21 * K


# ---- counters and statistics ---------------------------------------------------------------------

def test_expert_load_counters():
    load = ExpertLoad(4, decay=0.5, history=2)
    load.record(torch.tensor([[0, 1], [0, 2]]))
    load.record(torch.tensor([[3, -1]]))  # -1 = padding, not counted
    load.record(torch.tensor([[0, 3]]))
    assert load.total.tolist() == [3, 1, 1, 2]
    assert load.window.tolist() == [0.5 + 1, 0.25, 0.25, 0.5 + 1]  # W = 0.5 W + counts
    snap = load.snapshot()
    assert snap["steps"] == 3 and snap["history"] == [[0, 0, 0, 1], [1, 0, 0, 1]]  # oldest first
    load.reset()
    assert float(load.total.sum()) == 0 and int(load.steps) == 0


@pytest.mark.parametrize("placement", ["linear", "round_robin"])
@pytest.mark.parametrize("experts, devices", [(8, 4), (10, 4), (64, 8), (3, 2)])
def test_expert_devices_match_vllm_placement(experts, devices, placement):
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    ours = expert_devices(experts, devices, placement)
    for rank in range(devices):
        _, expert_map, _ = determine_expert_map(devices, rank, experts, placement)
        assert [e for e in range(experts) if expert_map[e] >= 0] == \
            [e for e in range(experts) if ours[e] == rank]


def test_load_report_metrics():
    snap = {"total": [4.0, 2.0, 2.0, 0.0], "history": [[2, 2, 0, 0], [2, 0, 2, 0]], "steps": 2,
            "tokens": 4, "flat_tokens": 2, "moved_tokens": 1}
    layer = load_report({"l0": snap}, num_devices=2)["layers"][0]
    assert layer["max_over_mean"] == 2.0
    assert layer["cv"] == pytest.approx(math.sqrt(2) / 2)
    assert layer["step_max_over_mean"] == 2.0  # (2 + 2) / (1 + 1)
    assert layer["device_tokens"] == [6.0, 2.0]
    assert layer["device_max_over_mean"] == 1.5
    assert layer["device_step_max_over_mean"] == pytest.approx((4 + 2) / (2 + 2))
    assert (layer["flat_fraction"], layer["moved_fraction"]) == (0.5, 0.25)


# ---- vLLM's routers ------------------------------------------------------------------------------

class _Ext:  # the ExtConfig fields the router module reads
    moe_router, laser_eps_high, laser_entropy_max, laser_pool_threshold = "laser", 0.9, 0.0, 0.5
    laser_pool_max, laser_rounds, laser_load_decay, laser_bands = 0, 8, 0.5, {}


def _runner(router, name="model.layers.0.mlp.experts"):
    class MoEConfig:
        num_logical_experts = E

    class Runner:
        layer_name, moe_config = name, MoEConfig()
    runner = Runner()
    runner.router = router
    return runner


class _VllmConfig:
    model_config = None


def test_cpu_router_with_laser_and_with_tracked_topk():
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    logits = torch.randn(6, E)
    stock = CPURouter(top_k=K, global_num_experts=E).select_experts(torch.zeros(6, 4), logits)
    tracked = CPURouter(top_k=K, global_num_experts=E)
    ext = type("Ext", (_Ext,), {"moe_router": "topk"})
    attach_ext_routing(_runner(tracked), ext, _VllmConfig())
    out = tracked.select_experts(torch.zeros(6, 4), logits)
    assert torch.equal(out[0], stock[0]) and torch.equal(out[1], stock[1])  # vLLM's own math
    laser = CPURouter(top_k=K, global_num_experts=E)
    routing = attach_ext_routing(_runner(laser), _Ext, _VllmConfig())
    w, ids = laser.select_experts(torch.zeros(6, 4), logits)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and ids.is_contiguous()
    assert routing.params is not None and float(routing.load.total.sum()) == 6 * K
    assert set(expert_loads(torch.nn.ModuleList()).keys()) == set()


def test_router_specs_of_gpu_routers():
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import FusedTopKRouter
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import GroupedTopKRouter

    mixtral = router_spec(FusedTopKRouter(top_k=2, global_num_experts=8, renormalize=True), 8)
    assert mixtral == RouterSpec(top_k=2, renormalize=True)
    qwen = router_spec(FusedTopKRouter(top_k=4, global_num_experts=60, renormalize=False), 60)
    assert qwen == RouterSpec(top_k=4, renormalize=False)
    dsv2 = router_spec(GroupedTopKRouter(top_k=6, global_num_experts=160, num_expert_group=8,
                                         topk_group=3, renormalize=False,
                                         routed_scaling_factor=16.0), 160)
    assert dsv2 == RouterSpec(6, False, "softmax", 8, 3, 16.0)
    biased = GroupedTopKRouter(top_k=8, global_num_experts=256, num_expert_group=8, topk_group=4,
                               scoring_func="sigmoid", e_score_correction_bias=torch.zeros(256))
    assert "bias" in router_spec(biased, 256)
    custom = CPURouter(top_k=2, global_num_experts=8, custom_routing_function=lambda **kw: None)
    assert "custom" in router_spec(custom, 8)


def test_layer_bands_and_overrides():
    assert [layer_band(f"model.layers.{i}.mlp.experts", 12) for i in (0, 3, 4, 7, 8, 11)] == \
        ["early", "early", "middle", "middle", "late", "late"]
    assert layer_band("experts", 12) == "middle"
    ext = type("Ext", (_Ext,), {"laser_bands": {"late": {"eps_high": 0.5, "pool_max": 2}}})
    assert laser_params(ext, "late") == LaserParams(eps_high=0.5, pool_max=2)
    assert laser_params(ext, "early") == LaserParams()


# ---- the patch -----------------------------------------------------------------------------------

def test_patched_vllm_functions_are_unchanged():
    from vllm_ext.moe.patch import check_targets

    changed = check_targets()
    assert not changed, ("vLLM changed code vllm_ext.moe.patch relies on; re-read it, then "
                         "re-record TARGETS:\n" + "\n".join(changed))


def test_register_installs_lazily_and_cheaply():
    code = (
        "import sys, vllm_ext\n"
        "from vllm_ext.moe import patch\n"
        "vllm_ext.register()\n"
        "assert patch.RUNNER_MODULE not in sys.modules, 'register() imported the MoE runner'\n"
        "assert patch.is_installed()\n"
        "from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner\n"
        "assert hasattr(MoERunner.__init__, '__vllm_ext_original__')\n"
        "vllm_ext.register(); patch.install()\n"
        "orig = MoERunner.__init__.__vllm_ext_original__\n"
        "assert not hasattr(orig, '__vllm_ext_original__')  # wrapped once\n"
        "patch.uninstall(); assert MoERunner.__init__ is orig and not patch.is_installed()\n"
        "print('OK')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().endswith("OK"), out.stderr[-2000:]


def test_topk_engines_get_no_routing_state(monkeypatch):
    from vllm.config import VllmConfig, set_current_vllm_config

    from vllm_ext.moe import patch

    seen = []
    monkeypatch.setattr("vllm_ext.moe.router.attach_ext_routing", lambda *a: seen.append(a))
    for extra, attached in [({}, 0), ({"vllm_ext": {"moe_router": "topk"}}, 0),
                            ({"vllm_ext": {"moe_track_load": True}}, 1),
                            ({"vllm_ext": {"moe_router": "laser"}}, 2)]:
        with set_current_vllm_config(VllmConfig(additional_config=extra)):
            patch._after_moe_layer_built(object())
        assert len(seen) == attached


# ---- configuration -------------------------------------------------------------------------------

def test_cli_laser_flags_to_config():
    from vllm_ext.cli import ext_arg_parser, ext_config_from_args
    from vllm_ext.config import ExtConfig

    ns, _ = ext_arg_parser().parse_known_args([
        "--ext-moe-router", "laser", "--ext-laser-eps-high", "0.7", "--ext-moe-ep-devices", "8",
        "--ext-laser-bands", "late:pool_max=2,eps_high=0.5", "--ext-laser-bands", "early:rounds=4"])
    cfg = ext_config_from_args(ns)
    assert (cfg.moe_router, cfg.laser_eps_high, cfg.moe_ep_devices) == ("laser", 0.7, 8)
    assert cfg.laser_bands == {"late": {"pool_max": 2, "eps_high": 0.5}, "early": {"rounds": 4}}
    assert ExtConfig.from_dict(cfg.to_dict()) == cfg
    assert laser_params(cfg, "late") == LaserParams(eps_high=0.5, pool_max=2)
    assert ext_config_from_args(ext_arg_parser().parse_known_args([])[0]) == ExtConfig()


@pytest.mark.parametrize("argv, needle", [
    (["--ext-laser-bands", "late"], "--ext-laser-bands"),
    (["--ext-laser-bands", "first:eps_high=0.5"], "--ext-laser-bands.*first"),
    (["--ext-laser-bands", "late:eps=0.5"], "--ext-laser-bands.*eps"),
    (["--ext-laser-bands", "late:pool_max=1.5"], "--ext-laser-bands"),
    (["--ext-laser-pool-threshold", "1.5"], "--ext-laser-pool-threshold"),
    (["--ext-laser-load-decay", "1"], "--ext-laser-load-decay"),
    (["--ext-laser-rounds", "0"], "--ext-laser-rounds"),
    (["--ext-moe-ep-devices", "0"], "--ext-moe-ep-devices"),
])
def test_bad_laser_settings_name_the_flag(argv, needle):
    from vllm_ext.cli import ext_arg_parser, ext_config_from_args
    from vllm_ext.config import ExtConfigError

    with pytest.raises(ExtConfigError, match=needle):
        ext_config_from_args(ext_arg_parser().parse_known_args(argv)[0])
