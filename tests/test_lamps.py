"""LAMPS pure parts: the least-waste handling rule, the memory-time order, the tool registry
and the per-tool duration history (no engine)."""
import math

from dataclasses import replace

import pytest

from vllm_ext.sched.lamps import LampsPolicy, PauseCosts, choose_handling, waste
from vllm_ext.sched.policy import RequestView
from vllm_ext.tools.history import DurationHistory
from vllm_ext.tools.registry import Registry, ToolSpecError, parse_latencies, parse_latency


def test_waste_formulas():
    c = PauseCosts(context_tokens=100, call_s=2.0, recompute_s_per_token=0.001,
                   batch_tokens=300, swap_s_per_token=0.0005)
    assert waste("preserve", c) == pytest.approx(2.0 * 100)
    assert waste("discard", c) == pytest.approx(0.001 * 100 * (100 + 300))
    assert waste("swap", c) == pytest.approx(2 * 0.0005 * 100 * 300)
    assert waste("swap", PauseCosts(100, 2.0, 0.001)) == math.inf  # no swap tier
    with pytest.raises(ValueError, match="unknown handling"):
        waste("keep", c)


def test_choose_handling_by_call_length():
    # a long call: holding 100 tokens for 5 s costs more than a 0.1 s re-prefill
    assert choose_handling(PauseCosts(100, 5.0, 0.001, batch_tokens=0)) == "discard"
    # a short call: keep the KV
    assert choose_handling(PauseCosts(100, 0.01, 0.001, batch_tokens=0)) == "preserve"
    # the step cost is not known yet: nothing to price a recompute with
    assert choose_handling(PauseCosts(100, 5.0, 0.0)) == "preserve"
    # a cheap swap beats both when the batch is small
    assert choose_handling(PauseCosts(100, 5.0, 0.01, batch_tokens=10,
                                      swap_s_per_token=1e-5)) == "swap"


class FixedLengths:
    """remaining() from a table: a stand-in for the TRAIL predictor."""

    def __init__(self, table):
        self.table = table

    def remaining(self, view):
        return self.table[view.request_id]

    def calibrate(self, *_):
        pass


def view(rid, prompt=10, out=0, arrival=0.0, now=0.0, max_tokens=1000, priority=0):
    return RequestView(rid, arrival, prompt, out, max_tokens, now=now, priority=priority)


def test_memory_time_order_and_tool_users():
    pol = LampsPolicy(lengths=FixedLengths({"a": 10, "b": 100, "c": 10}))
    pol.calibrate(0.01, 1.0)
    a, b = view("a", prompt=50), view("b", prompt=5)
    assert pol.memory_time(a) == pytest.approx(50 * 10 + 10 * 10 / 2)
    assert pol.memory_time(b) == pytest.approx(5 * 100 + 100 * 100 / 2)
    assert pol.sort_key(a) < pol.sort_key(b)
    # a request known to call tools also holds memory through its (predicted) call
    c = view("c", prompt=50)
    base = pol.memory_time(c)
    pol.tool_users.add("c")
    pol.call_s = 2.0
    costs = PauseCosts(60, 2.0, 1.0 * 0.01)
    assert pol.memory_time(c) == pytest.approx(base + waste(choose_handling(costs), costs) / 0.01)
    # with a running batch and a cheap swap tier, the rank charges the swap (the least waste)
    pol.batch_tokens, pol.swap_s_per_token = 300, 1e-6
    costs = PauseCosts(60, 2.0, 1.0 * 0.01, 300, 1e-6)
    assert choose_handling(costs) == "swap"
    assert pol.memory_time(c) == pytest.approx(base + waste("swap", costs) / 0.01)
    pol.swap_s_per_token = None  # no tier: swap is never charged
    costs = PauseCosts(60, 2.0, 1.0 * 0.01, 300)
    assert pol.memory_time(c) == pytest.approx(
        base + min(waste("preserve", costs), waste("discard", costs)) / 0.01)
    assert pol.choose_victim(a, [b]) is None  # LAMPS orders admission only


def test_starvation_threshold_and_priority():
    pol = LampsPolicy(lengths=FixedLengths({"long": 500, "short": 1}), starvation_steps=100)
    pol.calibrate(0.01, 0.0)  # threshold: 100 steps x 0.01 s = 1 s of waiting
    long_early = view("long", arrival=0.0, now=0.5)
    short = view("short", arrival=0.4, now=0.5)
    assert pol.sort_key(short) < pol.sort_key(long_early)
    long_late, short_late = view("long", arrival=0.0, now=1.2), view("short", arrival=1.1, now=1.2)
    assert pol.sort_key(long_late) < pol.sort_key(short_late)  # waited past the threshold
    assert pol.overdue_at(long_late) == pytest.approx(1.0)
    urgent = view("long", arrival=0.0, now=0.5, priority=-1)
    assert pol.sort_key(urgent) < pol.sort_key(short)  # vLLM priority first
    # back from a tool call at 1.1 after arriving at 0.0: it counts from its return
    returned = replace(view("long", arrival=0.0, now=1.2), waiting_since=1.1)
    assert pol.overdue_at(returned) == pytest.approx(2.1)
    assert pol.sort_key(short_late) < pol.sort_key(returned)


def test_remaining_capped_by_max_tokens_without_predictor():
    pol = LampsPolicy(lengths=None)
    assert pol.remaining(view("x", out=30, max_tokens=100)) == 70


def test_latency_specs():
    assert parse_latency("0.5").mean == 0.5
    assert parse_latency("exp:2").kind == "exp"
    lat = parse_latency("uniform:1-3")
    assert (lat.a, lat.b, lat.mean) == (1.0, 3.0, 2.0)
    assert set(parse_latencies("calc=0.1, lookup=exp:1.5")) == {"calc", "lookup"}
    for bad in ("fast", "exp:x", "uniform:3-1", "-1"):
        with pytest.raises(ToolSpecError, match="--ext-tool-latency"):
            parse_latency(bad)
    with pytest.raises(ToolSpecError, match="NAME=LATENCY"):
        parse_latencies("calc")


def test_registry_builtins_extra_and_errors():
    reg = Registry.build("vllm_ext.tools.examples:TOOLS", "calc=0", seed=1)
    assert reg.tools["calc"]("6*7") == "42"
    assert reg.tools["lookup"]("nope").startswith("error")
    assert reg.tools["echo"]("hi") == "hi"
    assert reg.latency("calc") == 0 and reg.latency("lookup") == pytest.approx(0.8)
    assert reg.latency("unknown") == 0.0
    with pytest.raises(ToolSpecError, match="module:object"):
        Registry.build("no_colon")
    with pytest.raises(ToolSpecError, match="cannot load"):
        Registry.build("vllm_ext.tools.examples:MISSING")
    with pytest.raises(ToolSpecError, match="loopback"):
        Registry.build(http_base="http://example.com")


def test_exp_latency_mean_is_seeded():
    reg = Registry.build(latency="lookup=exp:1.0", seed=3)
    draws = [reg.latency("lookup") for _ in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(1.0, rel=0.08)
    again = Registry.build(latency="lookup=exp:1.0", seed=3)
    assert [again.latency("lookup") for _ in range(5)] == draws[:5]


def test_duration_history():
    h = DurationHistory(window=3, prior_s=1.5)
    assert h.predict("calc") == 1.5
    h.observe("calc", 0.1)
    assert h.predict("lookup") == pytest.approx(0.1)  # unseen tool: mean of all seen
    for s in (0.2, 0.3, 0.4):
        h.observe("calc", s)
    assert h.predict("calc") == pytest.approx(0.3)  # window keeps the last 3
    h.observe("lookup", 2.0)
    assert h.predict("lookup") == 2.0
    assert h.to_dict()["calc"]["calls_in_window"] == 3


class _FakeClient:
    """Just enough of an AsyncLLM for `ToolLoop`'s tool calls (no engine)."""

    def __init__(self):
        from vllm_ext.testbed.tokenizer import build_tokenizer

        self.renderer = type("R", (), {"tokenizer": build_tokenizer()})()

    def generate(self, *args, **kwargs):
        raise AssertionError("not used")


def test_tool_loop_turns_failures_into_results():
    import asyncio

    from vllm_ext.tools.loop import ToolLoop

    reg = Registry.build("vllm_ext.tools.examples:TOOLS", "calc=0")
    loop = ToolLoop(_FakeClient(), reg, timeout_s=0.2, max_calls=4)
    assert loop.close_id is not None  # the testbed tokenizer has a single </call> token

    async def calls():
        return [await loop._call_tool(name, arg) for name, arg in
                (("calc", "2+3"), ("fail", "x"), ("sleep", "2"), ("nope", ""))]

    (ok, e1), (failed, e2), (slow, e3), (unknown, e4) = asyncio.run(calls())
    assert (ok, e1) == ("5", False)
    assert e2 and failed.startswith("error: tool fail failed: RuntimeError")
    assert e3 and "timed out after 0.2s" in slow
    assert e4 and unknown == "error: unknown tool nope"


def test_tool_loop_refuses_what_it_cannot_serve():
    from vllm.sampling_params import SamplingParams

    from vllm_ext.tools.loop import ToolLoop

    loop = ToolLoop(_FakeClient(), Registry.build(), timeout_s=1, max_calls=4)
    loop.check(SamplingParams(max_tokens=10))
    for params in (SamplingParams(n=2), SamplingParams(stop=["x"]), SamplingParams(logprobs=1)):
        with pytest.raises(ValueError, match="ext_tools"):
            loop.check(params)
    loop.close_id = None
    with pytest.raises(ValueError, match="single </call>"):
        loop.check(SamplingParams())


def test_middleware_and_loop_refuse_from_one_list():
    from types import SimpleNamespace

    from vllm.sampling_params import SamplingParams

    from vllm_ext.server.middleware import BadExtArgs, check_tool_request
    from vllm_ext.tools.loop import UNSUPPORTED, ToolLoop, unsupported

    loop = ToolLoop(_FakeClient(), Registry.build(), timeout_s=1, max_calls=4)
    app = SimpleNamespace(state=SimpleNamespace(engine_client=SimpleNamespace(
        ext_tool_loop=loop, vllm_config=None)))
    for key, value in (("stop", ["x"]), ("n", 2), ("logprobs", 1)):
        assert key in UNSUPPORTED
        with pytest.raises(BadExtArgs) as http_error:
            check_tool_request(app, {key: value})
        with pytest.raises(ValueError) as loop_error:
            loop.check(SamplingParams(**{key: value}))
        assert str(http_error.value) == f"vllm_xargs.{loop_error.value}"
    assert unsupported({"n": 1, "stop": None, "logprobs": 0}) is None


def test_workers_load_the_length_probe_for_lamps():
    """lamps ranks on TRAIL's refined predictions: its workers must run the length probe
    even without an admin token (they did only for trail before)."""
    from transformers import AutoConfig

    from vllm_ext.config import ExtConfig
    from vllm_ext.probes.base import resolve_probe_paths
    from vllm_ext.testbed.model import default_model_path

    path = default_model_path()
    hf = AutoConfig.from_pretrained(path)
    for policy, expect in (("lamps", True), ("trail", True), ("fcfs", False), ("hrrn", False)):
        paths = resolve_probe_paths(ExtConfig(policy=policy), hf, path)
        assert bool(paths) == expect, policy
        assert all("length-" in p for p in paths)


def test_preempt_option_uses_the_estimators_limited_rule():
    """--ext-lamps-preempt: the ranked waiting head preempts by the length estimator's rule
    (TRAIL: shorter remaining than the victim's, victim early in its life); off: never."""
    from vllm_ext.sched.trail import LengthBins, TrailPolicy

    trail = TrailPolicy(bins=LengthBins((0.0, 100.0, 1000.0)), tail_factor=0.0)
    trail.prompt_pred.update({"short": 10.0, "long": 500.0, "late": 500.0})
    short, long_ = view("short"), view("long", out=20)
    late = view("late", out=450)  # past 0.8 x its first prediction: not preemptible
    assert LampsPolicy(lengths=trail).choose_victim(short, [long_]) is None  # the paper's LAMPS
    pol = LampsPolicy(lengths=trail, preempt=True)
    assert pol.choose_victim(short, [long_]).request_id == "long"
    assert pol.choose_victim(short, [late]) is None
    assert pol.choose_victim(long_, [view("short", out=1)]) is None  # not for a longer one
    assert LampsPolicy(lengths=None, preempt=True).choose_victim(short, [long_]) is None
