"""Write a long-context benchmark trace: testbed tasks behind a long distinct preamble.

Each request's prompt is a testbed task (chat template) whose user turn starts with a
``--context-bytes`` preamble of seeded random words, different for every request, so no two
requests share a cached prefix (the byte tokenizer: one token per byte). Arrivals are Poisson at
``--rate`` (a very high rate = bursts). Used for HACK's equal-KV-memory run (docs/hack.md), where
what matters is how many such contexts fit the KV budget at once:
    .venv/bin/python scripts/make_long_trace.py --num-requests 256 --rate 1000 \\
        --context-bytes 1024 --max-tokens 128 --out results/hack-long/trace.jsonl
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vllm_ext.bench.workload import arrival_times
from vllm_ext.testbed.tasks import ASSISTANT, USER, generate_tasks

WORDS = ("the of and to in is was for on are with as by at from this that be it an or have "
         "not which one all were when there can more their if will about up out them some "
         "time these two may first then do any like new now other could our into only see").split()


def preamble(rng: np.random.Generator, nbytes: int) -> str:
    words, size = [], 0
    while size < nbytes:
        w = WORDS[int(rng.integers(len(WORDS)))]
        words.append(w)
        size += len(w) + 1
    return " ".join(words)[:nbytes]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--context-bytes", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    tasks = generate_tasks(args.num_requests, args.seed, kinds=["add", "sub", "sort", "count"])
    times = arrival_times(args.num_requests, args.rate, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for t, task in zip(times, tasks):
            prompt = f"{USER}{preamble(rng, args.context_bytes)}\n{task.prompt}\n{ASSISTANT}"
            f.write(json.dumps({"arrival_s": float(t), "prompt": prompt,
                                "max_tokens": args.max_tokens}) + "\n")
    print(f"{args.num_requests} requests, ~{args.context_bytes} context bytes each -> {out}")


if __name__ == "__main__":
    main()
