"""The telemetry's consumer in the engine, measured: the hot-prefix hint
(``--ext-telemetry-hot-prefix N``, `vllm_ext.telemetry.engine`) on vLLM's own scheduler.

No model runs: vLLM's V1 scheduler (our `PredictiveSyncScheduler`, FCFS policy) with its real
KV-cache manager and prefix cache is driven step by step, each step "taking" the time of the
step cost fitted on this machine's served engine (results/sim/profile-trail13-fcfs.json:
``base + per_token x scheduled tokens``), each scheduled request that completes its prompt
"sampling" one token. What is measured is the scheduling: TTFT / end-to-end latency on that
clock and the prefix-cache hit rate, with the hint off (telemetry on, hint 0 - and telemetry off,
to check it changes nothing) and on, without and with its starvation bound.

Workload ("testbed with shared preambles"): the testbed prompts (`bench.workload`, tokenised
with the testbed tokenizer), each after one of D preambles of P tokens drawn Zipf(1.1) -
documents or system prompts that many requests share; output = the task's reference answer
length (capped); Poisson arrivals; a KV cache small enough that preambles get evicted.

  .venv/bin/python scripts/eval_hot_prefix.py          # writes docs/telemetry/hot_prefix.*
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
BLOCK = 16


def build_scheduler(ext: dict, blocks: int, max_seqs: int, batched: int):
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_ext.sched.scheduler import PredictiveSyncScheduler
    from vllm_ext.testbed.model import default_model_path

    mc = ModelConfig(model=default_model_path(), dtype="float32", seed=0, max_model_len=2048)
    sc = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=batched,
                         max_model_len=2048, is_encoder_decoder=False, async_scheduling=False)
    cc = CacheConfig(block_size=BLOCK, enable_prefix_caching=True)
    cc.num_gpu_blocks = blocks
    vc = VllmConfig(model_config=mc, scheduler_config=sc, cache_config=cc,
                    additional_config={"vllm_ext": ext})
    kv = KVCacheConfig(num_blocks=blocks, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["l0"], FullAttentionSpec(block_size=BLOCK, num_kv_heads=1,
                                                   head_size=16, dtype=torch.float32))])
    return PredictiveSyncScheduler(vllm_config=vc, kv_cache_config=kv,
                                   structured_output_manager=StructuredOutputManager(vc),
                                   block_size=BLOCK, log_stats=False)


def workload(n: int, seed: int, docs: int, preamble: int, rate: float, max_out: int):
    from vllm_ext.bench.workload import testbed_requests
    from vllm_ext.testbed.tokenizer import build_tokenizer

    tok = build_tokenizer()
    rng = np.random.default_rng(seed)
    pre = [rng.integers(3, 250, preamble).tolist() for _ in range(docs)]
    doc = np.minimum(rng.zipf(1.1, n), docs) - 1
    gaps = rng.exponential(1.0 / rate, n)
    out = []
    for i, (r, t) in enumerate(zip(testbed_requests(n, rate, seed), np.cumsum(gaps))):
        ids = pre[doc[i]] + tok(r.prompt)["input_ids"]
        out.append((float(t), ids, max(1, min(max_out, r.true_output_len or max_out))))
    return out


def replay(ext: dict, reqs, cost: dict, blocks: int, max_seqs: int, batched: int) -> dict:
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    s = build_scheduler(ext, blocks, max_seqs, batched)
    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    now, i, first, done, cached, objs = 0.0, 0, {}, {}, {}, {}
    wall = time.perf_counter()
    while len(done) < len(reqs):
        while i < len(reqs) and reqs[i][0] <= now:
            t, ids, out = reqs[i]
            r = Request(f"r{i}", ids, SamplingParams(max_tokens=out, ignore_eos=True), None,
                        arrival_time=t, block_hasher=hasher)
            objs[r.request_id] = (t, len(ids))
            s.add_request(r)
            i += 1
        so = s.schedule()
        if so.total_num_scheduled_tokens == 0:
            now = reqs[i][0] if i < len(reqs) else now + cost["base_s"]
            continue
        now += cost["base_s"] + cost["per_token_s"] * so.total_num_scheduled_tokens
        for new in so.scheduled_new_reqs:  # first schedule: computed = prefix-cache hits
            cached.setdefault(new.req_id, new.num_computed_tokens)
        ids, sampled = [], []
        for rid, n in so.num_scheduled_tokens.items():
            req = s.requests[rid]
            ids.append(rid)
            if req.num_computed_tokens >= req.num_tokens:  # prompt done: one token
                sampled.append([7])
                first.setdefault(rid, now)
            else:
                sampled.append([])
        mro = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: k for k, r in enumerate(ids)},
                                sampled_token_ids=sampled)
        for out in s.update_from_output(so, mro).values():
            for o in out.outputs:
                if o.finish_reason is not None:
                    done[o.request_id] = now
    ttft = np.array([first[r] - objs[r][0] for r in objs])
    e2e = np.array([done[r] - objs[r][0] for r in objs])
    prompt = sum(p for _, p in objs.values())
    tele = s.ext_telemetry.report() if s.ext_telemetry is not None else None
    return {"requests": len(objs), "ttft_mean_s": float(ttft.mean()),
            "ttft_p50_s": float(np.median(ttft)), "ttft_p99_s": float(np.quantile(ttft, 0.99)),
            "e2e_mean_s": float(e2e.mean()), "e2e_p99_s": float(np.quantile(e2e, 0.99)),
            "prefix_hit_rate": sum(cached.values()) / prompt, "sim_makespan_s": now,
            "wall_s": time.perf_counter() - wall,
            "reorders": (tele or {}).get("hot_prefix", {}).get("reorders")}


def micro(repeats: int = 3) -> list[str]:
    """CPU cost of feeding the prefix telemetry at add_request (the only per-request work in
    the engine): microseconds per request, best of `repeats` runs of 2000 requests."""
    from types import SimpleNamespace

    from vllm_ext.config import ExtConfig
    from vllm_ext.telemetry.engine import SchedulerTelemetry

    rng = np.random.default_rng(0)
    lines = ["", "Per-request CPU cost of the telemetry at add_request (best of "
             f"{repeats} x 2000 requests, random block hashes):", "",
             "| blocks per request | top-k tracker | us per request |", "|---|---|---|"]
    for blocks in (2, 8, 33):
        reqs = [SimpleNamespace(request_id=f"r{i}", num_prompt_tokens=BLOCK * blocks,
                                block_hashes=[rng.bytes(32) for _ in range(blocks)])
                for i in range(2000)]
        for learned in (True, False):
            best = float("inf")
            for _ in range(repeats):
                tel = SchedulerTelemetry(ExtConfig(telemetry=True, telemetry_learned=learned))
                t = time.perf_counter()
                for r in reqs:
                    tel.on_request(r)
                best = min(best, (time.perf_counter() - t) / len(reqs))
            lines.append(f"| {blocks} | {'LWCSS' if learned else 'WCSS'} | {best * 1e6:.0f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--preamble", type=int, default=512)
    p.add_argument("--rates", default="30,45,60")
    p.add_argument("--blocks", type=int, default=512)
    p.add_argument("--max-seqs", type=int, default=16)
    p.add_argument("--batched", type=int, default=2048)
    p.add_argument("--max-out", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--profile", default="results/sim/profile-trail13-fcfs.json")
    p.add_argument("--out", default="docs/telemetry")
    args, _ = p.parse_known_args()
    cost = json.loads(Path(args.profile).read_text())["cost"]
    configs = {"telemetry off": {}, "hint off (telemetry on)": {"telemetry": True},
               "hint N=2, no bound": {"telemetry": True, "telemetry_hot_prefix": 2,
                                      "telemetry_hot_prefix_wait_steps": 0},
               "hint N=2, bound 256 steps": {"telemetry": True, "telemetry_hot_prefix": 2,
                                             "telemetry_hot_prefix_wait_steps": 256},
               "hint N=2, bound 64 steps": {"telemetry": True, "telemetry_hot_prefix": 2,
                                            "telemetry_hot_prefix_wait_steps": 64}}
    p.add_argument("--table-only", action="store_true",
                   help="rewrite hot_prefix.md from the saved hot_prefix.json")
    p.add_argument("--micro-only", action="store_true",
                   help="only the per-request CPU cost (printed)")
    args = p.parse_args()
    out = Path(args.out)
    if args.micro_only:
        return print("\n".join(micro()))
    if args.table_only:
        saved = json.loads((out / "hot_prefix.json").read_text())
        return table(out, saved["rows"], saved["cost"], configs, argparse.Namespace(
            **saved["args"]))
    rows = []
    for rate in [float(r) for r in args.rates.split(",")]:
        for seed in range(args.seeds):
            reqs = workload(args.requests, seed, args.docs, args.preamble, rate, args.max_out)
            for name, ext in configs.items():
                res = replay(ext, reqs, cost, args.blocks, args.max_seqs, args.batched)
                rows.append({"rate": rate, "seed": seed, "config": name, **res})
                print(json.dumps(rows[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hot_prefix.json").write_text(json.dumps({"args": vars(args), "cost": cost,
                                                     "rows": rows}, indent=1))
    table(out, rows, cost, configs, args)


def table(out: Path, rows, cost, configs, args) -> None:
    lines = ["# Hot-prefix hint on vLLM's scheduler (generated by scripts/eval_hot_prefix.py)",
             "", f"cost: base {cost['base_s'] * 1e3:.2f} ms + {cost['per_token_s'] * 1e6:.2f} "
             f"us/token; {args.requests} requests x {args.seeds} seeds per rate; mean over seeds "
             "(min-max); replay wall s = real time of the whole replay loop (requests built "
             "and hashed, schedule(), update_from_output()): between rows it differs by the "
             "telemetry's CPU cost (noisy: a shared 2-core machine)", "",
             "| rate req/s | config | TTFT mean s | TTFT p50 s | TTFT p99 s | e2e mean s | "
             "prefix hit rate | TTFT mean vs hint off | replay wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rate in sorted({r["rate"] for r in rows}):
        base = [r for r in rows if r["rate"] == rate and r["config"] == "hint off (telemetry on)"]
        for name in configs:
            rs = [r for r in rows if r["rate"] == rate and r["config"] == name]
            ratio = [r["ttft_mean_s"] / b["ttft_mean_s"] for r, b in zip(rs, base)]

            def fmt(key):
                v = [r[key] for r in rs]
                return f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})"
            lines.append(f"| {rate:g} | {name} | {fmt('ttft_mean_s')} | {fmt('ttft_p50_s')} | "
                         f"{fmt('ttft_p99_s')} | {fmt('e2e_mean_s')} | {fmt('prefix_hit_rate')} | "
                         f"{np.mean(ratio):.3f} ({min(ratio):.3f}-{max(ratio):.3f}) | "
                         f"{fmt('wall_s')} |")
    (out / "hot_prefix.md").write_text("\n".join(lines + micro()) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
