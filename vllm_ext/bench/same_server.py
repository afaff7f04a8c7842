"""`vllm-ext bench compare --same-server`: one server, configurations switched live, paired blocks.

One server starts with ``--server-args`` and an admin token. Each round draws fresh arrivals
(a slice of ``--block-requests`` requests of the trace, or the testbed suite with seed
``--seed + round``) that every configuration of the round runs; configurations run in the order
of `paired.block_order`. Before each block the server switches to the configuration's live
settings (`vllm_ext.bench.live.set_config`: drain, switch at a step boundary, reset the prefix
cache so no block reuses another's KV) and idles ``--idle-gap`` seconds. Counters (preemptions
by cause, probe runs) are read from ``/metrics`` around every block. The report is
`paired.ci_table`: means over blocks and paired ratios with bootstrap CIs.
Only `LIVE_FIELDS` may differ between configurations, and the per-request settings of
multi-branch requests (``--ext-branches`` and the ``--ext-branch-*`` overrides: they go into
each request's ``vllm_xargs``, sent with ``--n`` / ``--temperature``); anything else (KV bits,
MoE router, model) needs one server per config: ``--side-by-side`` starts one per config, all
kept up for the whole run, and runs the same paired rounds against them in turn (the idle
servers' CPU during a block is recorded as ``idle_cpu_s``); before each block the server's
prefix cache is reset (vLLM's dev route, so these servers run with ``VLLM_SERVER_DEV_MODE=1``).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from vllm_ext.bench import live, paired, report


def request_xargs(config) -> dict:
    """The config's per-request branch settings (those differing from the defaults), as the
    ``vllm_xargs`` of every request it sends."""
    from vllm_ext.branches.runner import BRANCHES_KEY, OVERRIDE_KEYS
    from vllm_ext.config import ExtConfig

    fields = {"branches": BRANCHES_KEY, **{f: k for k, f in OVERRIDE_KEYS.items()}}
    default = ExtConfig()
    return {key: getattr(config, f) for f, key in fields.items()
            if getattr(config, f) != getattr(default, f)}


def live_settings(name: str, flags: str) -> tuple[dict, dict]:
    """A config's --ext-* flags as (live settings, per-request vllm_xargs); exits naming the
    flag if one can't switch."""
    from vllm_ext.branches.runner import OVERRIDE_KEYS
    from vllm_ext.flags import ext_arg_parser, ext_config_from_args
    from vllm_ext.config import LIVE_FIELDS, ExtConfig, ExtConfigError

    parser = ext_arg_parser()
    ns, rest = parser.parse_known_args(shlex.split(flags))
    if rest:
        sys.exit(f"vllm-ext bench compare --same-server: --config {name}: {' '.join(rest)} "
                 "is not a vllm-ext flag; server flags go in --server-args")
    try:
        config = ext_config_from_args(ns)
    except ExtConfigError as exc:
        sys.exit(f"vllm-ext bench compare --same-server: --config {name}: {exc}")
    per_request = {"branches", *OVERRIDE_KEYS.values()}
    fixed = {k: v for k, v in config.to_dict().items()
             if k not in LIVE_FIELDS and k not in per_request and k != "live_config"
             and v != ExtConfig().to_dict()[k]}
    if fixed:
        sys.exit(f"vllm-ext bench compare --same-server: --config {name}: "
                 f"{', '.join(fixed)} cannot switch live; put it in --server-args or run "
                 "without --same-server (one server per config)")
    return config.live_dict(), request_xargs(config)


def check_trace_length(args, all_requests, rate: float) -> None:
    """Every round takes the trace's next --block-requests requests: exit (before any server
    starts) if the trace at `rate` has fewer than --blocks x --block-requests."""
    need = args.blocks * args.block_requests
    if len(all_requests) < need:
        sys.exit(f"vllm-ext bench compare: --trace at rate {rate:g} has {len(all_requests)} "
                 f"requests, fewer than --blocks x --block-requests = {need}")


def block_requests(args, all_requests, rate: float, rnd: int):
    """This round's requests at `rate`, arrivals rebased to start at 0."""
    n = args.block_requests
    if args.trace:
        check_trace_length(args, all_requests, rate)
        chunk = all_requests[rnd * n:(rnd + 1) * n]
    else:
        from vllm_ext.bench.workload import testbed_requests
        chunk = testbed_requests(n, rate, args.seed + rnd, args.arrival, args.cv, args.max_tokens,
                                 tools=args.tools, kinds=args.task_kinds,
                                 client_latency=args.client_tool_latency)
    t0 = chunk[0].arrival_s
    return [replace(r, arrival_s=r.arrival_s - t0) for r in chunk]


def run(args, configs, model: str, requests_at, side_by_side: bool = False) -> None:
    from vllm_ext.bench.cli import cpu_per_token_ms, measure_requests, with_sampling
    from vllm_ext.bench.servers import running_server

    out = Path(args.out)
    rows, runs = [], {}
    names = [name for name, _, _ in configs]
    orders = paired.block_order(names, args.blocks, args.seed)
    with contextlib.ExitStack() as stack:
        if side_by_side:  # one server per config, each with its own flags
            servers = {name: stack.enter_context(running_server(
                kind, model, f"{args.server_args} {extra}", out / f"{name}.server.log",
                env={"VLLM_SERVER_DEV_MODE": "1"})) for name, kind, extra in configs}
            xargs = dict.fromkeys(names, {})

            def prepare(name: str) -> None:
                live.reset_prefix_cache(servers[name].url)
        else:
            settings, xargs = {}, {}
            for name, _, extra in configs:
                settings[name], xargs[name] = live_settings(name, extra)
            token = secrets.token_hex(16)
            server = stack.enter_context(running_server(
                "ext", model, f"{args.server_args} --ext-admin-token {token}",
                out / "server.log"))
            servers = dict.fromkeys(names, server)

            def prepare(name: str) -> None:
                live.set_config(server.url, token, settings[name])
        for rnd, order in enumerate(orders):
            for rate in args.rates:
                reqs = block_requests(args, requests_at(rate), rate, rnd)
                for name in order:
                    server = servers[name]
                    prepare(name)
                    asyncio.run(asyncio.sleep(args.idle_gap))
                    before, cpu_before = live.scrape(server.url), server.cpu_seconds()
                    idle_before = idle_cpu(servers, server)
                    records, summary = measure_requests(server.url, "bench", args,
                                                        with_sampling(args, reqs, xargs[name]))
                    summary.update(cpu_per_token_ms(cpu_before, server.cpu_seconds(), summary))
                    summary.update(live.counter_deltas(before, live.scrape(server.url)))
                    if side_by_side:
                        summary["idle_cpu_s"] = idle_cpu(servers, server) - idle_before
                    rows.append({"config": name, "rate": rate, "round": rnd, **summary})
                    report.write_records(out / f"{name}@{rate}.b{rnd}.jsonl", records)
                    runs.setdefault(f"{name}@{rate:g}", []).extend(records)
                    print(f"round {rnd} {name} @ {rate}: mean e2e {summary['mean_e2el_ms']:.0f} ms"
                          f"  p99 {summary['p99_e2el_ms']:.0f} ms  failed {summary['failed']}"
                          f"  preemptions policy/kv {summary['preemptions_policy']:.0f}/"
                          f"{summary['preemptions_kv_pressure']:.0f}", flush=True)
    write_report(args, rows, out)
    report.plot_length_latency(out / "by-length.png", runs)


def idle_cpu(servers: dict, active) -> float:
    """CPU seconds used so far by every server but `active` (side by side: the idle ones)."""
    others = {s.pid: s for s in servers.values() if s.pid != active.pid}
    return sum(sum(s.cpu_seconds().values()) for s in others.values())


def write_report(args, rows: list[dict], out: Path, unit: str = "round") -> str:
    table = paired.ci_table(rows, args.baseline, unit=unit)
    pooled = paired.pooled_table(out, rows, args.baseline, unit=unit)
    table += "\n\n" + pooled if pooled else ""
    means = report.mean_over_repeats(rows)
    table += "\n\nmeans over blocks:\n" + report.ratio_table(means, args.baseline)
    table += "\n\n" + counters_table(means)
    table += "\n\n" + report.cpu_table(means, args.baseline)
    idle = [r["idle_cpu_s"] for r in rows if "idle_cpu_s" in r]
    if idle:  # side by side: what the servers not under test cost while one ran
        busy = sum(r.get("duration", 0.0) for r in rows if "idle_cpu_s" in r) / len(idle)
        table += (f"\n\nidle servers' CPU during a block (side by side): mean {np.mean(idle):.2f} s, "
                  f"max {max(idle):.2f} s, per block of {busy:.1f} s on average")
    print("\n" + table)
    (out / "compare.txt").write_text(" ".join(sys.argv) + "\n\n" + table + "\n")
    (out / "compare.json").write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=2))
    paired.plot_paired(out / "paired.png", rows, args.baseline, unit=unit)
    paired.plot_paired(out / "paired-p99.png", rows, args.baseline, metric="p99_e2el_ms",
                       unit=unit)
    return table


def counters_table(means: list[dict]) -> str:
    fields = [f for f in live.COUNTERS.values() if any(f in r for r in means)]
    if not fields:
        return ""
    lines = ["counters per block from /metrics (mean):",
             f"{'config':<14}{'rate':>6}" + "".join(f"{f:>26}" for f in fields)]
    for r in means:
        lines.append(f"{r['config']:<14}{r['rate']:>6.2f}"
                     + "".join(f"{_num(r.get(f, 0)):>26}" for f in fields))
    return "\n".join(lines)


def _num(value: float) -> str:
    """A counter per block: one decimal, or 4 significant digits below 1 (seconds)."""
    return f"{value:.1f}" if value == 0 or abs(value) >= 1 else f"{value:.4g}"
