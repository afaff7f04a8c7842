"""SIMULATED: two starvation bounds for TRAIL side by side, on a live run's blocks.

Is the mean/p99 trade-off of TRAIL's slowdown bound (``--ext-trail-tail-factor``: overdue at
``arrival + f x predicted service``) a property of the bound or of the workload? This replays
the exact requests of every fcfs block of a `bench compare --same-server` run through the
simulator (as `scripts/tail_sweep.py`) with fcfs, the oracle, TRAIL under the slowdown bound at
several factors, and TRAIL under a *virtual-FCFS* bound (not in the engine): a request is
overdue at ``arrival + (1 + w) x (its start under a virtual FCFS of the same slots and
predicted lengths - arrival) + s x predicted service``, i.e. when it has waited (1 + w) times
what FCFS would have made it wait, plus s of its own service; and TRAIL under a *deadline*
(not in the engine): overdue at its latest start, ``arrival + D - predicted service`` (EDF /
least laxity for an e2e target D), which leaves short and mid-size requests to SRPT. The
slowdown bound is also run on exact lengths (``exact``). With ``--calibrate-blocks`` every
block runs at the step cost its own fcfs decode gaps show (as ``simulate replay``), and the
p99 over all blocks' requests (pooled) is printed beside the mean of per-block p99s.
Figures are simulated:
    .venv/bin/python scripts/tail_frontier.py --run results/trail13 \\
        --profile results/sim/profile-trail13-trail.json
"""
from __future__ import annotations

import argparse
import heapq
from dataclasses import dataclass, field

import numpy as np

from tail_sweep import simulate_blocks
from vllm_ext.sched.policy import make_policy
from vllm_ext.sim.predicted import NoisyTrailPolicy
from vllm_ext.sim.profile import load_profile
from vllm_ext.sim.replica import ReplicaConfig


@dataclass
class VirtualFcfsTrail(NoisyTrailPolicy):
    slots: int = 2
    wait_slack: float = 0.0      # w
    service_slack: float = 0.0   # s
    free: list = field(default_factory=list)     # virtual FCFS: when each slot frees
    vstart: dict = field(default_factory=dict)   # request -> its virtual FCFS start

    def overdue_at(self, view) -> float:
        if self.step_s <= 0:
            return float("inf")
        service = min(self.initial(view), view.max_tokens) * self.step_s
        if view.request_id not in self.vstart:  # first seen: arrival order, as the engine
            if not self.free:
                self.free = [0.0] * self.slots
            start = max(view.arrival_time, heapq.heappop(self.free))
            heapq.heappush(self.free, start + service)
            self.vstart[view.request_id] = start
        wait = self.vstart[view.request_id] - view.arrival_time
        floor = max(self.tail_min_tokens, min(self.initial(view), view.max_tokens)) * self.step_s
        return view.arrival_time + (1 + self.wait_slack) * wait + self.service_slack * floor


@dataclass
class DeadlineTrail(NoisyTrailPolicy):
    deadline_s: float = 3.0      # D

    def overdue_at(self, view) -> float:
        if self.step_s <= 0:
            return float("inf")
        service = min(self.initial(view), view.max_tokens) * self.step_s
        return view.arrival_time + self.deadline_s - service


def calibrated(profile: str, slots: int):
    """block_cfg for `simulate_blocks`: each block at the step cost its own decode gaps show
    (`simulate replay --calibrate-blocks`), prefill timings from the profile."""
    import json
    from pathlib import Path

    from vllm_ext.sim.cli import _block_cost
    from vllm_ext.sim.profile import prefill_samples

    prefill = prefill_samples(profile)

    def block_cfg(path):
        recs = [json.loads(line) for line in Path(path).read_text().splitlines()]
        cost, overhead = _block_cost(recs, prefill)
        return ReplicaConfig(max_num_seqs=slots, cost=cost), overhead
    return block_cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--profile", required=True)
    p.add_argument("--max-num-seqs", type=int, default=2)
    p.add_argument("--png", help="plot: p99 vs mean ratio per bound family, per rate")
    p.add_argument("--calibrate-blocks", action="store_true",
                   help="each block at its own step cost (the profile gives prefill timings)")
    args = p.parse_args()
    policies = {"fcfs": lambda: make_policy("fcfs"), "oracle": lambda: make_policy("oracle")}
    for f in (0, 2, 2.5, 3, 4):
        policies[f"slowdown f={f:g}"] = lambda f=f: NoisyTrailPolicy(tail_factor=f)
    for w in (0.2, 0.5, 1.0):
        for s in (0, 0.5, 1, 2):
            policies[f"vfcfs w={w:g} s={s:g}"] = lambda w=w, s=s: VirtualFcfsTrail(
                tail_factor=1.0, slots=args.max_num_seqs, wait_slack=w, service_slack=s)
    for f in (2, 3, 4):
        policies[f"exact f={f:g}"] = lambda f=f: NoisyTrailPolicy(
            tail_factor=f, sigma_initial=0.0, sigma_refined=0.0)
    for d in (1.5, 2.0, 2.5, 3.0, 3.5):
        policies[f"deadline D={d:g}"] = lambda d=d: DeadlineTrail(tail_factor=0.0, deadline_s=d)
    if args.calibrate_blocks:
        block_cfg = calibrated(args.profile, args.max_num_seqs)
    else:
        cost, overhead = load_profile(args.profile)
        cfg = ReplicaConfig(max_num_seqs=args.max_num_seqs, cost=cost)
        block_cfg = lambda path: (cfg, overhead)  # noqa: E731
    points = {}
    for rate, stats, pooled in simulate_blocks(args.run, policies, block_cfg):
        pooled = pooled if args.calibrate_blocks else None
        base = np.asarray(stats["fcfs"])
        print(f"SIMULATED, rate {rate}, {len(base)} blocks of {args.run}")
        print(f"{'policy':<22}{'mean vs fcfs':>13}{'p99 vs fcfs':>13}"
              + (f"{'pooled p99':>13}" if pooled else ""))
        for name, vals in stats.items():
            v = np.asarray(vals)
            ratio = (v[:, 0].mean() / base[:, 0].mean(), v[:, 1].mean() / base[:, 1].mean())
            points.setdefault(rate, {})[name] = ratio
            extra = (f"{np.percentile(pooled[name], 99) / np.percentile(pooled['fcfs'], 99):>13.2f}"
                     if pooled else "")
            print(f"{name:<22}{ratio[0]:>13.2f}{ratio[1]:>13.2f}{extra}", flush=True)
    if args.png:
        plot(args.png, points)


def plot(path: str, points: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 4), squeeze=False)
    for ax, (rate, named) in zip(axes[0], points.items()):
        for family, marker in (("slowdown", "o-"), ("vfcfs w=0.2", "s--"), ("vfcfs w=0.5", "^--"),
                               ("vfcfs w=1 ", "v--"), ("exact", "x:"), ("deadline", "d-")):
            pts = sorted(v for k, v in named.items() if k.startswith(family.strip())
                         and (family != "vfcfs w=1 " or k.startswith("vfcfs w=1 ")))
            if pts:
                ax.plot(*zip(*pts), marker, label=family.strip(), alpha=0.8)
        ax.plot(*named["oracle"], "k*", markersize=12, label="oracle (no bound)")
        ax.axvline(0.6, color="grey", ls=":")
        ax.axhline(1.2, color="grey", ls=":")
        ax.set(title=f"SIMULATED, rate {rate}", xlabel="mean e2e / fcfs", ylabel="p99 e2e / fcfs")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
