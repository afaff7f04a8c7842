"""SIMULATED: TRAIL's starvation bound (``--ext-trail-tail-factor``) swept on a live run's blocks.

Replays the exact requests of every block of a `bench compare --same-server` run (arrivals,
prompt and output lengths from the fcfs blocks' JSONL) through the simulator with fcfs, the
oracle, and TRAIL (noisy predicted lengths, `vllm_ext.sim.predicted`) at each tail factor, on
a served step-cost profile; prints, per rate, the mean over blocks of mean and p99 e2e and
their paired ratios to simulated fcfs. Figures are simulated, not measured:
    .venv/bin/python scripts/tail_sweep.py --run results/trail13 \\
        --profile results/sim/profile-trail13-trail.json --factors 0 2 4 8 16
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vllm_ext.sched.policy import make_policy
from vllm_ext.sim.cluster import latency_stats, simulate
from vllm_ext.sim.predicted import NoisyTrailPolicy
from vllm_ext.sim.profile import load_profile
from vllm_ext.sim.replica import ReplicaConfig, SimRequest


def block_requests(path: Path, overhead: float) -> list[SimRequest]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [SimRequest(str(r["index"]), r["arrival_s"] + overhead, r["prompt_tokens"],
                       max(1, r["output_tokens"]), max(1, r["output_tokens"]))
            for r in recs if r["error"] is None]


def simulate_blocks(run: str, policies: dict, block_cfg):
    """Per rate of `run`'s fcfs blocks, each simulated with ``block_cfg(path) -> (ReplicaConfig,
    request overhead s)``: (rate, {policy: [(mean e2e s, p99 e2e s) per block]},
    {policy: every simulated request's e2e s, all blocks pooled})."""
    blocks = sorted(Path(run).glob("fcfs@*.b*.jsonl"))
    rates = sorted({b.name.split("@")[1].split(".b")[0] for b in blocks}, key=float)
    for rate in rates:
        stats, pooled = {name: [] for name in policies}, {name: [] for name in policies}
        for path in [b for b in blocks if f"@{rate}.b" in b.name]:
            cfg, overhead = block_cfg(path)
            reqs = block_requests(path, overhead)
            for name, factory in policies.items():
                done = simulate(reqs, cfg, factory)
                st = latency_stats(done)
                stats[name].append((st["mean_e2el_s"], st["p99_e2el_s"]))
                pooled[name] += [r.finish_s - r.arrival_s for r in done]
        yield rate, stats, pooled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a bench compare --same-server --out folder")
    p.add_argument("--profile", required=True)
    p.add_argument("--factors", type=float, nargs="+", default=[0, 2, 4, 8, 16])
    p.add_argument("--max-num-seqs", type=int, default=2)
    args = p.parse_args()
    cost, overhead = load_profile(args.profile)
    cfg = ReplicaConfig(max_num_seqs=args.max_num_seqs, cost=cost)
    policies = {"fcfs": lambda: make_policy("fcfs"), "oracle": lambda: make_policy("oracle")}
    for f in args.factors:
        policies[f"trail tail={f:g}"] = lambda f=f: NoisyTrailPolicy(tail_factor=f)
    for rate, stats, _ in simulate_blocks(args.run, policies, lambda path: (cfg, overhead)):
        base = np.asarray(stats["fcfs"])
        print(f"SIMULATED, rate {rate}, {len(base)} blocks of {args.run}")
        print(f"{'policy':<18}{'mean e2e (s)':>13}{'vs fcfs':>9}{'p99 e2e (s)':>13}{'vs fcfs':>9}")
        for name, vals in stats.items():
            v = np.asarray(vals)
            print(f"{name:<18}{v[:, 0].mean():>13.3f}{v[:, 0].mean() / base[:, 0].mean():>9.2f}"
                  f"{v[:, 1].mean():>13.3f}{v[:, 1].mean() / base[:, 1].mean():>9.2f}")


if __name__ == "__main__":
    main()
