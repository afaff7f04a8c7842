"""Telemetry in small memory (vllm_ext/telemetry, docs/telemetry.md): the sketches' stated
bounds hold with the stated probability over seeds, fragment/replica merges are associative,
windows expire, metric names follow Prometheus conventions, bad query parameters get a 400.
No engine; well under a minute."""
import json
import math
import re
from collections import Counter, deque
from types import SimpleNamespace

import numpy as np
import pytest

from vllm_ext.config import ExtConfig, ExtConfigError
from vllm_ext.telemetry.collect import ExpertTelemetry, PrefixTelemetry, TenantTelemetry
from vllm_ext.telemetry.export import Query, TelemetryQueryError, merge_payloads, parse_query
from vllm_ext.telemetry.fragments import FragmentedSketch
from vllm_ext.telemetry.learned import LearnedWindow
from vllm_ext.telemetry.sketch import Sketch, cs_failure_probability, width_for
from vllm_ext.telemetry.wcss import WindowSpaceSaving


def zipf(n, seed, a=1.1, universe=5000):
    rng = np.random.default_rng(seed)
    return (rng.zipf(a, n) % universe).astype(np.uint64)


def fed(kind, seed, n=4000, depth=4):
    """A fragmented sketch fed over time with a budget that changes (fragments of different
    widths), and the exact counts."""
    x = zipf(n, seed)
    fs = FragmentedSketch(kind=kind, depth=depth, budget_bytes=1 << 16, fragment_bytes=2048,
                          rho=3.0, epoch_s=1e9, seed=seed)
    for i in range(0, n, 250):
        fs.fragment_bytes = [2048, 512, 1024, 256][(i // 250) % 4]
        fs.add(x[i:i + 250], now=float(i))
    return fs, x


# ---- bounds with the stated probability ------------------------------------------------------
def test_count_min_bound_holds_with_stated_probability_over_seeds():
    fails = trials = 0
    for seed in range(30):
        fs, x = fed("cm", seed)
        keys, true = np.unique(x, return_counts=True)
        est = fs.estimate(keys, now=1e6)
        assert len({f.sketch.width for f in fs.all_fragments()}) > 1  # heterogeneous sizes
        assert (est.values >= true).all()  # never below the truth
        fails += int((est.values - true > est.bound).sum())
        trials += keys.size
    delta = math.exp(-4)
    assert fails / trials <= delta + 3 * math.sqrt(delta / trials)


def test_count_sketch_bound_holds_with_stated_probability_over_seeds():
    fails = trials = 0
    for seed in range(30):
        fs, x = fed("cs", seed, depth=5)
        keys, true = np.unique(x, return_counts=True)
        est = fs.estimate(keys, now=1e6, f2=float((true.astype(float) ** 2).sum()))
        fails += int((np.abs(est.values - true) > est.bound).sum())
        trials += keys.size
    delta = cs_failure_probability(5)
    assert 0 < delta < 0.25
    assert fails / trials <= delta + 3 * math.sqrt(delta / trials)


def test_a_wrong_bound_would_fail():  # the property tests can fail: a 10x tighter bound does
    fs, x = fed("cm", 0)
    keys, true = np.unique(x, return_counts=True)
    est = fs.estimate(keys, now=1e6)
    assert ((est.values - true) > est.bound / 10).mean() > math.exp(-4)


def test_fold_is_exact_and_widths_come_from_the_budget():
    x = zipf(2000, 3)
    wide, narrow = Sketch("cs", 3, 256, seed=9), Sketch("cs", 3, 64, seed=9)
    wide.add(x)
    narrow.add(x)
    assert (wide.fold(64).counters == narrow.counters).all()
    assert width_for(4 * 4 * 256, 4) == 256 and width_for(4 * 4 * 300, 4) == 256


def test_per_request_path_matches_the_vectorised_one():
    from vllm_ext.telemetry.hashing import key_of, mix64, splitmix64

    keys = zipf(300, 5)
    assert [int(v) for v in splitmix64(keys[:20])] == [mix64(int(k)) for k in keys[:20]]
    assert key_of(b"\x07" * 32) == int.from_bytes(b"\x07" * 8, "little")
    for kind in ("cm", "cs"):
        whole, pieces = Sketch(kind, 4, 128, seed=2), Sketch(kind, 4, 128, seed=2)
        whole.add(keys)  # numpy path
        for i in range(0, keys.size, 3):
            pieces.add(keys[i:i + 3])  # the small-batch Python path
        assert (whole.counters == pieces.counters).all() and whole.items == pieces.items


def test_error_equalisation_closes_fragments_at_equal_load_per_counter():
    fs = FragmentedSketch(budget_bytes=1 << 16, fragment_bytes=1024, rho=2.0, epoch_s=1e9)
    for i, size in enumerate([1024, 256, 4096]):
        fs.fragment_bytes = size
        fs.add(zipf(3 * 2 * (size // 16), i), now=float(i))
    for f in fs.fragments:
        assert f.sketch.items == 2 * f.sketch.width  # rho x width, whatever the size


# ---- merging ----------------------------------------------------------------------------------
def _nodes():
    out = []
    for n in range(3):
        fs = FragmentedSketch(budget_bytes=1 << 15, fragment_bytes=[2048, 512, 1024][n],
                              rho=2.0, epoch_s=50.0, node=f"n{n}")
        x = zipf(3000, 10 + n)
        for i in range(0, 3000, 100):
            fs.add(x[i:i + 100], now=float(i) / 10)
        out.append(fs)
    return out


def test_replica_merge_is_associative_commutative_and_idempotent():
    a, b, c = _nodes()
    keys = np.arange(1, 60, dtype=np.uint64)
    left = a.merge(b).merge(c)
    right = a.merge(b.merge(c))
    swapped = c.merge(a).merge(b)
    for other in (right, swapped, left.merge(left), left.merge(b)):
        assert [(f.node, f.seq) for f in other.fragments] == \
            [(f.node, f.seq) for f in left.fragments]
        assert np.array_equal(other.estimate(keys, 0, 200, now=400).values,
                              left.estimate(keys, 0, 200, now=400).values)
    # the merged estimate is the sum over the replicas' own estimates (CM: per-fragment minima)
    total = sum(s.estimate(keys, 0, 200, now=400).values for s in (a, b, c))
    assert np.array_equal(left.estimate(keys, 0, 200, now=400).values, total)


def test_payload_merge_is_associative_through_json():
    def payload(fs, name):
        rows = [{"prefix": f"{k:016x}", "blocks": 2, "window_count": int(k), "range_count": 0.0}
                for k in (1, 2, 3 + len(name))]
        return json.loads(json.dumps({"node": name, "time": 400.0, "servers": 1, "prefixes": {
            "top": rows, "requests": 10, "range_s": 300.0, "range_bound": 1.0,
            "fragments": fs.to_dict()}, "tenants": {"requests": 5, "top": [
                {"tenant": "t1", "window_count": 3}, {"tenant": name, "window_count": 1}]}}))
    a, b, c = (payload(fs, n) for fs, n in zip(_nodes(), ("a", "bb", "ccc")))
    left = merge_payloads([merge_payloads([a, b]), c])
    right = merge_payloads([a, merge_payloads([b, c])])
    assert left == right == merge_payloads([c, b, a])
    assert left["servers"] == 3 and left["tenants"]["top"][0] == {"tenant": "t1",
                                                                  "window_count": 9}
    assert all(r["range_count"] > 0 for r in left["prefixes"]["top"])


# ---- windows ----------------------------------------------------------------------------------
def test_wcss_within_its_bound_and_expires():
    W, k = 512, 32
    for summary in (WindowSpaceSaving(W, k), LearnedWindow(W, k, threshold=0.5, warmup=16)):
        x = zipf(5000, 4).tolist()
        window, exact = deque(), Counter()
        for i, v in enumerate(x):
            summary.add(v)
            window.append(v)
            exact[v] += 1
            if len(window) > W:
                old = window.popleft()
                exact[old] -= 1
            if i % 250 == 0:
                for key in set(exact) | summary.wcss.keys() if hasattr(summary, "wcss") else \
                        set(exact) | summary.keys():
                    assert abs(summary.query(key) - exact[key]) <= summary.error_bound()
        for j in range(W + 1):  # W arrivals of other items: the old ones leave the window
            summary.add(10 ** 9 + j)
        assert summary.query(1) <= summary.error_bound() - W // k * 0 and summary.query(1) < 20


def test_bloom_guard_limits_a_wrong_filter_to_two_undercounts_per_window():
    lw = LearnedWindow(window=256, counters=64, threshold=1.1, warmup=0)  # filters everything
    for i in range(1024):
        lw.add(7 if i % 4 == 0 else 1000 + i)
    assert lw.filtered > 0 and lw.guarded > 0
    assert 64 - lw.query(7) <= 2 + lw.wcss.error_bound()  # 64 arrivals of 7 in the window
    assert lw.query(7) >= 64 - 2 - lw.wcss.error_bound()


def test_fragment_budget_and_epoch_expire_old_data():
    fs = FragmentedSketch(budget_bytes=4 * 4 * 64 * 3, fragment_bytes=4 * 4 * 64, rho=100.0,
                          epoch_s=10.0)
    for t in range(0, 100, 5):
        fs.add([1, 2, 3], now=float(t))
    assert fs.memory_bytes <= fs.budget_bytes and fs.dropped > 0
    est = fs.estimate([1], now=100.0)
    assert est.start >= 70.0  # only the last sub-epochs are left
    assert fs.estimate([1], 0, 50, now=100.0).fragments == 0


def test_learned_filter_learns_singletons():
    lw = LearnedWindow(window=256, counters=32, threshold=0.5, warmup=32)
    rng = np.random.default_rng(0)
    for i in range(6000):
        lw.add(int(rng.integers(0, 8)) if i % 2 else 10 ** 6 + i)  # hot 0..7 and one-offs
    assert lw.filtered > 1000  # most one-offs never reach the counters
    assert all(abs(lw.query(k) - 16) <= lw.error_bound() for k in range(8))


# ---- collectors -------------------------------------------------------------------------------
def _cfg(**kw):
    return ExtConfig(telemetry=True, telemetry_window=64, **{"telemetry_learned": True, **kw})


def test_prefix_and_tenant_and_expert_collectors():
    pre = PrefixTelemetry(_cfg(telemetry_epoch_s=1e6), node="n0")
    for i in range(200):
        hashes = [bytes([i % 3]) * 32, bytes([i % 3, 1]) * 16, bytes([i]) * 32]
        pre.on_request(hashes, 50, now=float(i))
    pre.on_request([], 3, now=200.0)
    rep = pre.report(top_k=3, range_s=1000.0, full=True, now=201.0)
    assert rep["unhashed"] == 1 and rep["requests"] == 201 and len(rep["top"]) == 3
    assert {r["blocks"] for r in rep["top"]} == {3}
    assert sum(r["window_count"] for r in rep["top"]) <= 64 + 3 * rep["tracker"]["error_bound"]
    assert FragmentedSketch.from_dict(rep["fragments"]).items == 600
    ten = TenantTelemetry(_cfg())
    for i in range(100):
        ten.on_request("big" if i % 2 else f"u{i}")
    assert ten.report(2)["top"][0]["tenant"] == "big"
    exp = ExpertTelemetry(_cfg(), node="n0")
    exp.feed([{"layers": [{"layer": "l0", "device_tokens": [10, 0, 5]}]}], now=0.0)
    exp.feed([{"layers": [{"layer": "l0", "device_tokens": [30, 4, 5]}]}], now=100.0)
    win = exp.windows([50.0, 1000.0], now=100.0)
    assert win["1000"]["layers"]["l0"][0] >= 30 and win["50"]["layers"]["l0"][0] >= 20
    assert win["50"]["layers"]["l0"][0] <= 20 + win["50"]["bound"]


def test_collector_takes_the_engines_closed_fragments_and_answers_the_same():
    from vllm_ext.telemetry.collect import PrefixHistory

    cfg = _cfg(telemetry_prefix_bytes=4096, telemetry_epoch_s=5.0)
    engine, reference = PrefixTelemetry(cfg, node="e"), PrefixTelemetry(
        _cfg(telemetry_prefix_bytes=1 << 20, telemetry_epoch_s=5.0), node="e")
    history = PrefixHistory(cfg)
    hashes = [bytes([i % 5]) * 32 for i in range(300)]
    for i, h in enumerate(hashes):
        for tel in (engine, reference):
            tel.on_request([h], 20, now=float(i) / 3)
        if i % 20 == 19:  # a pull every 20 requests (about 7 s: one or two fragments closed)
            history.absorb(engine.report(5, 1e6, False, True, now=float(i) / 3), 1e6, False)
    assert engine.sketch.memory_bytes <= 4096 and engine.sketch.dropped == 0
    assert len(history.fragments) > 3 and not engine.sketch.fragments  # the history moved
    got = history.absorb(engine.report(5, 1e6, False, True, now=100.0), 1e6, True)
    ref = reference.report(5, 1e6, now=100.0)
    truth = Counter(int.from_bytes(h[-8:], "little") for h in hashes)
    for row in got["top"]:
        assert row["range_count"] >= truth[int(row["prefix"], 16)]  # CM: never under
        assert row["range_count"] <= truth[int(row["prefix"], 16)] + got["range_bound"]
    assert {r["prefix"] for r in got["top"]} == {r["prefix"] for r in ref["top"]}
    assert FragmentedSketch.from_dict(got["fragments"]).items == 300
    small = PrefixHistory(_cfg(telemetry_history_bytes=4096))
    small.absorb(engine.report(5, 1e6, False, True, now=101.0), 1e6, False)
    assert small.memory_bytes <= 4096


# ---- config, flags, query parameters ------------------------------------------------------------
def test_flags_and_config():
    from vllm_ext.cli import ext_arg_parser, ext_config_from_args

    ns, _ = ext_arg_parser().parse_known_args(
        ["--ext-telemetry", "--ext-telemetry-prefix-bytes", "4096", "--ext-telemetry-sketch",
         "cs", "--ext-telemetry-learned", "--ext-telemetry-hot-prefix", "3"])
    cfg = ext_config_from_args(ns)
    assert (cfg.telemetry, cfg.telemetry_prefix_bytes, cfg.telemetry_sketch,
            cfg.telemetry_learned, cfg.telemetry_hot_prefix, cfg.moe_track_load) == \
        (True, 4096, "cs", True, 3, False)  # expert counters stay opt-in (they cost per step)
    assert ExtConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ExtConfigError, match="--ext-telemetry-prefix-bytes"):
        ExtConfig(telemetry_prefix_bytes=10)
    with pytest.raises(ExtConfigError, match="--ext-telemetry-sketch"):
        ExtConfig(telemetry_sketch="hll")


@pytest.mark.parametrize("params, message", [
    ({"top_k": "0"}, "top_k"), ({"top_k": "x"}, "top_k"), ({"range_s": "-1"}, "range_s"),
    ({"range_s": "nan"}, "range_s"), ({"windows": "1,a"}, "windows"),
    ({"windows": ",".join(["1"] * 9)}, "windows"), ({"fragments": "maybe"}, "fragments"),
    ({"bogus": "1"}, "bogus")])
def test_bad_query_parameters(params, message):
    with pytest.raises(TelemetryQueryError, match=message):
        parse_query(params)


def test_good_query_parameters():
    assert parse_query({}) == Query()
    assert parse_query({"top_k": "5", "windows": "30, 600", "fragments": "1"}) == \
        Query(top_k=5, windows=(30.0, 600.0), fragments=True)


# ---- Prometheus names -------------------------------------------------------------------------
def _snapshot():
    pre = PrefixTelemetry(_cfg(), node="n0")
    for i in range(50):
        pre.on_request([bytes([i % 2]) * 32, bytes([i]) * 32], 40)
    ten = TenantTelemetry(_cfg())
    ten.on_request("alice")
    exp = ExpertTelemetry(_cfg())
    exp.feed([{"layers": [{"layer": "model.layers.0.mlp", "device_tokens": [3, 1]}]}])
    return {"prefixes": {**pre.report(5, 60.0), "engine_cost": {"seconds": 0.5, "calls": 50}},
            "tenants": ten.report(5), "experts": {
        "windows": exp.windows([60.0]), "memory_bytes": exp.sketch.memory_bytes,
        "budget_bytes": exp.sketch.budget_bytes, "fragments": 1, "dropped": 0,
        "items": exp.sketch.items}}


def test_metric_names_and_types_follow_prometheus_conventions():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from vllm_ext.server.metrics import ExtCollector

    collector = ExtCollector()  # the project's collector on vLLM's registry, here a fresh one
    collector.snapshot = {"telemetry": _snapshot()}
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert parsed, text
    for name, fam in parsed.items():
        assert re.fullmatch(r"vllm_ext_telemetry_[a-z][a-z0-9_]*", name), name
        assert fam.documentation and fam.type in ("counter", "gauge"), name
        if fam.type == "counter":
            assert all(s.name == name + "_total" for s in fam.samples), name
        else:
            assert not name.endswith("_total"), name
        assert all(re.fullmatch(r"[a-z_]+", label) for s in fam.samples for label in s.labels)
    assert parsed["vllm_ext_telemetry_memory_bytes"].type == "gauge"
    assert parsed["vllm_ext_telemetry_items"].type == "counter"
    structures = {s.labels["structure"] for s in parsed["vllm_ext_telemetry_memory_bytes"].samples}
    assert structures == {"prefix_sketch", "prefix_topk", "expert_sketch", "tenant_topk"}
    assert len(parsed["vllm_ext_telemetry_top_prefix_requests"].samples) <= 5  # bounded labels
    assert len(text.splitlines()) == len(set(text.splitlines()))


# ---- the route on vLLM's own app, no engine --------------------------------------------------
class _Engine:
    """The scheduler side is the real one (`SchedulerTelemetry`, called as EngineCore's
    utility call would), only the transport is fake."""

    def __init__(self, telemetry: bool) -> None:
        from vllm_ext.telemetry.engine import SchedulerTelemetry

        cfg = _cfg(moe_track_load=True) if telemetry else ExtConfig()
        self.prefixes = SchedulerTelemetry(cfg)
        self.prefixes.on_request(SimpleNamespace(request_id="r0", block_hashes=[b"\x01" * 32],
                                                 num_prompt_tokens=20))
        self.engine_core = self
        self.vllm_config = SimpleNamespace(
            model_config=SimpleNamespace(model="tiny", hf_config=SimpleNamespace(
                num_local_experts=2)),
            scheduler_config=SimpleNamespace(scheduler_cls="PredictiveScheduler"),
            parallel_config=SimpleNamespace(worker_cls="ProbeWorker"),
            additional_config={"vllm_ext": cfg.to_dict()})

    async def call_utility_async(self, _utility, method, args):
        assert method == "ext_telemetry_report"
        return json.loads(json.dumps(self.prefixes.report(*args)))  # as it crosses the IPC

    async def collective_rpc(self, method, args=(), kwargs=None):
        assert method == "ext_expert_load" and kwargs == {"ep_devices": 2}
        return [{"layers": [{"layer": "l0", "device_tokens": [5, 2]}]}]


def _client(monkeypatch, telemetry: bool):
    from fastapi.testclient import TestClient
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_ext.telemetry import hub

    hub.reset()
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    argv = ["--model", "tiny", "--middleware", "vllm_ext.server.middleware.ExtMiddleware"]
    app = build_app(make_arg_parser(FlexibleArgumentParser()).parse_args(argv),
                    supported_tasks=("generate",))
    app.state.log_stats = False
    app.state.engine_client = _Engine(telemetry)
    return TestClient(app)


def test_route_answers_and_bad_parameters_get_400(monkeypatch):
    with _client(monkeypatch, True) as client:
        ok = client.get("/v1/ext/telemetry?top_k=3&windows=60,600")
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["prefixes"]["top"][0]["window_count"] == 1
        assert set(body["experts"]["windows"]) == {"60", "600"}
        assert body["experts"]["windows"]["60"]["layers"]["l0"][0] >= 5
        for bad in ("top_k=1000", "range_s=abc", "windows=", "x=1", "top_k=1&top_k=2"):
            r = client.get(f"/v1/ext/telemetry?{bad}")
            assert r.status_code == 400, bad
            assert r.json()["error"]["message"]
        assert "/v1/ext/telemetry" in client.get("/openapi.json").json()["paths"]
    with _client(monkeypatch, False) as client:
        r = client.get("/v1/ext/telemetry")
        assert r.status_code == 404 and "--ext-telemetry" in r.json()["error"]["message"]
    from vllm_ext.telemetry import hub
    hub.reset()


def test_merge_cli_on_files(tmp_path, capsys):
    from vllm_ext.telemetry.cli import main

    paths = []
    for n in range(2):
        pre = PrefixTelemetry(_cfg(), node=f"n{n}")
        for i in range(20):
            pre.on_request([bytes([i % 2]) * 32], 20, now=float(i))
        path = tmp_path / f"s{n}.json"
        path.write_text(json.dumps({"node": f"n{n}", "time": 20.0, "servers": 1,
                                    "prefixes": pre.report(5, 100.0, True, now=20.0)}))
        paths.append(str(path))
    main(["merge", *paths, "--top-k", "1"])
    out = json.loads(capsys.readouterr().out)
    assert out["servers"] == 2 and len(out["prefixes"]["top"]) == 1
    assert out["prefixes"]["top"][0]["window_count"] == 20
    assert 20 <= out["prefixes"]["top"][0]["range_count"] <= 20 + out["prefixes"]["range_bound"]


# ---- the scheduler side and its hot-prefix hint (fakes, no vLLM scheduler) -------------------
class _Pool:
    def __init__(self, cached):
        self.cached = cached

    def get_cached_block(self, block_hash, groups):
        return [object()] if block_hash in self.cached else None


def _fake_scheduler(cached):
    return SimpleNamespace(kv_cache_manager=SimpleNamespace(
        kv_cache_config=SimpleNamespace(kv_cache_groups=[0]), block_pool=_Pool(cached)))


def test_hot_prefix_hint_puts_hot_cached_requests_first_stably():
    from collections import deque

    from vllm_ext.telemetry.engine import SchedulerTelemetry

    assert SchedulerTelemetry.build(ExtConfig()) is None  # off: nothing runs
    tel = SchedulerTelemetry(_cfg(telemetry_hot_prefix=2, telemetry_prefix_blocks=1))
    hot_hash, cold_hash = b"\x01" * 32, b"\x02" * 32
    sched = _fake_scheduler({hot_hash})

    def req(i, h):
        return SimpleNamespace(request_id=f"r{i}", block_hashes=[h], num_prompt_tokens=16)

    waiting = deque()
    for i, h in enumerate([hot_hash, hot_hash, cold_hash, cold_hash, hot_hash, cold_hash,
                           hot_hash]):
        r = req(i, h)
        tel.on_request(r, sched)
        waiting.append(r)
    # r0, r1 were not hot yet (fewer than 2 earlier arrivals); r4, r6 are; cold_hash is hot by
    # count at r5 but not cached, so never hot
    tel.before_schedule(waiting)
    assert [r.request_id for r in waiting] == ["r4", "r6", "r0", "r1", "r2", "r3", "r5"]
    assert tel.report()["hot_prefix"]["reorders"] == 1
    tel.before_schedule(waiting)  # no arrival since: nothing moves
    assert tel.report()["hot_prefix"]["reorders"] == 1
    tel.forget("r4")
    assert tel.report()["hot_prefix"]["hot_waiting"] == 1


def test_a_telemetry_error_switches_it_off_instead_of_raising():
    from vllm_ext.telemetry.engine import SchedulerTelemetry

    tel = SchedulerTelemetry(_cfg())
    tel.on_request(SimpleNamespace(request_id="r0", block_hashes=None))  # no num_prompt_tokens
    assert tel.failed and "on_request" in tel.failed
    assert tel.report(5) == {"error": tel.failed}  # answered, not raised
    assert tel.on_request(SimpleNamespace(request_id="r1", block_hashes=[b"\x01" * 32],
                                          num_prompt_tokens=1)) is None


def test_engine_time_in_the_hooks_is_counted_and_exported():
    from vllm_ext.telemetry.engine import SchedulerTelemetry
    from vllm_ext.telemetry.export import families

    tel = SchedulerTelemetry(_cfg())
    for i in range(20):
        tel.on_request(SimpleNamespace(request_id=f"r{i}", block_hashes=[bytes([i]) * 32],
                                       num_prompt_tokens=16))
    tel.before_schedule([])
    cost = tel.report(5)["engine_cost"]
    assert cost["calls"] == 21 and cost["seconds"] > 0
    assert tel.report(5)["engine_cost"]["calls"] == 22  # the first report counted too
    fams = {f.name: f for f in families({"prefixes": tel.report(5)})}
    (sample,) = fams["vllm_ext_telemetry_engine_seconds"].samples
    assert sample.name == "vllm_ext_telemetry_engine_seconds_total" and sample.value >= cost["seconds"]


def test_hint_off_never_reorders():
    from collections import deque

    from vllm_ext.telemetry.engine import SchedulerTelemetry

    tel = SchedulerTelemetry(_cfg())
    sched = _fake_scheduler({b"\x01" * 32})
    waiting = deque()
    for i in range(6):
        r = SimpleNamespace(request_id=f"r{i}", block_hashes=[bytes([i % 2 + 1]) * 32],
                            num_prompt_tokens=16)
        tel.on_request(r, sched)
        waiting.append(r)
    tel.before_schedule(waiting)
    assert [r.request_id for r in waiting] == [f"r{i}" for i in range(6)]
    assert tel.report()["requests"] == 6


def test_hot_prefix_hint_starvation_bound():
    from collections import deque

    from vllm_ext.telemetry.engine import SchedulerTelemetry

    tel = SchedulerTelemetry(_cfg(telemetry_hot_prefix=1, telemetry_prefix_blocks=1,
                                  telemetry_hot_prefix_wait_steps=3))
    hot_hash = b"\x01" * 32
    sched = _fake_scheduler({hot_hash})
    waiting = deque()

    def arrive(i, h):
        r = SimpleNamespace(request_id=f"r{i}", block_hashes=[h], num_prompt_tokens=16)
        tel.on_request(r, sched)
        waiting.append(r)

    arrive(0, hot_hash)             # not hot yet (no earlier arrival)
    arrive(1, b"\x02" * 32)         # cold
    tel.before_schedule(waiting)    # step 1
    arrive(2, hot_hash)             # hot
    tel.before_schedule(waiting)    # step 2: hot first
    assert [r.request_id for r in waiting] == ["r2", "r0", "r1"]
    for _ in range(3):              # steps 3..5: r0, r1 (arrived at step 0) pass the bound
        arrive(len(waiting) + 10, hot_hash)
        tel.before_schedule(waiting)
    assert [r.request_id for r in waiting][:2] == ["r0", "r1"]  # overdue before every hot one
