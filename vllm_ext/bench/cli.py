"""`vllm-ext bench serve` and `vllm-ext bench compare`.

serve:   one open-loop run against a running server; JSONL + summary JSON + table + PNG.
compare: starts a server per configuration (ours with --ext-* flags, or stock vLLM), replays
         the identical seeded arrivals against each, back to back, at each rate; prints every
         metric with its ratio to the baseline configuration, writes a sweep plot.
         With --same-server: one server, configs switched live in paired blocks with
         bootstrap CIs (`vllm_ext.bench.same_server`); with --side-by-side the same paired
         blocks against one server per config, all kept up (settings that can't switch live).

Example (the README's policy figure):
  vllm-ext bench compare --config stock=stock: --config fcfs=ext:--ext-policy\\ fcfs \\
      --baseline stock --rates 4 8 --num-requests 200 --out results/overhead
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from vllm_ext.bench import report
from vllm_ext.bench.loadgen import run_load
from vllm_ext.bench.workload import TraceError, parse_trace, testbed_requests


def _workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", help="JSONL trace (arrival_s, prompt, max_tokens, ...); "
                   "'{rate}' in the path is replaced by each rate; default: the testbed "
                   "task suite at --rate")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--rate", type=float, default=4.0, help="mean arrivals per second")
    p.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    p.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: CV of the gaps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--tools", nargs="?", const="only", default=False,
                   choices=("only", "mixed", "client"),
                   help="testbed tool tasks, their calls run in the server (LAMPS): only them "
                   "(the default with a bare --tools), or 'mixed' with the other task kinds "
                   "(--task-kinds chooses and weights them); 'client': as mixed, but the "
                   "client runs the calls, one request per turn with a session_id "
                   "(--ext-session-keep)")
    p.add_argument("--client-tool-latency", default="", metavar="SPEC",
                   help="--tools client: tool latencies, --ext-tool-latency's syntax "
                   "(e.g. 'lookup=exp:1.5,calc=0.1'; default: the testbed's table)")
    p.add_argument("--task-kinds", type=lambda s: s.split(","), metavar="K1,K2",
                   help="testbed task kinds only (e.g. add,sub,mul,gcd,sort,count)")
    p.add_argument("--n", type=int, default=1,
                   help="completions per request (multi-branch with --ext-branches)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (> 0 for --n > 1)")
    p.add_argument("--warmup", type=int, default=0, help="leading requests left out of stats")
    p.add_argument("--duration", type=float, help="send only requests arriving before this (s)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--no-true-len", action="store_true",
                   help="do not send ext_true_output_len (e.g. to non-vLLM servers)")
    p.add_argument("--goodput", nargs="+", metavar="NAME:MS",
                   help="SLOs for goodput, as vLLM bench serve: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--out", default="results/bench", help="output folder")


def _requests(args, rate: float):
    if args.client_tool_latency:
        from vllm_ext.tools.registry import ToolSpecError, parse_latencies

        if args.tools != "client":
            sys.exit("vllm-ext bench: --client-tool-latency needs --tools client")
        try:
            parse_latencies(args.client_tool_latency)
        except ToolSpecError as exc:
            sys.exit(f"vllm-ext bench: --client-tool-latency: {exc}")
    if args.trace:
        try:
            return parse_trace(args.trace.replace("{rate}", str(rate)))
        except TraceError as exc:
            sys.exit(f"vllm-ext bench: --trace: {exc}")
    return with_sampling(args, testbed_requests(
        args.num_requests, rate, args.seed, args.arrival, args.cv, args.max_tokens,
        tools=args.tools, kinds=args.task_kinds, client_latency=args.client_tool_latency))


def with_sampling(args, reqs, xargs: dict | None = None):
    """`reqs` sent with --n / --temperature (seeded per request) and extra vllm_xargs."""
    from dataclasses import replace

    if args.n > 1 and args.temperature <= 0:
        sys.exit("vllm-ext bench: --n > 1 needs --temperature > 0 (vLLM refuses greedy n > 1)")
    sampling = {"n": args.n, "temperature": args.temperature} \
        if args.n > 1 or args.temperature > 0 else {}
    return [replace(r, meta={**r.meta, "sampling": {**sampling, "seed": args.seed * 100003 + i}
                             if sampling else {}, "xargs": xargs or {}})
            for i, r in enumerate(reqs)]


def _measure(base_url: str, model: str, args, rate: float):
    return measure_requests(base_url, model, args, _requests(args, rate))


def measure_requests(base_url: str, model: str, args, reqs):
    records, wall = asyncio.run(run_load(
        base_url, model, reqs, send_true_len=not args.no_true_len, ignore_eos=args.ignore_eos,
        duration_s=args.duration))
    from vllm_ext.bench.metrics import summarize
    return records, summarize(records[args.warmup:], wall, args.slos)


def cpu_per_token_ms(before: dict, after: dict, summary: dict) -> dict:
    """Server CPU time per output token (ms) during one run, per process role."""
    tokens = max(1, summary.get("total_output_tokens") or 0)
    return {f"cpu_{role}_ms_per_tok": 1000 * (after[role] - before[role]) / tokens
            for role in after}


def cmd_serve(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, summary = _measure(args.base_url, args.model, args, args.rate)
    summary.update(label=args.label, rate=args.rate, base_url=args.base_url, argv=sys.argv)
    report.write_records(out / f"{args.label}.jsonl", records)
    (out / f"{args.label}.summary.json").write_text(json.dumps(summary, indent=2))
    report.plot_cdfs(out / f"{args.label}.png", {args.label: records})
    print(report.summary_table(summary, f"== {args.label} @ {args.rate} req/s =="))


def cmd_compare(args) -> None:
    from vllm_ext.bench.servers import running_server
    from vllm_ext.testbed.model import default_model_path

    model = args.model or default_model_path()
    configs = []
    for spec in args.config:
        name, _, rest = spec.partition("=")
        kind, _, extra = rest.partition(":")
        if not name or kind not in ("stock", "ext"):
            sys.exit(f"vllm-ext bench compare: --config {spec!r}: expected NAME=stock:FLAGS "
                     "or NAME=ext:FLAGS")
        configs.append((name, kind, extra))
    if args.baseline not in [c[0] for c in configs]:
        sys.exit(f"vllm-ext bench compare: --baseline {args.baseline!r} is not a --config name")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.same_server and args.side_by_side:
        sys.exit("vllm-ext bench compare: --same-server and --side-by-side exclude each other")
    if args.same_server or args.side_by_side:
        from vllm_ext.bench import same_server
        if args.same_server and any(kind != "ext" for _, kind, _ in configs):
            sys.exit("vllm-ext bench compare --same-server: every --config must be NAME=ext:FLAGS "
                     "(a stock server cannot switch live; --side-by-side runs one per config)")
        workloads = {rate: _requests(args, rate) for rate in args.rates}  # errors before a server
        if args.trace:
            for rate, reqs in workloads.items():
                same_server.check_trace_length(args, reqs, rate)
        return same_server.run(args, configs, model, workloads.__getitem__,
                               side_by_side=args.side_by_side)
    from vllm_ext.bench import live
    for rate in args.rates:  # a bad workload (e.g. --trace) exits before the first server
        _requests(args, rate)
    rows, runs = [], {}
    for rep in range(args.repeats):  # configs interleaved per repeat: A B A B ...
        for name, kind, extra in configs:
            with running_server(kind, model, f"{args.server_args} {extra}",
                                out / f"{name}.server.log") as server:
                for rate in args.rates:
                    before = server.cpu_seconds()
                    counters = live.scrape(server.url) if kind == "ext" else None
                    records, summary = _measure(server.url, "bench", args, rate)
                    summary.update(cpu_per_token_ms(before, server.cpu_seconds(), summary))
                    if counters is not None:
                        summary.update(live.counter_deltas(counters, live.scrape(server.url)))
                    rows.append({"config": name, "rate": rate, "repeat": rep, **summary})
                    runs.setdefault(f"{name}@{rate}", []).extend(records)
                    report.write_records(out / f"{name}@{rate}.r{rep}.jsonl", records)
                    print(report.summary_table(summary, f"== {name} @ {rate} req/s, "
                                                        f"repeat {rep} =="), flush=True)
    means = report.mean_over_repeats(rows)
    table = report.ratio_table(means, args.baseline)
    if args.repeats > 1:
        table += "\n\nper repeat:\n" + report.ratio_table(rows, args.baseline, by_repeat=True)
        from vllm_ext.bench.paired import ci_table, pooled_table
        table += "\n\n" + ci_table(rows, args.baseline, unit="repeat")
        pooled = pooled_table(out, rows, args.baseline, unit="repeat")
        table += "\n\n" + pooled if pooled else ""
    table += "\n\n" + report.cpu_table(means, args.baseline)
    print("\n" + table)
    (out / "compare.txt").write_text(" ".join(sys.argv) + "\n\n" + table + "\n")
    (out / "compare.json").write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=2))
    report.plot_cdfs(out / "cdf.png", runs)
    report.plot_sweep(out / "sweep.png", rows)
    report.plot_length_latency(out / "by-length.png", runs)


def cmd_report(args) -> None:
    """The paired CI table of a finished compare run, against any of its configs."""
    from vllm_ext.bench.paired import ci_table, pooled_table

    path = Path(args.run) / "compare.json" if Path(args.run).is_dir() else Path(args.run)
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError) as exc:
        sys.exit(f"vllm-ext bench report: {path}: not a compare.json ({exc})")
    unit = "round" if "round" in rows[0] else "repeat"
    if args.baseline not in {r["config"] for r in rows}:
        sys.exit(f"vllm-ext bench report: --baseline {args.baseline!r} is not a config of {path}")
    print(ci_table(rows, args.baseline, unit=unit))
    pooled = pooled_table(path.parent, rows, args.baseline, unit=unit)
    if pooled:
        print("\n" + pooled)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vllm-ext bench")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="one open-loop run against a running server")
    s.add_argument("--base-url", default="http://127.0.0.1:8000")
    s.add_argument("--model", default="tiny-moe-reasoner")
    s.add_argument("--label", default="run")
    _workload_args(s)
    c = sub.add_parser("compare", help="same arrivals against several server configurations")
    c.add_argument("--model", help="model path (default: the embedded model)")
    c.add_argument("--config", action="append", required=True,
                   help="NAME=stock:FLAGS or NAME=ext:FLAGS (repeatable)")
    c.add_argument("--baseline", required=True)
    c.add_argument("--rates", type=float, nargs="+", default=[4.0])
    c.add_argument("--server-args", default="", help="flags for every server")
    c.add_argument("--repeats", type=int, default=1,
                   help="run the configurations this many times, interleaved; report means")
    c.add_argument("--same-server", action="store_true",
                   help="one server; configs switched live in paired, interleaved blocks "
                        "with bootstrap CIs (only live --ext-* settings may differ)")
    c.add_argument("--side-by-side", action="store_true",
                   help="one server per config, all kept up; the same paired, interleaved "
                        "blocks as --same-server, for settings that cannot switch live "
                        "(KV bits, MoE router, telemetry, model, stock vLLM)")
    c.add_argument("--blocks", type=int, default=8,
                   help="--same-server / --side-by-side: rounds (each config runs one block per round)")
    c.add_argument("--block-requests", type=int, default=40,
                   help="--same-server / --side-by-side: requests per block (fresh arrivals each round)")
    c.add_argument("--idle-gap", type=float, default=2.0,
                   help="--same-server / --side-by-side: seconds of idle between blocks (after the drain)")
    _workload_args(c)
    r = sub.add_parser("report", help="paired CI table of a finished compare run")
    r.add_argument("run", help="a compare --out folder or its compare.json")
    r.add_argument("--baseline", required=True)
    args = parser.parse_args(argv)
    if args.command != "report":
        from vllm_ext.bench.metrics import parse_goodput
        try:
            args.slos = parse_goodput(args.goodput)
        except ValueError as exc:
            parser.error(str(exc))
    for name in ("rate", "num_requests", "max_tokens", "blocks", "block_requests", "repeats"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    {"serve": cmd_serve, "compare": cmd_compare, "report": cmd_report}[args.command](args)
