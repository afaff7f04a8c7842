"""Benchmark harness pieces without a server: arrivals, traces, metrics, tables."""
import json
import time

import numpy as np
import pytest

from vllm_ext.bench.metrics import RequestRecord, summarize
from vllm_ext.bench.report import ratio_table
from vllm_ext.bench.workload import TraceError, arrival_times, parse_trace


@pytest.mark.parametrize("process, cv", [("poisson", 1.0), ("gamma", 0.5), ("gamma", 2.0)])
def test_arrival_rate_and_cv(process, cv):
    t = arrival_times(20000, rate=5.0, seed=1, process=process, cv=cv)
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert abs(gaps.mean() - 0.2) < 0.2 * 0.03
    assert abs(gaps.std() / gaps.mean() - cv) < 0.05 * cv


def test_arrivals_deterministic_per_seed():
    a = arrival_times(50, 2.0, seed=7)
    assert np.array_equal(a, arrival_times(50, 2.0, seed=7))
    assert not np.array_equal(a, arrival_times(50, 2.0, seed=8))


def test_trace_parsing_and_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"arrival_s": 1.5, "prompt": "b", "max_tokens": 4, "kind": "x"}\n\n'
                    '{"arrival_s": 0, "prompt": "a", "max_tokens": 8, "true_output_len": 3}\n')
    reqs = parse_trace(good)
    assert [r.prompt for r in reqs] == ["a", "b"] and reqs[0].true_output_len == 3
    assert reqs[1].meta == {"kind": "x"}
    for line, needle in [('{"arrival_s": 0, "prompt": "a"}', "max_tokens"),
                         ('{"arrival_s": -1, "prompt": "a", "max_tokens": 1}', "arrival_s"),
                         ("not json", "line"),
                         ('{"arrival_s": 0, "prompt": "a", "max_tokens": 0}', "max_tokens"),
                         ('[1, 2]', "not a JSON object")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"arrival_s": 0, "prompt": "ok", "max_tokens": 1}\n' + line + "\n")
        with pytest.raises(TraceError, match=f"bad.jsonl:2: .*({needle})"):
            parse_trace(bad)


def test_metrics_from_synthetic_timestamps():
    recs = []
    for i in range(4):
        r = RequestRecord(index=i, arrival_s=i, ttft_s=0.1 * (i + 1), e2el_s=1.0 + i,
                          output_tokens=11, prompt_tokens=5, itl_s=[0.05, 0.15])
        recs.append(r)
    recs.append(RequestRecord(index=9, arrival_s=9, error="HTTP 500"))
    s = summarize(recs, duration_s=10.0)
    assert s["completed"] == 4 and s["failed"] == 1
    assert s["mean_ttft_ms"] == pytest.approx(250.0)
    assert s["median_e2el_ms"] == pytest.approx(2500.0)
    # TPOT = (e2el - ttft) / (tokens - 1), averaged
    expected = np.mean([(1.0 + i - 0.1 * (i + 1)) / 10 for i in range(4)]) * 1000
    assert s["mean_tpot_ms"] == pytest.approx(expected)
    assert s["mean_itl_ms"] == pytest.approx(100.0)
    assert s["output_throughput"] == pytest.approx(4.4)
    json.dumps(s)


def test_ratio_table_against_baseline():
    rows = [{"config": "base", "rate": 1.0, "mean_e2el_ms": 200.0},
            {"config": "new", "rate": 1.0, "mean_e2el_ms": 100.0}]
    table = ratio_table(rows, "base")
    assert "(0.50x)" in table and "(1.00x)" in table


def test_mean_over_repeats_and_per_repeat_ratios():
    from vllm_ext.bench.report import mean_over_repeats

    rows = [{"config": c, "rate": 1.0, "repeat": r, "mean_e2el_ms": v}
            for c, r, v in [("base", 0, 100.0), ("new", 0, 110.0),
                            ("base", 1, 200.0), ("new", 1, 180.0)]]
    merged = {r["config"]: r for r in mean_over_repeats(rows)}
    assert merged["base"]["mean_e2el_ms"] == 150.0 and merged["new"]["mean_e2el_ms"] == 145.0
    per = ratio_table(rows, "base", by_repeat=True)
    assert "(1.10x)" in per and "(0.90x)" in per


def test_cpu_table_per_role_and_ratio():
    from vllm_ext.bench.cli import cpu_per_token_ms
    from vllm_ext.bench.report import cpu_table

    before = {"api": 1.0, "engine": 2.0, "worker": 3.0}
    after = {"api": 1.5, "engine": 3.0, "worker": 5.0}
    cost = cpu_per_token_ms(before, after, {"total_output_tokens": 1000})
    assert cost == pytest.approx({"cpu_api_ms_per_tok": 0.5, "cpu_engine_ms_per_tok": 1.0,
                                  "cpu_worker_ms_per_tok": 2.0})
    rows = [{"config": "base", "rate": 1.0, **cost},
            {"config": "new", "rate": 1.0, **{k: 1.1 * v for k, v in cost.items()}}]
    table = cpu_table(rows, "base")
    assert "3.500 (1.000x)" in table and "3.850 (1.100x)" in table
    assert cpu_table([{"config": "base", "rate": 1.0}], "base") == ""


def test_cpu_seconds_of_a_process_tree():
    import subprocess
    import sys

    from vllm_ext.bench.servers import cpu_seconds

    # a "server" whose child burns CPU, then both wait: the child's time counts as "api"
    code = ("import subprocess, sys; c = subprocess.Popen([sys.executable, '-c', "
            "'import time; sum(range(3 * 10**7)); print(1, flush=True); time.sleep(30)'], "
            "stdout=sys.stdout); c.wait()")
    root = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert root.stdout.readline().strip() == "1"
        used = cpu_seconds(root.pid)
        assert set(used) == {"api", "engine", "worker"}
        assert used["api"] > 0.2 and used["engine"] == used["worker"] == 0.0
    finally:
        import psutil

        for child in psutil.Process(root.pid).children(recursive=True):
            child.kill()
        root.wait()
    assert cpu_seconds(root.pid) == {"api": 0.0, "engine": 0.0, "worker": 0.0}  # gone


def test_goodput_tails_and_slowdown():
    from vllm_ext.bench.metrics import RequestRecord, parse_goodput, summarize

    recs = []
    for i, (ttft, e2e, n) in enumerate([(0.1, 1.0, 10), (0.5, 2.0, 10), (0.2, 5.0, 10),
                                        (0.05, 0.1, 1)]):
        recs.append(RequestRecord(index=i, arrival_s=0.0, ttft_s=ttft, e2el_s=e2e,
                                  output_tokens=n))
    recs.append(RequestRecord(index=4, arrival_s=0.0, error="HTTP 500"))
    slos = parse_goodput(["ttft:300", "e2el:2500"])
    assert slos == {"ttft": 300.0, "e2el": 2500.0}
    out = summarize(recs, 10.0, slos)
    # met: #0 (100 ms, 1 s) and #3 (1 token: TPOT counts as 0); not #1 (TTFT), #2 (e2e), #4 (failed)
    assert out["request_goodput"] == pytest.approx(2 / 10.0)
    assert out["goodput_fraction"] == pytest.approx(2 / 5)
    assert out["max_e2el_ms"] == pytest.approx(5000.0)
    assert out["p99_e2el_ms"] <= out["p99.9_e2el_ms"] <= out["max_e2el_ms"]
    # slowdown: e2e / (tokens x median TPOT); TPOTs 0.1, 0.1667, 0.5333 s -> median 1/6 s
    assert out["mean_slowdown"] == pytest.approx(np.mean([1.0 / (10 / 6), 2.0 / (10 / 6),
                                                          5.0 / (10 / 6), 0.1 / (1 / 6)]))
    assert "request_goodput" not in summarize(recs, 10.0)
    for bad in (["ttft"], ["p50:3"], ["e2el:-1"], ["tpot:x"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput(bad)


def test_length_latency_plot(tmp_path):
    from vllm_ext.bench.metrics import RequestRecord
    from vllm_ext.bench.report import plot_length_latency

    runs = {name: [RequestRecord(index=i, arrival_s=0.0, ttft_s=0.1, e2el_s=scale * (1 + i),
                                 output_tokens=10 * (1 + i)) for i in range(30)]
            for name, scale in (("fcfs", 1.0), ("trail", 0.5))}
    plot_length_latency(tmp_path / "by-length.png", runs)
    assert (tmp_path / "by-length.png").stat().st_size > 1000
    plot_length_latency(tmp_path / "empty.png", {"x": []})  # nothing to draw: no file, no error
    assert not (tmp_path / "empty.png").exists()


def test_serve_time_is_e2e_less_tool_time():
    recs = [RequestRecord(index=i, arrival_s=i, ttft_s=0.1, e2el_s=2.0 + i, output_tokens=5,
                          meta={"tool_s": 1.0 * i}) for i in range(3)]
    s = summarize(recs, duration_s=10.0)
    assert s["mean_serve_ms"] == pytest.approx(2000.0)  # e2e 2, 3, 4 s less tools 0, 1, 2 s
    assert s["mean_e2el_ms"] == pytest.approx(3000.0)
    assert "mean_serve_ms" not in summarize([RequestRecord(0, 0, ttft_s=0.1, e2el_s=1.0)], 1.0)


def test_tool_requests_carry_ext_tools():
    from vllm_ext.bench.loadgen import request_body
    from vllm_ext.bench.workload import testbed_requests

    reqs = testbed_requests(6, 2.0, seed=1, tools=True)
    assert {r.meta["kind"] for r in reqs} <= {"calc", "lookup"}
    body = request_body("m", reqs[0], send_true_len=False, ignore_eos=False)
    assert body["vllm_xargs"] == {"ext_tools": True}
    plain = testbed_requests(6, 2.0, seed=1)[0]
    assert "ext_tools" not in request_body("m", plain, True, False).get("vllm_xargs", {})


def test_mixed_tool_workload_runs_calls_only_for_tool_tasks():
    from vllm_ext.bench.loadgen import request_body
    from vllm_ext.bench.workload import testbed_requests

    reqs = testbed_requests(40, 2.0, seed=3, tools="mixed", kinds=["sort", "add", "lookup"])
    kinds = {r.meta["kind"] for r in reqs}
    assert kinds == {"sort", "add", "lookup"}
    for r in reqs:
        xargs = request_body("m", r, send_true_len=False, ignore_eos=False).get("vllm_xargs", {})
        assert xargs.get("ext_tools", False) is (r.meta["kind"] == "lookup")
    with pytest.raises(ValueError, match="mixed"):
        testbed_requests(4, 2.0, seed=3, tools="some")


def test_client_tool_workload_marks_tool_tasks_for_the_client_and_seeds_them():
    from vllm_ext.bench.loadgen import request_body
    from vllm_ext.bench.workload import testbed_requests

    reqs = testbed_requests(40, 2.0, seed=3, tools="client", kinds=["add", "lookup"],
                            client_latency="lookup=exp:0.5")
    for r in reqs:
        body = request_body("m", r, send_true_len=False, ignore_eos=False)
        assert "ext_tools" not in body.get("vllm_xargs", {})  # the server runs no calls
        assert ("client_tools" in r.meta) is (r.meta["kind"] == "lookup")
    seeds = [r.meta["client_tools"]["seed"] for r in reqs if "client_tools" in r.meta]
    assert len(set(seeds)) == len(seeds)  # each conversation draws its own tool times
    again = testbed_requests(40, 2.0, seed=3, tools="client", kinds=["add", "lookup"],
                             client_latency="lookup=exp:0.5")
    assert [r.meta for r in again] == [r.meta for r in reqs]  # same in every config


def test_conversation_runs_the_calls_between_turns_of_one_session():
    import asyncio

    from vllm_ext.bench.conversation import converse
    from vllm_ext.bench.metrics import RequestRecord

    sent = []
    replies = [("x<call>calc 1+2</call>", 5), ("answer: 3", 3)]

    async def send(body, rec):
        sent.append(body)
        text, tokens = replies[len(sent) - 1]
        rec.send_s, rec.ttft_s, rec.itl_s = time.perf_counter(), 0.01, [0.002] * (tokens - 1)
        await asyncio.sleep(0.01)
        rec.text, rec.output_tokens, rec.prompt_tokens, rec.e2el_s = text, tokens, 7, 0.01

    rec = RequestRecord(index=0, arrival_s=0.0)
    asyncio.run(converse(send, {"prompt": "P", "max_tokens": 64}, rec,
                         {"latency": "calc=0.2", "seed": 1}))
    assert len(sent) == 2 and sent[0]["session_id"] == sent[1]["session_id"]
    assert sent[0]["stop"] == ["</call>"] and sent[0]["include_stop_str_in_output"]
    assert sent[1]["prompt"] == "Px<call>calc 1+2</call><result>3</result>"
    assert sent[1]["max_tokens"] == 64 - 5
    assert rec.text == "x<call>calc 1+2</call><result>3</result>answer: 3"
    assert rec.output_tokens == 8 and rec.prompt_tokens == 7 and len(rec.itl_s) == 6
    assert rec.meta == {"tool_calls": 1, "tool_s": 0.2, "turns": 2}
    assert rec.e2el_s >= 0.2 + 0.02 and rec.ttft_s < 0.2  # the tool's time is in e2e

    async def failing(body, rec):
        rec.error = "HTTP 500: boom"

    bad = RequestRecord(index=1, arrival_s=0.0)
    asyncio.run(converse(failing, {"prompt": "P", "max_tokens": 64}, bad, {}))
    assert bad.error == "turn 0: HTTP 500: boom" and not bad.ok


def test_counters_parsed_by_label():
    from vllm_ext.bench.live import parse_counters

    text = "\n".join([
        '# TYPE vllm_ext_preemptions_total counter',
        'vllm_ext_preemptions_total{cause="policy"} 3.0',
        'vllm_ext_preemptions_total{cause="kv_pressure"} 1.0',
        '# TYPE vllm_ext_tool_pauses_total counter',
        'vllm_ext_tool_pauses_total{handling="preserve"} 5.0',
        'vllm_ext_tool_pauses_total{handling="discard"} 7.0',
        'vllm_ext_tool_pauses_total{handling="swap"} 2.0',
        '# TYPE vllm_ext_swap_tokens_loaded_total counter',
        'vllm_ext_swap_tokens_loaded_total 512.0', ""])
    got = parse_counters(text)
    assert (got["preemptions_policy"], got["preemptions_kv_pressure"]) == (3.0, 1.0)
    assert (got["tool_preserve"], got["tool_discard"], got["tool_swap"]) == (5.0, 7.0, 2.0)
    assert got["swap_tokens_loaded"] == 512.0
    assert got["probe_runs"] == 0.0


def test_multi_branch_configs_send_n_temperature_seed_and_their_xargs():
    from argparse import Namespace

    from vllm_ext.bench.cli import with_sampling
    from vllm_ext.bench.loadgen import request_body
    from vllm_ext.bench.same_server import live_settings
    from vllm_ext.bench.workload import testbed_requests

    live, xargs = live_settings("d", "--ext-branches duchess --ext-branch-tau 0.3 "
                                     "--ext-policy trail")
    assert live["policy"] == "trail"
    assert xargs == {"ext_branches": "duchess", "ext_branch_tau": 0.3}
    assert live_settings("sc", "--ext-branches sc")[1] == {"ext_branches": "sc"}
    reqs = testbed_requests(3, 2.0, 0, kinds=["add"])
    assert all(r.meta["kind"] == "add" and r.meta["answer"] for r in reqs)
    args = Namespace(n=4, temperature=1.0, seed=2)
    sent = [request_body("m", r, True, False) for r in with_sampling(args, reqs, xargs)]
    assert {b["n"] for b in sent} == {4} and {b["temperature"] for b in sent} == {1.0}
    assert len({b["seed"] for b in sent}) == 3  # per request, the same in every config
    assert all(b["vllm_xargs"]["ext_branches"] == "duchess" for b in sent)
    plain = request_body("m", with_sampling(Namespace(n=1, temperature=0.0, seed=0), reqs)[0],
                         True, False)
    assert plain["temperature"] == 0.0 and "n" not in plain
    with pytest.raises(SystemExit, match="--temperature"):
        with_sampling(Namespace(n=2, temperature=0.0, seed=0), reqs)


def test_accuracy_counts_failed_requests_as_wrong():
    recs = [RequestRecord(0, 0.0, e2el_s=1.0, ttft_s=0.5, text="x\nanswer: 12", meta={"answer": "12"}),
            RequestRecord(1, 0.1, e2el_s=1.0, ttft_s=0.5, text="answer: 3", meta={"answer": "4"}),
            RequestRecord(2, 0.2, error="HTTP 500", meta={"answer": "1"})]
    assert summarize(recs, 2.0)["accuracy"] == pytest.approx(1 / 3)
    assert "accuracy" not in summarize([RequestRecord(0, 0.0, e2el_s=1.0, ttft_s=0.5)], 1.0)


def test_side_by_side_runs_each_config_on_its_own_server_in_paired_rounds(tmp_path, monkeypatch):
    """--side-by-side: one server per config (its own flags), every round's block of a config
    goes to that config's server after a prefix-cache reset, the others' CPU is recorded."""
    import contextlib
    from argparse import Namespace

    from vllm_ext.bench import cli, live, same_server, servers
    from vllm_ext.bench.workload import testbed_requests

    started, resets, sent = [], [], []

    @contextlib.contextmanager
    def fake_server(kind, model, extra, log_path, env=None, **kw):
        server = servers.Server(f"http://fake/{len(started)}", 1000 + len(started))
        started.append((kind, extra.strip(), env, server.url))
        yield server

    def fake_measure(url, model, args, reqs):
        sent.append((url, [r.prompt for r in reqs]))
        return [], {"mean_e2el_ms": 100.0 if url.endswith("/0") else 50.0, "p99_e2el_ms": 1.0,
                    "failed": 0, "total_output_tokens": 10}

    monkeypatch.setattr(servers, "running_server", fake_server)
    monkeypatch.setattr(servers, "cpu_seconds", lambda pid: dict.fromkeys(servers.CPU_ROLES, 1.0))
    monkeypatch.setattr(cli, "measure_requests", fake_measure)
    monkeypatch.setattr(live, "scrape", lambda url: dict.fromkeys(live.COUNTERS.values(), 0.0))
    monkeypatch.setattr(live, "reset_prefix_cache", resets.append)
    monkeypatch.setattr(same_server.report, "plot_length_latency", lambda *a: None)
    args = Namespace(blocks=3, block_requests=4, seed=0, rates=[2.0], idle_gap=0.0,
                     server_args="--max-num-seqs 2", out=str(tmp_path), trace=None,
                     arrival="poisson", cv=1.0, max_tokens=64, tools=False, task_kinds=None,
                     client_tool_latency="", n=1, temperature=0.0, baseline="a")
    configs = [("a", "stock", ""), ("b", "ext", "--ext-kv-bits 4")]
    rows = []
    monkeypatch.setattr(same_server, "write_report", lambda a, r, o: rows.extend(r))
    same_server.run(args, configs, "m", lambda rate: testbed_requests(20, rate, 0),
                    side_by_side=True)
    assert [(k, e) for k, e, _, _ in started] == [("stock", "--max-num-seqs 2"),
                                                   ("ext", "--max-num-seqs 2 --ext-kv-bits 4")]
    assert all(env == {"VLLM_SERVER_DEV_MODE": "1"} for _, _, env, _ in started)
    assert [u for u, _ in sent] == resets and len(sent) == 6  # a reset before every block
    by_round = {}
    for row, (url, prompts) in zip(rows, sent):
        assert url.endswith("/0") == (row["config"] == "a")  # each config on its own server
        by_round.setdefault(row["round"], []).append(prompts)
        assert row["idle_cpu_s"] == 0.0
    assert all(p[0] == p[1] for p in by_round.values())  # same arrivals for both in a round
    assert by_round[0][0] != by_round[1][0]                 # fresh ones per round


def test_pooled_percentile_over_rounds_with_paired_ci(tmp_path):
    """pooled_table: the p99 over every request of a config's blocks (not the mean of
    per-block p99s) against the baseline's, CI from resampling rounds."""
    from vllm_ext.bench.paired import block_latencies, pooled_ratio, pooled_table

    rows = []
    for rnd in range(4):
        for config, e2e in (("base", [1.0] * 39 + [2.0]), ("slow", [1.0] * 39 + [4.0])):
            recs = [{"e2el_s": e + rnd, "ttft_s": 0.1, "error": None} for e in e2e]
            recs.append({"e2el_s": None, "ttft_s": None, "error": "HTTP 500"})
            (tmp_path / f"{config}@3.0.b{rnd}.jsonl").write_text(
                "\n".join(json.dumps(r) for r in recs) + "\n")
            rows.append({"config": config, "rate": 3.0, "round": rnd})
    blocks = block_latencies(tmp_path, rows)["e2el_s"]
    assert len(blocks[("slow", 3.0)]) == 4 and blocks[("slow", 3.0)][2].size == 40  # failed out
    pooled = np.concatenate(list(blocks[("slow", 3.0)].values()))
    res = pooled_ratio(blocks[("slow", 3.0)], blocks[("base", 3.0)], 99)
    assert res["value"] == pytest.approx(np.percentile(pooled, 99))
    assert res["ratio"] == pytest.approx(res["value"] / np.percentile(
        np.concatenate(list(blocks[("base", 3.0)].values())), 99))
    assert res["lo"] <= res["ratio"] <= res["hi"] and res["ratio"] > 1.0
    table = pooled_table(tmp_path, rows, "base")
    assert "p99_e2el pooled" in table and "slow" in table and "1.00x[1.00,1.00]" in table
    assert pooled_ratio({0: np.ones(3)}, {0: np.ones(3)}, 99) is None  # one round: no CI
    for f in tmp_path.glob("*.b*.jsonl"):  # back-to-back repeats: NAME@RATE.rK.jsonl
        f.rename(f.with_name(f.name.replace(".b", ".r")))
    repeats = [{**{k: v for k, v in r.items() if k != "round"}, "repeat": r["round"]}
               for r in rows]
    assert pooled_table(tmp_path, repeats, "base", unit="repeat") == table.replace(
        "rounds", "repeats")


def test_compare_checks_the_trace_before_starting_a_server(tmp_path, monkeypatch):
    """A missing trace file, or one too short for --blocks x --block-requests, is a CLI error
    naming it, raised before any server starts (not after minutes of start-up)."""
    from vllm_ext.bench import cli, servers

    def no_server(*a, **kw):
        raise AssertionError("a server was started")

    monkeypatch.setattr(servers, "running_server", no_server)
    base = ["compare", "--config", "a=ext:--ext-policy fcfs", "--baseline", "a", "--rates", "2",
            "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"--trace: .*missing@2.0.jsonl: cannot read"):
        cli.main(base + ["--same-server", "--trace", str(tmp_path / "missing@{rate}.jsonl")])
    with pytest.raises(SystemExit, match=r"--trace: .*missing@2.0.jsonl: cannot read"):
        cli.main(base + ["--trace", str(tmp_path / "missing@{rate}.jsonl")])  # back to back
    short = tmp_path / "short@2.0.jsonl"
    short.write_text('{"arrival_s": 0, "prompt": "a", "max_tokens": 4}\n' * 5)
    with pytest.raises(SystemExit, match="has 5 requests, fewer than --blocks x "
                                         "--block-requests = 6"):
        cli.main(base + ["--same-server", "--trace", str(tmp_path / "short@{rate}.jsonl"),
                         "--blocks", "3", "--block-requests", "2"])
