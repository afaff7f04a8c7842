"""`vllm-ext simulate`: validation and what-if studies with the simulator.

  mg1      simulator vs closed forms on one server (FCFS: Pollaczek-Khinchine; SRPT:
           Schrage-Miller), a table at each load
  profile  measure the live engine's step cost (writes the StepCost JSON the others use)
  replay   simulate the exact requests of a `bench compare` run (arrival, prompt and output
           tokens per request) with a profile, and put simulated next to measured latency
  record   the length probe's outputs over a bench trace, for replay --predictions
  scale    many replicas behind a router at many rates (simulated only), table + PNG
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from vllm_ext.bench.workload import arrival_times
from vllm_ext.config import ExtConfig
from vllm_ext.sched.hrrn import HrrnPolicy
from vllm_ext.sched.policy import make_policy
from vllm_ext.sched.trail import LengthBins
from vllm_ext.sim.cluster import ROUTERS, latency_stats, simulate
from vllm_ext.sim.predicted import NoisyTrailPolicy
from vllm_ext.sim.recorded import RecordedPredictions, RecordedTrailPolicy, record
from vllm_ext.sim.queueing import mg1_fcfs_mean_response, mg1_srpt_mean_response
from vllm_ext.sim.replica import ReplicaConfig, SimRequest, StepCost


def _policy(name: str, cap: int = 10**9, sigma: tuple[float, float] | None = None,
            recorded: RecordedPredictions | None = None, **trail_args):
    """``fcfs``/``oracle`` as in the engine; ``trail``/``spjf`` as TRAIL's policy on the probe's
    recorded outputs (`vllm_ext.sim.recorded`) when given, else on noisy predicted lengths
    (`vllm_ext.sim.predicted`; log-normal sigmas initial, refined); ``hrrn`` on spjf's estimate
    from the same source, as in the engine (`vllm_ext.sched.hrrn`)."""
    if name == "hrrn":
        spjf = _policy("spjf", cap, sigma, recorded, **{**trail_args, "tail_factor": 0.0})
        return lambda: HrrnPolicy(estimator=spjf())
    if name in ("trail", "spjf") and recorded is not None:
        return lambda: RecordedTrailPolicy(
            bins=LengthBins(recorded.bin_edges), refine=name == "trail", recorded=recorded,
            max_preemptions_per_request=cap, **trail_args)
    if name in ("trail", "spjf"):
        sigma = sigma or (NoisyTrailPolicy.sigma_initial, NoisyTrailPolicy.sigma_refined)
        return lambda: NoisyTrailPolicy(max_preemptions_per_request=cap, refine=name == "trail",
                                        sigma_initial=sigma[0], sigma_refined=sigma[1],
                                        **trail_args)
    return lambda: make_policy(name, max_preemptions_per_request=cap)


def _name_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected CONFIG=PATH, got {text!r}")
    return name, path


def cmd_mg1(args) -> None:
    dt, sizes = 0.01, np.arange(args.min_size, args.max_size + 1)
    cfg = ReplicaConfig(max_num_seqs=1, recompute_on_preempt=False, cost=StepCost(dt, 0, 0))
    print(f"M/G/1, job sizes uniform {args.min_size}..{args.max_size} steps of {dt}s, "
          f"{args.jobs} jobs, seed {args.seed}")
    print(f"{'rho':>5} {'policy':>7} {'closed (s)':>11} {'sim (s)':>9} {'sim/closed':>11}")
    for rho in args.rho:
        lam = rho / (sizes.mean() * dt)
        out = np.random.default_rng(args.seed).choice(sizes, args.jobs)
        t = arrival_times(args.jobs, lam, args.seed + 1)
        reqs = [SimRequest(str(i), float(t[i]), 1, int(o), int(o)) for i, o in enumerate(out)]
        for name, closed in (("fcfs", mg1_fcfs_mean_response), ("oracle", mg1_srpt_mean_response)):
            sim = latency_stats(simulate(reqs, cfg, _policy(name)))["mean_e2el_s"]
            c = closed(lam, sizes * dt)
            print(f"{rho:>5.2f} {name:>7} {c:>11.3f} {sim:>9.3f} {sim / c:>11.3f}", flush=True)


def cmd_profile(args) -> None:
    from vllm_ext.sim.profile import profile_engine, write_profile
    from vllm_ext.testbed.model import default_model_path

    model = args.model or default_model_path()
    if args.prefill_from and not (args.served and args.calibration_run):
        raise SystemExit("--prefill-from needs --served and --calibration-run (the decode steps)")
    if args.served:
        samples = _served_samples(args, model)
    else:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        samples = profile_engine(model, enforce_eager=args.enforce_eager)
    data = write_profile(Path(args.out), model, samples, served=args.served)
    print(f"step cost: {data['cost']}, request overhead {data['request_overhead_s'] * 1e3:.1f} ms"
          f" (fit mean relative error {data['fit_mean_rel_error']:.1%}); wrote {args.out}")


def _served_samples(args, model: str) -> list:
    """Prefill timings from an idle server (or from another profile, ``--prefill-from``), and
    decode steps from that server or, with ``--calibration-run``, as timed under load."""
    from vllm_ext.sim.profile import loaded_decode_samples, profile_server

    if args.prefill_from:
        samples = [tuple(x) for x in json.loads(Path(args.prefill_from).read_text())["samples"]]
    else:
        from vllm_ext.bench.servers import running_server

        log = Path(args.out).with_suffix(".server.log")
        with running_server("ext", model, args.server_args, log) as server:
            samples = profile_server(server.url, batch_sizes=args.batch_sizes)
    if args.calibration_run:
        recs = [json.loads(x) for x in Path(args.calibration_run).read_text().splitlines()]
        samples = [s for s in samples if s[0] != s[1]] + [
            s for s in loaded_decode_samples(recs) if s[1] <= max(args.batch_sizes)]
    return samples


def cmd_replay(args) -> None:
    from vllm_ext.sim.profile import load_profile, prefill_samples

    profiles = {name: load_profile(path) for name, path in args.config_profile}
    default = load_profile(args.profile)
    prefill = prefill_samples(args.profile) if args.calibrate_blocks else []
    if args.calibrate_blocks and not prefill:
        raise SystemExit(f"--calibrate-blocks: {args.profile} has no prefill samples")
    if args.calibrate_from and not args.calibrate_blocks:
        raise SystemExit("--calibrate-from needs --calibrate-blocks")
    recorded = RecordedPredictions.load(args.predictions) if args.predictions else None
    data = json.loads((Path(args.compare) / "compare.json").read_text())
    print(f"{'config':<10}{'rate':>6}{'runs':>5}{'measured (s)':>14}{'simulated (s)':>15}"
          f"{'sim/meas':>10}{'preempt live':>14}{'preempt sim':>13}")
    live = {}  # (config, rate) -> preemptions per run, from /metrics (bench compare rows)
    for row in data["rows"]:
        if "preemptions_policy" in row:
            live.setdefault((row["config"], row["rate"]), []).append(
                row["preemptions_policy"] + row["preemptions_kv_pressure"])
    seen = set()
    for row in data["rows"]:
        if (row["config"], row["rate"]) in seen:
            continue
        seen.add((row["config"], row["rate"]))
        policy = args.policy_of.get(row["config"], row["config"])
        trail_args = {"margin": args.margin, "tail_factor": args.tail_factor}
        if recorded is not None:
            trail_args["every"] = args.probe_every
        factory = _policy(policy, args.max_preemptions, (args.sigma_initial, args.sigma_refined),
                          recorded, **trail_args)
        paths = sorted(Path(args.compare).glob(f"{row['config']}@{row['rate']}.[rb]*.jsonl"))
        meas, sim, sim_pre = [], [], []
        for path in paths:  # one file per repeat or block: its arrivals, measured separately
            recs = [json.loads(line) for line in path.read_text().splitlines()]
            first = _block_offset(path, len(recs))
            recs = [{**r, "index": r["index"] + first} for r in recs if r["error"] is None]
            recs = recs[args.warmup:]
            if recorded is not None:
                _check_recorded(recorded, recs, path)
            cost, overhead = _replay_cost(path, row["config"], recs, prefill,
                                          args.calibrate_from, profiles.get(row["config"], default))
            slower = float(args.step_scale.get(row["config"], 1.0))
            cost = StepCost(cost.base_s * slower, cost.per_token_s, cost.per_seq_s * slower)
            cfg = ReplicaConfig(max_num_seqs=args.max_num_seqs,
                                max_num_batched_tokens=args.max_num_batched_tokens, cost=cost)
            reqs = [SimRequest(str(r["index"]), r["arrival_s"] + overhead, r["prompt_tokens"],
                               max(1, r["output_tokens"]), max(1, r["output_tokens"]))
                    for r in recs]
            stats = latency_stats(simulate(reqs, cfg, factory))
            sim.append(stats["mean_e2el_s"] + overhead)
            sim_pre.append(stats["preemptions"])
            meas.append(float(np.mean([r["e2el_s"] for r in recs])))
        m, s_ = float(np.mean(meas)), float(np.mean(sim))
        counted = live.get((row["config"], row["rate"]))
        live_pre = f"{np.mean(counted):.1f}" if counted else "-"
        print(f"{row['config']:<10}{row['rate']:>6.2f}{len(paths):>5}{m:>14.3f}{s_:>15.3f}"
              f"{s_ / m:>10.3f}{live_pre:>14}{np.mean(sim_pre):>13.1f}")


def _replay_cost(path: Path, config: str, recs: list[dict], prefill: list,
                 calibrate_from: str | None, profile: tuple) -> tuple[StepCost, float]:
    """The step cost a block is replayed at: with --calibrate-blocks, its own decode gaps, or
    (--calibrate-from REF) those of REF's block of the same round; else the profile."""
    if not prefill:
        return profile
    if calibrate_from:
        ref = path.with_name(path.name.replace(f"{config}@", f"{calibrate_from}@", 1))
        if not ref.exists():
            raise SystemExit(f"--calibrate-from {calibrate_from}: no block file {ref}")
        recs = [r for r in map(json.loads, ref.read_text().splitlines()) if r["error"] is None]
    return _block_cost(recs, prefill)


def _block_offset(path: Path, n: int) -> int:
    """The trace position of a block's first request: block k of a same-server run holds the
    trace's requests [k n, (k + 1) n), numbered from 0 in its file; a repeat file starts at 0."""
    stem = path.name.rsplit(".", 1)[0]
    tail = stem.rsplit(".b", 1)
    return int(tail[1]) * n if len(tail) == 2 and tail[1].isdigit() else 0


def _block_cost(recs: list[dict], prefill: list) -> tuple[StepCost, float]:
    """The step cost a block ran at: its own decode gaps per concurrency (the machine's speed
    during that block) with the profile's prefill timings. In-sample for the step cost, so a
    replay with it checks the queueing and preemption model, not the cost model."""
    from vllm_ext.sim.profile import fit_served_cost, loaded_decode_samples

    decode = loaded_decode_samples(recs)
    if len({s[1] for s in decode}) < 2:
        raise SystemExit("--calibrate-blocks: a block has decode gaps at fewer than two "
                         "concurrencies (>= 50 gaps each); use per-config profiles instead")
    cost, overhead, _ = fit_served_cost(prefill + decode)
    return cost, overhead


def _check_recorded(recorded: RecordedPredictions, recs: list[dict], path: Path) -> None:
    """The recording must be of this run's trace: same requests, same output lengths."""
    for r in recs:
        i = r["index"]
        if i >= len(recorded.output_len) or recorded.output_len[i] != r["output_tokens"]:
            raise SystemExit(f"--predictions was not recorded on the trace of {path}: request "
                             f"{i} has {r['output_tokens']} output tokens there")


def cmd_record(args) -> None:
    from vllm_ext.testbed.model import default_model_path

    recorded = record(args.model or default_model_path(), args.trace, args.probe)
    recorded.save(args.out)
    print(f"recorded the length probe over {len(recorded.output_len)} requests "
          f"({sum(recorded.output_len)} tokens) -> {args.out}")


def cmd_scale(args) -> None:
    from vllm_ext.bench.report import plot_sweep
    from vllm_ext.sim.profile import load_profile

    cost = load_profile(args.profile)[0] if args.profile else StepCost()
    cfg = ReplicaConfig(max_num_seqs=args.max_num_seqs, num_blocks=args.num_blocks,
                        block_size=16, cost=cost)
    rng = np.random.default_rng(args.seed)
    rows = []
    print(f"{'replicas':>8}{'rate':>8}{'policy':>8}{'mean e2e (s)':>14}{'p99 e2e (s)':>13}")
    for n_rep in args.replicas:
        for per_replica_rate in args.rates:
            rate = per_replica_rate * n_rep
            n = args.requests_per_replica * n_rep
            t = arrival_times(n, rate, args.seed)
            outs = rng.integers(args.min_out, args.max_out + 1, n)
            prompts = rng.integers(16, 256, n)
            reqs = [SimRequest(str(i), float(t[i]), int(p), int(o), int(o))
                    for i, (p, o) in enumerate(zip(prompts, outs))]
            for policy in args.policies:
                factory = _policy(policy, sigma=(args.sigma_initial, args.sigma_refined))
                st = latency_stats(simulate(reqs, cfg, factory, n_rep, args.router))
                rows.append({"config": f"{policy} x{n_rep}", "rate": per_replica_rate,
                             "mean_e2el_ms": st["mean_e2el_s"] * 1000,
                             "p99_e2el_ms": st["p99_e2el_s"] * 1000})
                print(f"{n_rep:>8}{rate:>8.1f}{policy:>8}{st['mean_e2el_s']:>14.3f}"
                      f"{st['p99_e2el_s']:>13.3f}", flush=True)
    if args.plot:
        plot_sweep(Path(args.plot), rows, title=f"SIMULATED: {args.router} router, "
                   f"max_num_seqs {args.max_num_seqs} per replica",
                   xlabel="request rate per replica (req/s)")
        print(f"wrote {args.plot} (SIMULATED)")


def _add_sigma_args(parser) -> None:
    parser.add_argument("--sigma-initial", type=float, default=NoisyTrailPolicy.sigma_initial,
                        help="trail/spjf/hrrn: log-normal error of the initial length prediction")
    parser.add_argument("--sigma-refined", type=float, default=NoisyTrailPolicy.sigma_refined,
                        help="trail: log-normal error of each refreshed remaining prediction")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="vllm-ext simulate")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mg1", help="simulator vs M/G/1 closed forms")
    m.add_argument("--rho", type=float, nargs="+", default=[0.5, 0.8])
    m.add_argument("--jobs", type=int, default=40000)
    m.add_argument("--min-size", type=int, default=5)
    m.add_argument("--max-size", type=int, default=100)
    m.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("profile", help="measure the live engine's step cost")
    p.add_argument("--model")
    p.add_argument("--out", default="results/profile.json")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--served", action="store_true",
                   help="profile the OpenAI server (as bench compare runs it), not LLMEngine")
    p.add_argument("--server-args", default="", help="--served: flags for the server")
    p.add_argument("--calibration-run", help="--served: a bench run's JSONL; its inter-token "
                   "gaps under load replace the idle decode timings")
    p.add_argument("--prefill-from", help="--served: take the prefill timings from this "
                   "profile instead of starting a server (with --calibration-run: a profile of "
                   "another policy's decode steps)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 3, 4],
                   help="--served: concurrent decodes to time (keep <= the server's "
                        "--max-num-seqs)")
    r = sub.add_parser("replay", help="simulate a bench compare run next to its measurements")
    r.add_argument("--compare", required=True, help="output folder of `vllm-ext bench compare`")
    r.add_argument("--profile", required=True)
    r.add_argument("--max-num-seqs", type=int, default=256)
    r.add_argument("--max-num-batched-tokens", type=int, default=2048)
    r.add_argument("--config-profile", type=_name_path, action="append", default=[],
                   metavar="CONFIG=PATH", help="step cost for one config (repeatable), e.g. "
                   "trail=profile-trail.json: a policy's own scheduler/probe work per step")
    r.add_argument("--step-scale", type=json.loads, default={},
                   help='JSON map from config name to a factor on its decode step cost, e.g. '
                   '{"trail": 1.03}: what-if for a policy whose own per-step work is that much')
    r.add_argument("--calibrate-blocks", action="store_true",
                   help="each block's decode step cost from its own inter-token gaps (prefill "
                        "timings from --profile): removes the machine's drift within a run")
    r.add_argument("--calibrate-from", metavar="CONFIG",
                   help="--calibrate-blocks: every config's block at the step cost of CONFIG's "
                        "block of the same round (e.g. fcfs: a non-preempting policy's gaps are "
                        "steps only; a preempting one's also hold short waits in the queue)")
    r.add_argument("--warmup", type=int, default=0)
    r.add_argument("--policy-of", type=json.loads, default={"stock": "fcfs"},
                   help='JSON map from config name to policy, e.g. {"stock": "fcfs"}')
    r.add_argument("--max-preemptions", type=int, default=ExtConfig.max_preemptions_per_request,
                   help="the engine's per-request cap")
    r.add_argument("--predictions", help="trail/spjf on the probe's recorded outputs (from "
                   "`simulate record` on this run's trace) instead of noisy true lengths")
    r.add_argument("--tail-factor", type=float, default=ExtConfig.trail_tail_factor,
                   help="trail/spjf: the engine's --ext-trail-tail-factor (0 = no bound)")
    r.add_argument("--margin", type=float, default=ExtConfig.preemption_margin,
                   help="trail/spjf: the engine's --ext-preemption-margin")
    r.add_argument("--probe-every", type=int, default=ExtConfig.probe_every,
                   help="trail (with --predictions): the engine's --ext-probe-every")
    _add_sigma_args(r)
    c = sub.add_parser("record", help="record the length probe's outputs over a bench trace")
    c.add_argument("--trace", required=True, help="a bench trace JSONL (prompt, max_tokens)")
    c.add_argument("--model", default=None, help="default: the embedded model")
    c.add_argument("--probe", help="length probe file (default: the one shipped for the model)")
    c.add_argument("--out", required=True, help="output .npz")
    s = sub.add_parser("scale", help="many replicas (simulated only)")
    s.add_argument("--replicas", type=int, nargs="+", default=[8, 16, 32, 64])
    s.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0],
                   help="arrivals per second per replica")
    s.add_argument("--policies", nargs="+", default=["fcfs", "oracle"])
    s.add_argument("--router", choices=ROUTERS, default="least_loaded")
    s.add_argument("--profile")
    s.add_argument("--max-num-seqs", type=int, default=32)
    s.add_argument("--num-blocks", type=int, default=4096)
    s.add_argument("--requests-per-replica", type=int, default=200)
    s.add_argument("--min-out", type=int, default=20)
    s.add_argument("--max-out", type=int, default=300)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--plot")
    _add_sigma_args(s)
    args = parser.parse_args(argv)
    {"mg1": cmd_mg1, "profile": cmd_profile, "replay": cmd_replay, "record": cmd_record,
     "scale": cmd_scale}[
        args.command](args)
