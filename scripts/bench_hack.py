"""Benchmark HACK (arXiv 2502.03589) attention on quantized KV on the embedded testbed.

Measures, for each ``--bits`` (16 = stock vLLM):
  layout    KV bytes per token (all layers) and the ratio to bf16;
  capacity  tokens that fit the engine's fixed KV budget (``VLLM_CPU_KVCACHE_SPACE`` GiB), read
            from the engine's own log line "CPU KV cache size: N tokens";
  accuracy  end-to-end task accuracy through vLLM offline (greedy, testbed tasks without tools),
            agreement with the 16-bit outputs, and generation throughput;
  error     attention error vs dense fp32 on the model's real Q/K/V (HF transformers forward on
            the same prompts) and on synthetic K/V for head sizes 64/128: HACK (homomorphic) and
            dequantize-then-attend;
  cpu-time  torch reference vs dense vs dequantize-then-attend on one decode batch (CPU);
  gpu-time  Triton kernel vs dense (SDPA) vs dequantize-then-attend, only where CUDA exists.

    .venv/bin/python scripts/bench_hack.py --tasks 40 --out hack.json

``--engine-only --max-num-seqs 1 8 32``: only the engine runs (throughput, accuracy, agreement
and capacity) for every bit width x ``--max-num-seqs`` value, bit widths interleaved per value.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch

CAPACITY_RE = re.compile(r"KV cache size: ([\d,]+) tokens")


# ---- engine runs (one subprocess per bit width) ------------------------------------------------
def engine_child(args) -> None:
    from vllm import LLM, SamplingParams

    from vllm_ext.testbed.model import default_model_path
    from vllm_ext.testbed.tasks import KINDS, TOOL_KINDS, check_answer, generate_tasks, prompt_text

    tasks = generate_tasks(args.tasks, seed=args.seed,
                           kinds=[k for k in KINDS if k not in TOOL_KINDS])
    llm = LLM(model=args.model or default_model_path(), dtype="bfloat16", enforce_eager=True,
              seed=0, max_model_len=1024, max_num_seqs=args.max_num_seqs,
              additional_config={"vllm_ext": {"kv_bits": args.engine_child,
                                              "kv_partition": args.partition}})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    t0 = time.perf_counter()
    outs = llm.generate([prompt_text(t) for t in tasks], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    print("BENCH_CHILD " + json.dumps({
        "correct": sum(check_answer(t, o.outputs[0].text) for t, o in zip(tasks, outs)),
        "n": len(tasks), "gen_s": dt, "gen_tokens": n_tok,
        "token_ids": [list(o.outputs[0].token_ids) for o in outs]}), flush=True)


def run_engine(bits: int, args) -> dict:
    cmd = [sys.executable, __file__, "--engine-child", str(bits), "--tasks", str(args.tasks),
           "--max-tokens", str(args.max_tokens), "--partition", str(args.partition),
           "--max-num-seqs", str(args.max_num_seqs), "--seed", str(args.seed)]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    text = proc.stdout + proc.stderr
    child = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_CHILD ")]
    cap = CAPACITY_RE.search(text)
    if proc.returncode or not child or not cap:
        raise RuntimeError(f"engine run for {bits} bits failed:\n{text[-3000:]}")
    out = json.loads(child[-1][len("BENCH_CHILD "):])
    out["kv_tokens"] = int(cap.group(1).replace(",", ""))
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    def prefix(x, y):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        return n
    return {"identical": sum(x == y for x, y in zip(a, b)) / len(a),
            "mean_common_prefix": sum(prefix(x, y) for x, y in zip(a, b)) / len(a)}


# ---- attention error -------------------------------------------------------------------------
def model_qkv(model_path: str, prompts: list[str]) -> list[tuple]:
    """Per (prompt, layer): post-RoPE ``q [L, Hq, D]``, ``k, v [L, H, D]`` and the scale."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.mixtral.modeling_mixtral import apply_rotary_pos_emb

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    got = []

    def hook(mod, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        shape = (*h.shape[:-1], -1, mod.head_dim)
        q = mod.q_proj(h).view(shape).transpose(1, 2)
        k = mod.k_proj(h).view(shape).transpose(1, 2)
        v = mod.v_proj(h).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        got.append((q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                    mod.scaling))

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
               for layer in model.model.layers]
    with torch.no_grad():
        for p in prompts:
            model(**tok(p, return_tensors="pt"))
    for h in handles:
        h.remove()
    return got


def attention_errors(qkv: list[tuple], bits: int, partition: int) -> dict:
    """Relative error (||o - dense|| / ||dense||) over all query rows of every sample."""
    from vllm_ext.kernels.kv_store import prefill_cache
    from vllm_ext.kernels.quant import HackLayout
    from vllm_ext.kernels.reference import dense_attention, dequant_attention, hack_attention_ref

    num = {"hack": 0.0, "dequant": 0.0}
    den = 0.0
    for q, k, v, scale in qkv:
        layout = HackLayout(bits, k.shape[-1], partition)
        cache, batch = prefill_cache(layout, [k], [v])
        dense = dense_attention(q, k.bfloat16().float(), v.bfloat16().float(), scale)
        num["hack"] += (hack_attention_ref(q, cache, batch, scale) - dense).norm().item() ** 2
        num["dequant"] += (dequant_attention(q, cache, batch, scale) - dense).norm().item() ** 2
        den += dense.norm().item() ** 2
    return {k: (v / den) ** 0.5 for k, v in num.items()}


def synthetic_qkv(D: int, n: int = 4, L: int = 300, H: int = 2, qg: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        scale = 1 + 4 * (torch.arange(D) % 7 == 0)
        k = torch.randn(L, H, D, generator=g) * scale + torch.randn(D, generator=g)
        out.append((torch.randn(L, H * qg, D, generator=g), k, torch.randn(L, H, D, generator=g),
                    D ** -0.5))
    return out


# ---- timing ------------------------------------------------------------------------------------
def _timeit(fn, reps: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def decode_timing(bits: int, partition: int, device: str, R=8, L=1024, H=2, qg=2, D=32,
                  reps=5) -> dict:
    """ms per decode call: HACK (reference on CPU, Triton on GPU), dense, dequantize+attend."""
    from vllm_ext.kernels.kv_store import prefill_cache
    from vllm_ext.kernels.quant import HackLayout
    from vllm_ext.kernels.reference import cache_kv, dequant_attention, hack_attention_ref

    g = torch.Generator().manual_seed(0)
    ks = [torch.randn(L, H, D, generator=g).to(device) for _ in range(R)]
    vs = [torch.randn(L, H, D, generator=g).to(device) for _ in range(R)]
    cache, batch = prefill_cache(HackLayout(bits, D, partition), ks, vs)
    batch.query_start_loc = torch.arange(R + 1, dtype=torch.int32, device=device)
    batch.max_query_len = 1
    q = torch.randn(R, H * qg, D, device=device, dtype=torch.bfloat16)
    k = torch.stack(ks).transpose(1, 2).bfloat16().repeat_interleave(qg, 1)   # [R, Hq, L, D]
    v = torch.stack(vs).transpose(1, 2).bfloat16().repeat_interleave(qg, 1)
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q[:, :, None], k, v, scale=D ** -0.5)
    if device == "cuda":
        from vllm_ext.kernels.hack_attention import hack_attention
        hack = lambda: hack_attention(q, cache, batch, D ** -0.5)  # noqa: E731

        def dequant():  # dequantize the whole cache, then dense attention
            kv = [cache_kv(cache, batch, i) for i in range(R)]
            kd = torch.stack([x[0] for x in kv]).transpose(1, 2).bfloat16().repeat_interleave(qg, 1)
            vd = torch.stack([x[1] for x in kv]).transpose(1, 2).bfloat16().repeat_interleave(qg, 1)
            return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kd, vd)
    else:
        hack = lambda: hack_attention_ref(q, cache, batch, D ** -0.5)  # noqa: E731
        dequant = lambda: dequant_attention(q, cache, batch, D ** -0.5)  # noqa: E731
    return {"hack_ms": _timeit(hack, reps), "dense_ms": _timeit(dense, reps),
            "dequant_ms": _timeit(dequant, reps), "device": device,
            "shape": f"R={R} L={L} H={H} Hq={H * qg} D={D}"}


# ---- main --------------------------------------------------------------------------------------
def engine_only(args) -> None:
    rows = []
    for mns in args.engine_only or [args.max_num_seqs]:
        args.max_num_seqs = mns
        runs = {bits: run_engine(bits, args) for bits in args.bits}
        base = runs.get(16)
        for bits, run in runs.items():
            row = {"bits": bits, "max_num_seqs": mns, "kv_tokens": run["kv_tokens"],
                   "accuracy": run["correct"] / run["n"], "gen_tokens": run["gen_tokens"],
                   "gen_s": run["gen_s"], "gen_tok_per_s": run["gen_tokens"] / run["gen_s"]}
            if base:
                row["tok_per_s_vs_bf16"] = row["gen_tok_per_s"] / (base["gen_tokens"] /
                                                                   base["gen_s"])
                row["vs_16bit"] = agreement(run["token_ids"], base["token_ids"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "tasks": args.tasks, "max_tokens": args.max_tokens,
                       "partition": args.partition, "kv_gib": args.kv_gib}, f, indent=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[16, 8, 4, 2])
    ap.add_argument("--partition", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--model", default=None, help="default: the embedded testbed model")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--engine-only", nargs="*", type=int, default=None, metavar="MAX_NUM_SEQS",
                    help="only engine runs, for each of these --max-num-seqs values")
    ap.add_argument("--out", default=None)
    ap.add_argument("--engine-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine_child is not None:
        return engine_child(args)
    if args.engine_only is not None:
        return engine_only(args)

    from vllm_ext.kernels.quant import HackLayout
    from vllm_ext.testbed.model import default_model_path
    from vllm_ext.testbed.tasks import KINDS, TOOL_KINDS, generate_tasks, prompt_text
    from transformers import AutoConfig

    model = args.model or default_model_path()
    cfg = AutoConfig.from_pretrained(model)
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_tok_bf16 = cfg.num_hidden_layers * cfg.num_key_value_heads * 4 * D
    report = {"model": model, "head_dim": D, "partition": args.partition, "bits": {}}
    tasks = generate_tasks(min(args.tasks, 12), seed=args.seed,
                           kinds=[k for k in KINDS if k not in TOOL_KINDS])
    real = model_qkv(model, [prompt_text(t) + t.target for t in tasks])
    for bits in args.bits:
        row = {"kv_bytes_per_token": per_tok_bf16}
        if bits != 16:
            lay = HackLayout(bits, D, args.partition)
            row["kv_bytes_per_token"] = cfg.num_hidden_layers * cfg.num_key_value_heads \
                * lay.token_bytes
            row["attn_rel_err_model"] = attention_errors(real, bits, args.partition)
            row["attn_rel_err_synthetic"] = {
                d: attention_errors(synthetic_qkv(d), bits, args.partition) for d in (64, 128)}
            row["cpu_decode_ms"] = decode_timing(bits, args.partition, "cpu")
            if torch.cuda.is_available():
                row["gpu_decode_ms"] = decode_timing(bits, args.partition, "cuda", D=128)
        row["bytes_vs_bf16"] = row["kv_bytes_per_token"] / per_tok_bf16
        report["bits"][bits] = row
        print(bits, json.dumps(row), flush=True)
    if not torch.cuda.is_available():
        report["gpu_decode_ms"] = "skipped: no CUDA device"
    if not args.skip_engine:
        runs = {bits: run_engine(bits, args) for bits in args.bits}
        base = runs.get(16)
        for bits, run in runs.items():
            row = report["bits"][bits]
            row.update({"kv_tokens": run["kv_tokens"], "accuracy": run["correct"] / run["n"],
                        "gen_tok_per_s": run["gen_tokens"] / run["gen_s"]})
            if base:
                row["kv_tokens_vs_bf16"] = run["kv_tokens"] / base["kv_tokens"]
                row["vs_16bit"] = agreement(run["token_ids"], base["token_ids"])
            print(bits, json.dumps({k: v for k, v in row.items() if "err" not in k}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
