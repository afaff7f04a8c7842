"""Cost of the prediction channel: decode throughput at batch 32 with the length probe on
(every step, and every 8 steps) vs ProbeWorker without probes vs the stock worker.

Each configuration runs in its own process (one engine each), same seeded batch:
    .venv/bin/python scripts/bench_probe_overhead.py --probe vllm_ext/assets/probes/length-*.pt

With ``--policies fcfs,spjf,trail,oracle`` it measures the scheduler policies instead: all
``--queue`` requests are queued at once in front of ``--batch`` decode slots, so every step
sorts a deep waiting queue. All have the same output length and policy preemption is off, so
any order gives the same batches and the throughput ratio is the policy's own per-step cost
(ordering, prediction bookkeeping, probe). Ratios are against the first policy listed;
``trail@16`` is trail with the probe every 16 steps (``trail@1000000``: the prefill probe only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(spec: dict) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    kwargs = dict(model=spec["model"], dtype="bfloat16", seed=0, max_num_seqs=spec["batch"])
    if spec["worker"] == "ext":
        kwargs["worker_cls"] = "vllm_ext.worker.probe_worker.ProbeWorker"
        kwargs["additional_config"] = {"vllm_ext": spec["ext"]}
    if spec["worker"] == "ext" and "policy" in spec["ext"]:
        kwargs["scheduler_cls"] = "vllm_ext.sched.scheduler.PredictiveScheduler"
    llm = LLM(**kwargs)
    deep = "queue" in spec  # --policies: a deep queue of equal-length requests, mixed prompts;
    # any order gives the same batches, so throughput differences are the policy's own cost
    n = spec["queue"] if deep else spec["batch"]
    prompts = [{"prompt_token_ids": [100 + (i * 7 + j) % 60
                                     for j in range(16 + i % 48 if deep else 32)]}
               for i in range(n)]
    params = SamplingParams(max_tokens=spec["tokens"], ignore_eos=True, temperature=0.0,
                            extra_args={"ext_true_output_len": spec["tokens"]} if deep else None)
    llm.generate(prompts[:4], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    rates = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0))
    print("RESULT " + json.dumps({"name": spec["name"], "tok_per_s": rates}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--probe", help="the length probe file (not needed with --policies)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds against drift")
    p.add_argument("--policies", help="comma list: measure scheduler policies instead (see top)")
    p.add_argument("--queue", type=int, default=96, help="--policies: requests queued at once")
    args = p.parse_args()
    from vllm_ext.testbed.model import default_model_path

    model = args.model or default_model_path()
    if not (args.probe or args.policies):
        p.error("--probe is required (unless --policies)")
    base = {"model": model, "batch": args.batch, "tokens": args.tokens, "repeats": args.repeats}
    configs = policy_configs(args, base) if args.policies else [
        {"name": "stock worker", "worker": "stock"},
        {"name": "ProbeWorker, no probe", "worker": "ext", "ext": {}},
        {"name": "probe every 8 steps", "worker": "ext",
         "ext": {"probe_paths": [os.path.abspath(args.probe)], "probe_every": 8}},
        {"name": "probe every step", "worker": "ext",
         "ext": {"probe_paths": [os.path.abspath(args.probe)], "probe_every": 1}},
    ]
    results = {}
    for rnd in range(args.rounds):  # interleaved rounds against drift
        for cfg in configs:
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps({**base, **cfg})],
                                 capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{cfg['name']} failed:\n{(out.stdout + out.stderr)[-3000:]}")
            results.setdefault(cfg["name"], []).extend(json.loads(line[7:])["tok_per_s"])
    ref = configs[0]["name"]
    best, median = max(results[ref]), statistics.median(results[ref])
    what = (f"{args.queue} requests queued, {args.tokens} tokens each" if args.policies
            else f"{args.tokens} tokens each")
    print(f"decode throughput, batch {args.batch}, {what}, "
          f"{args.rounds * args.repeats} runs per configuration; ratio to {ref}")
    print(f"  {'':<24}{'best tok/s':>11}{'ratio':>8}{'median tok/s':>14}{'ratio':>8}")
    for name, rates in results.items():
        print(f"  {name:<24}{max(rates):>11.0f}{max(rates) / best:>7.3f}x"
              f"{statistics.median(rates):>14.0f}{statistics.median(rates) / median:>7.3f}x")


def policy_configs(args, base: dict) -> list[dict]:
    base["queue"] = args.queue
    ext = {"max_preemptions_per_request": 0}  # same token work for every policy
    configs = []
    for entry in args.policies.split(","):  # "trail@16": probe every 16 steps
        policy, _, every = entry.partition("@")
        extra = {"probe_every": int(every)} if every else {}
        configs.append({"name": entry, "worker": "ext", "ext": {**ext, "policy": policy, **extra}})
    return configs


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
    else:
        main()
