"""Width of the 95% CI on config / baseline, for compare runs taken with different methods.

For each run (a `bench compare` --out folder: back-to-back repeats or --same-server rounds),
prints the ratio of means and the median per-round (per-repeat) ratio of `--config` vs
`--baseline` at `--rate`, with their bootstrap CIs and widths (`vllm_ext.bench.paired`):
    .venv/bin/python scripts/ci_width.py --runs results/trail15 results/trail16 \\
        --config trail --baseline fcfs --rate 5
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from vllm_ext.bench.paired import ratio_summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--metrics", nargs="+", default=["mean_e2el_ms", "p99_e2el_ms"])
    args = p.parse_args()
    print(f"{'run':<22}{'method':<14}{'metric':<14}{'n':>3}{'ratio of means [95% CI]':>30}"
          f"{'width':>8}{'median ratio [95% CI]':>28}{'width':>8}")
    for run in args.runs:
        rows = json.loads((Path(run) / "compare.json").read_text())["rows"]
        unit = "round" if "round" in rows[0] else "repeat"
        method = "same-server" if unit == "round" else "back-to-back"
        for metric in args.metrics:
            s = ratio_summary(rows, args.baseline, metric, args.rate, unit)[args.config]
            print(f"{run:<22}{method:<14}{metric:<14}{s['n']:>3}"
                  f"{s['mean_ratio']:>12.2f} [{s['mean_lo']:.2f}, {s['mean_hi']:.2f}]"
                  f"{s['mean_hi'] - s['mean_lo']:>11.2f}"
                  f"{s['median']:>12.2f} [{s['lo']:.2f}, {s['hi']:.2f}]{s['hi'] - s['lo']:>11.2f}")


if __name__ == "__main__":
    main()
