"""The starvation bound's clock vs what clients see: the scheduler's online step-cost fit
(`vllm_ext_step_cost_seconds` on /metrics) against the measured inter-token gap and TPOT.

Starts `vllm-ext serve --max-num-seqs 2 --ext-policy trail`, replays one trace, prints both:
    .venv/bin/python scripts/step_clock.py --trace results/trail15/trace@5.0.jsonl
"""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import httpx

from vllm_ext.bench.loadgen import run_load
from vllm_ext.bench.metrics import summarize
from vllm_ext.bench.servers import running_server
from vllm_ext.bench.workload import parse_trace
from vllm_ext.testbed.model import default_model_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", required=True)
    p.add_argument("--server-args", default="--max-num-seqs 2 --ext-policy trail")
    args = p.parse_args()
    reqs = parse_trace(args.trace)
    with running_server("ext", default_model_path(), args.server_args,
                        Path("results/step_clock.server.log")) as server:
        records, wall = asyncio.run(run_load(server.url, "bench", reqs, progress=False))
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
    summary = summarize(records, wall)
    print(f"mean TPOT {summary['mean_tpot_ms']:.1f} ms, median inter-token gap "
          f"{summary['median_itl_ms']:.1f} ms")
    print("\n".join(line for line in metrics.splitlines()
                    if line.startswith("vllm_ext_step_cost_seconds")))


if __name__ == "__main__":
    main()
