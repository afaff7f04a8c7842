"""HACK (arXiv 2502.03589) CPU kernel vs vLLM's own CPU attention, per layer call.

Rule measured: one decode step of one attention layer, all requests in one call. HACK 8/4/2-bit
(``kernels/csrc`` through ``cpu_kernel.hack_attention_kernel``, records read in place) against
vLLM's ``cpu_attention_with_kv_cache`` on a bf16 cache written by its own
``cpu_attn_reshape_and_cache`` (the stock ``CPU_ATTN`` path), at the embedded model's shapes
(head size 32, 4 query / 2 KV heads, block 128, Π = 64). The variants are timed interleaved in one
process (round robin, order rotated each round) with a fixed thread count
(``torch.set_num_threads``; ``OMP_NUM_THREADS`` is set to the largest count before torch
loads), after a warm-up; median and p10-p90 over ``--reps`` rounds. Also, separately: the host
planner (``HackPlanner.plan``), the write of the step's tokens (``apply_writes``), and the seal
cost amortised per step (a step where every request seals a partition, minus a plain step,
divided by Π), and optionally the torch reference (``--ref``).

    .venv/bin/python scripts/bench_hack_kernel.py --out docs/hack/kernel_bench.json \\
        --png docs/hack/kernel_bench.png
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8, 2])
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--partition", type=int, default=64)
    ap.add_argument("--head-size", type=int, default=32, help="D (the embedded model: 32)")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--q-per-kv", type=int, default=2, help="query heads per KV head")
    ap.add_argument("--ref", action="store_true", help="also time the torch reference")
    ap.add_argument("--out")
    ap.add_argument("--png")
    ap.add_argument("--from-json", help="only redraw table and PNG from an earlier --out")
    return ap.parse_args(argv)


ARGS = parse() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["OMP_NUM_THREADS"] = str(max(ARGS.threads))

import torch  # noqa: E402

H, QG, D, BS = 2, 2, 32, 128  # the embedded model's shapes; --head-size etc. change them
if ARGS is not None:
    H, QG, D = ARGS.kv_heads, ARGS.q_per_kv, ARGS.head_size


def _stats(ts: list[float]) -> dict:
    ts = sorted(t * 1e3 for t in ts)
    q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
    return {"median_ms": statistics.median(ts), "p10_ms": q(0.1), "p90_ms": q(0.9), "n": len(ts)}


def vllm_case(R: int, L: int, g):
    import vllm._custom_ops as ops

    nbpr = (L + BS - 1) // BS
    nb = R * nbpr + 1
    kv = torch.zeros(nb, H, BS, 2 * D, dtype=torch.bfloat16)
    kc, vc = kv.view(nb, H, 2 * BS, D).chunk(2, dim=2)
    table = (torch.randperm(nb - 1, generator=g) + 1)[:R * nbpr].reshape(R, nbpr).int()
    pos = torch.arange(L)
    slots = torch.cat([table[i].long()[pos // BS] * BS + pos % BS for i in range(R)])
    ops.cpu_attn_reshape_and_cache(torch.randn(R * L, H, D, generator=g).bfloat16(),
                                   torch.randn(R * L, H, D, generator=g).bfloat16(), kc, vc,
                                   slots, "vec")
    qsl = torch.arange(R + 1, dtype=torch.int32)
    seq = torch.full((R,), L, dtype=torch.int32)
    md = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=R, num_heads=H * QG, num_kv_heads=H, head_dim=D, seq_lens=seq,
        dtype=torch.bfloat16, query_start_loc=qsl, causal=True, sliding_window_size=-1,
        isa="vec", enable_kv_split=True)

    def call(q, out):
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=kc, value_cache=vc, output=out, query_start_loc=qsl, seq_lens=seq,
            scale=D ** -0.5, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=table, softcap=0.0, scheduler_metadata=md, s_aux=None)
    return call


def hack_case(bits: int, R: int, L: int, Pi: int, g):
    """A HACK cache holding R sequences of L - 1 tokens, then the decode step writing token L."""
    from vllm_ext.kernels.kv_store import HackBatch, HackCache, HackPlanner, apply_writes
    from vllm_ext.kernels.quant import HackLayout

    lay = HackLayout(bits, D, Pi)
    nbpr = (L + BS) // BS
    nb = R * nbpr + 1
    slots = (R + 8, 2 * R + 16)
    cache = HackCache.allocate(lay, nb, H, BS, *slots)
    planner = HackPlanner(lay, BS, *slots)
    table = (torch.randperm(nb - 1, generator=g) + 1)[:R * nbpr].reshape(R, nbpr).int()
    n0 = L - 1
    plan, _, _ = planner.plan(list(range(0, R * n0 + 1, n0)), [n0] * R, table)
    kv = lambda n: torch.randn(n, H, D, generator=g).bfloat16()  # noqa: E731
    apply_writes(cache, plan, kv(R * n0), kv(R * n0))
    qsl, lens = list(range(R + 1)), [L] * R
    plan, stage, sink = planner.plan(qsl, lens, table)
    apply_writes(cache, plan, kv(R), kv(R))
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    batch = HackBatch(i32(qsl), i32(lens), table, i32(stage), i32(sink), 1)
    return cache, batch, planner, table


def write_costs(bits: int, R: int, L: int, Pi: int, g, reps: int) -> dict:
    """Planner, write and amortised seal cost of one decode step (host + torch write path)."""
    from vllm_ext.kernels.kv_store import apply_writes

    L_plain = L if L % Pi not in (0, 1) else L + 2          # a step that seals nothing
    L_seal = (L // Pi + 1) * Pi                              # the step that fills a partition
    out = {}
    for name, Lx in (("plain", L_plain), ("seal", L_seal)):
        cache, batch, planner, table = hack_case(bits, R, Lx - 1, Pi, g)
        k = torch.randn(R, H, D, generator=g).bfloat16()
        tp, tw = [], []
        for _ in range(reps):
            snap = (dict(planner.stage.slot), dict(planner.stage.last), list(planner.stage.free),
                    dict(planner.fill), dict(planner.sealed_early), dict(planner.sinks.slot),
                    dict(planner.sinks.last), list(planner.sinks.free))
            t0 = time.perf_counter()
            plan, _, _ = planner.plan(list(range(R + 1)), [Lx] * R, table)
            t1 = time.perf_counter()
            apply_writes(cache, plan, k, k)
            t2 = time.perf_counter()
            (planner.stage.slot, planner.stage.last, planner.stage.free, planner.fill,
             planner.sealed_early, planner.sinks.slot, planner.sinks.last,
             planner.sinks.free) = snap
            tp.append(t1 - t0)
            tw.append(t2 - t1)
        out[name] = {"plan": _stats(tp), "write": _stats(tw)}
    out["seal_amortised_ms"] = max(0.0, (out["seal"]["write"]["median_ms"]
                                         - out["plain"]["write"]["median_ms"]) / Pi)
    return out


def bench_point(R: int, L: int, threads: int, args, ext) -> dict:
    from vllm_ext.kernels import cpu_kernel as ck
    from vllm_ext.kernels.reference import hack_attention_ref

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(R * 10007 + L)
    q = torch.randn(R, H * QG, D, generator=g).bfloat16()
    out = torch.empty_like(q)
    fns = {"vllm_bf16": vllm_case(R, L, g)}
    for bits in args.bits:
        cache, batch, _, _ = hack_case(bits, R, L, args.partition, g)
        fns[f"hack{bits}"] = (lambda c, b: lambda q, o: ck.hack_attention_kernel(
            ext, q, c, b, D ** -0.5, o))(cache, batch)
        if args.ref and R * L <= 8 * 1024:
            fns[f"ref{bits}"] = (lambda c, b: lambda q, o: hack_attention_ref(
                q, c, b, D ** -0.5, o))(cache, batch)
    names = list(fns)
    for _ in range(args.warmup):
        for n in names:
            fns[n](q, out)
    times = {n: [] for n in names}
    for rep in range(args.reps):
        for j in range(len(names)):
            n = names[(rep + j) % len(names)]
            t0 = time.perf_counter()
            fns[n](q, out)
            times[n].append(time.perf_counter() - t0)
    row = {"requests": R, "context": L, "threads": threads}
    row.update({n: _stats(ts) for n, ts in times.items()})
    base = row["vllm_bf16"]["median_ms"]
    for bits in args.bits:
        row[f"hack{bits}_vs_vllm"] = row[f"hack{bits}"]["median_ms"] / base
    return row


def plot(rows: list[dict], bits: list[int], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 4), squeeze=False)
    for ax, t in zip(axes[0], threads):
        sub = [r for r in rows if r["threads"] == t]
        labels = [f"{r['requests']}x{r['context']}" for r in sub]
        w = 0.8 / len(bits)
        for j, b in enumerate(bits):
            xs, ys = [i + j * w for i in range(len(sub))], [r[f"hack{b}_vs_vllm"] for r in sub]
            ax.bar(xs, [min(y, 2.0) for y in ys], w, label=f"HACK {b}-bit")
            for x, y in zip(xs, ys):
                if y > 2.0:  # clipped: contention outliers on a shared machine
                    ax.text(x, 1.9, f"{y:.0f}x", ha="center", fontsize=7, rotation=90)
        ax.set_ylim(0, 2.0)
        ax.axhline(1.0, color="k", lw=1, ls="--", label="vLLM bf16 (CPU_ATTN)")
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(sub))], labels, rotation=45)
        ax.set_ylabel("time per layer call / vLLM bf16")
        ax.set_title(f"decode, {t} thread(s), head {D}, {H * QG}q/{H}kv heads, Π=64")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict], bits: list[int]) -> str:
    head = "| threads | requests x context | vLLM bf16 ms (p10-p90) | " + " | ".join(
        f"HACK {b}-bit ms (p10-p90) | vs vLLM" for b in bits) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(bits))]
    f = lambda s: f"{s['median_ms']:.3f} ({s['p10_ms']:.3f}-{s['p90_ms']:.3f})"  # noqa: E731
    for r in rows:
        cells = [str(r["threads"]), f"{r['requests']} x {r['context']}", f(r["vllm_bf16"])]
        for b in bits:
            cells += [f(r[f"hack{b}"]), f"{r[f'hack{b}_vs_vllm']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args) -> None:
    from vllm_ext.kernels import cpu_kernel as ck

    if args.from_json:
        global H, QG, D
        with open(args.from_json) as fh:
            res = json.load(fh)
        bits = res["args"]["bits"]
        H, QG, D = (res["args"].get(k, v) for k, v in
                    (("kv_heads", 2), ("q_per_kv", 2), ("head_size", 32)))
        print(table(res["rows"], bits))
        if args.png:
            plot(res["rows"], bits, args.png)
        return
    ext = ck.load_extension()
    if ext is None:
        sys.exit("the HACK CPU extension did not build")
    rows = []
    for t in args.threads:
        for R in args.requests:
            for L in args.contexts:
                rows.append(bench_point(R, L, t, args, ext))
                print(json.dumps({k: (v["median_ms"] if isinstance(v, dict) else v)
                                  for k, v in rows[-1].items()}), flush=True)
    torch.set_num_threads(1)
    writes = {}
    for R in args.requests:
        g = torch.Generator().manual_seed(R)
        writes[str(R)] = write_costs(4, R, 1024, args.partition, g, max(5, args.reps // 2))
        print("writes", R, json.dumps(writes[str(R)]), flush=True)
    print(table(rows, args.bits))
    res = {"rows": rows, "writes_4bit_ctx1024_1thread": writes, "args": vars(args),
           "torch": torch.__version__, "cpu_count": os.cpu_count()}
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    if args.png:
        plot(rows, args.bits, args.png)


if __name__ == "__main__":
    main(ARGS)
