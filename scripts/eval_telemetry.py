"""Error vs memory of the telemetry structures against exact counts (issue 18, docs/telemetry.md).

Traces: ``zipf`` (Zipf(1.1) items, static popularity), ``zipf-drift`` (the same, the 100
hottest ids replaced every eighth of the trace), ``testbed`` (the embedded model's testbed
prompts, `vllm_ext.bench.workload.testbed_requests`, tokenised with the testbed tokenizer, cut
into 16-token blocks with vLLM-style chained hashes; arrivals at 5 req/s).

Part A - fragmented (DiSketch, `vllm_ext.telemetry.fragments`) vs one sketch at equal memory M,
Count-Min and Count Sketch, depth 4; error = mean |estimate - exact| / N_range over the 50
heaviest items of the range and 200 random ones seen in it (epsilon, the normalised error):
  * ``all``: a query over the whole trace; ``range``: over its last eighth (one sketch can
    only scale its whole-trace count by the range's share, the best it can do);
  * ``total`` accounting: the fragments held, together, fit M (8 fragments of M/8);
    ``live`` accounting (DiSketch's own: a node holds only its open fragment, of M, closed
    ones go to the collector - here the API server or `vllm-ext telemetry merge`);
  * ``replicas``: 4 replicas with budgets M, M/2, M/4, M/8 sharing the traffic round-robin;
    one sketch per replica must share one shape to merge (the smallest), fragments keep each
    replica's own width (closing at rho x width: error equalisation).
Part B - learned (LWCSS, `vllm_ext.telemetry.learned`) vs plain WCSS at equal memory over the
last W arrivals (zipf: W = 4096 and 32768 items; testbed: one item per request, its first
<= 4 blocks, W = 1024 requests); sized by the engine's own rule (`collect.tracker`), memory = peak bytes
actually held (predictor, label buffer and Bloom filters included); error = on-arrival mean
|estimate - exact window count| / W.

  .venv/bin/python scripts/eval_telemetry.py            # writes docs/telemetry/*
  .venv/bin/python scripts/eval_telemetry.py --quick    # smaller traces, a smoke run
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np

from vllm_ext.telemetry.collect import tracker
from vllm_ext.telemetry.fragments import FragmentedSketch
from vllm_ext.telemetry.hashing import key_of
from vllm_ext.telemetry.learned import LearnedWindow
from vllm_ext.telemetry.sketch import Sketch, width_for

DEPTH, BLOCK = 4, 16
KIB = 1024


# ---- traces --------------------------------------------------------------------------------
def zipf_trace(n: int, seed: int, drift: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ranks = rng.zipf(1.1, n).astype(np.uint64)
    if drift:
        phase = (np.arange(n) * 8 // n).astype(np.uint64)
        hot = ranks <= 100
        ranks[hot] += np.uint64(10 ** 9) * (phase[hot] + np.uint64(1))
    keys = np.fromiter((key_of(int(r)) for r in ranks), dtype=np.uint64, count=n)
    return keys, np.arange(n, dtype=np.float64)


def testbed_requests(n: int, seed: int):
    """[(arrival_s, block hashes, prompt tokens)] of n testbed requests."""
    from vllm_ext.bench.workload import testbed_requests as requests
    from vllm_ext.testbed.tokenizer import build_tokenizer

    tok = build_tokenizer()
    out = []
    for r in requests(n, 5.0, seed):
        ids = tok(r.prompt)["input_ids"]
        parent, hashes = b"", []
        for b in range(len(ids) // BLOCK):
            parent = hashlib.sha256(parent + np.asarray(ids[b * BLOCK:(b + 1) * BLOCK],
                                                        dtype=np.int32).tobytes()).digest()
            hashes.append(parent)
        out.append((r.arrival_s, hashes, len(ids)))
    return out


def testbed_block_trace(reqs):
    keys, times = [], []
    for t, hashes, _ in reqs:
        keys += [key_of(h) for h in hashes]
        times += [t] * len(hashes)
    return np.asarray(keys, dtype=np.uint64), np.asarray(times)


# ---- part A ----------------------------------------------------------------------------------
def query_items(keys: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    uniq, counts = np.unique(keys, return_counts=True)
    heavy = np.argsort(-counts)[:50]
    rand = rng.choice(uniq.size, size=min(200, uniq.size), replace=False)
    pick = np.unique(np.concatenate([heavy, rand]))
    return uniq[pick], counts[pick]


def feed(fs: FragmentedSketch, keys, times, batch: int = 512) -> None:
    for i in range(0, keys.size, batch):
        fs.add(keys[i:i + batch], now=float(times[i]))


def frag_error(fs, keys, times, t0, now, rng) -> float:
    sel = times >= t0
    q, true = query_items(keys[sel], rng)
    est = fs.estimate(q, t0, math.inf, now=now).values
    return float(np.abs(est - true).mean() / sel.sum())


def one_error(kind, budget, keys, times, t0, rng) -> float:
    s = Sketch(kind, DEPTH, width_for(budget, DEPTH), seed=1)
    s.add(keys)
    sel = times >= t0
    q, true = query_items(keys[sel], rng)
    est = s.query(q) * (sel.sum() / keys.size)  # one sketch: scale by the range's share
    return float(np.abs(est - true).mean() / sel.sum())


def part_a(traces: dict, memories: list[int], seed: int) -> list[dict]:
    rows = []
    for name, (keys, times) in traces.items():
        n, end = keys.size, float(times[-1]) + 1.0
        t_range = float(times[n - n // 8])
        for kind in ("cm", "cs"):
            for m in memories:
                row = {"trace": name, "kind": kind, "memory_kib": m // KIB}
                for label, t0 in (("all", -math.inf), ("range", t_range)):
                    rng = np.random.default_rng(seed)
                    row[f"one_{label}"] = one_error(kind, m, keys, times, t0, rng)
                    for acct, frag_bytes, budget in (("total", m // 8, m), ("live", m, 1 << 40)):
                        w = width_for(frag_bytes, DEPTH)
                        fs = FragmentedSketch(kind, DEPTH, budget, frag_bytes,
                                              rho=n / 8 / w, epoch_s=1e18, seed=1)
                        feed(fs, keys, times)
                        rng = np.random.default_rng(seed)
                        row[f"frag_{acct}_{label}"] = frag_error(fs, keys, times, t0, end, rng)
                row.update(replicas(kind, m, keys, times, end, seed))
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def replicas(kind, m, keys, times, end, seed) -> dict:
    budgets = [m, m // 2, m // 4, m // 8]
    node = np.arange(keys.size) % 4
    merged_frag = merged_one = None
    rho = keys.size / 4 / 8 / width_for(m // 8, DEPTH)  # 8 sub-epochs on the smallest replica
    for r, b in enumerate(budgets):
        sel = node == r
        fs = FragmentedSketch(kind, DEPTH, 1 << 40, b, rho=rho, epoch_s=1e18, seed=1,
                              node=f"r{r}")
        feed(fs, keys[sel], times[sel])
        merged_frag = fs if merged_frag is None else merged_frag.merge(fs)
        one = Sketch(kind, DEPTH, width_for(min(budgets), DEPTH), seed=1)
        one.add(keys[sel])
        merged_one = one if merged_one is None else merged_one.merge(one)
    rng = np.random.default_rng(seed)
    q, true = query_items(keys, rng)
    frag = merged_frag.estimate(q, now=end).values
    return {"replicas_one": float(np.abs(merged_one.query(q) - true).mean() / keys.size),
            "replicas_frag": float(np.abs(frag - true).mean() / keys.size)}


# ---- part B ----------------------------------------------------------------------------------
def window_error(items, feats, window: int, summary) -> tuple[float, int]:
    win, exact, errs = deque(), Counter(), []
    for i, key in enumerate(items):
        if isinstance(summary, LearnedWindow):
            summary.add(key, feats[i] if feats else ())
        else:
            summary.add(key)
        win.append(key)
        exact[key] += 1
        if len(win) > window:
            old = win.popleft()
            exact[old] -= 1
        if i >= window:
            errs.append(abs(summary.query(key) - exact[key]))
    peak = summary.peak_bytes
    return float(np.mean(errs) / window), peak


def part_b(streams: dict, budgets: list[int]) -> list[dict]:
    rows = []
    for name, (items, feats, window) in streams.items():
        for b in budgets:
            row = {"trace": name, "window": window, "budget_kib": b // KIB}
            # guard: the predictor replaced by "never recurs" (threshold > 1), so only the
            # Bloom guard decides: the ablation that shows what the learning adds
            # free: the paper's accounting (the predictor is a black box outside the summary's
            # memory): LWCSS with all of plain WCSS's counters, predictor and Bloom not counted
            for label, learned, threshold in (("plain", False, 0.5), ("learned", True, 0.5),
                                              ("guard", True, 1.1), ("free", True, 0.5)):
                s = tracker(b, window, learned, threshold)
                if label == "free":
                    s = LearnedWindow(window, tracker(b, window, False).counters, threshold,
                                      bloom_bits=s.bloom_bits, buffer_size=32)
                err, peak = window_error(items, feats, window, s)
                if label == "free":
                    peak = s.wcss.peak_bytes
                row[f"{label}_error"], row[f"{label}_peak_kib"] = err, peak / KIB
                if learned:
                    row[f"{label}_filtered"] = s.filtered / len(items)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ---- reporting -------------------------------------------------------------------------------
def memory_for(mems, errs, target: float) -> float | None:
    """Memory at which the curve (mems, errs) reaches `target` (log-log interpolation of the
    measured points, errors decreasing in memory); None outside the measured range."""
    lm, le = np.log(np.asarray(mems, float)), np.log(np.maximum(np.asarray(errs, float), 1e-12))
    order = np.argsort(le)
    if target <= 0 or not le.min() <= math.log(target) <= le.max():
        return None
    return float(np.exp(np.interp(math.log(target), le[order], lm[order])))


def equal_error_lines(a, b) -> list[str]:
    """For each fragmented / learned point: the memory the baseline needs for the same error,
    as a ratio (< 1: the new structure needs less memory)."""
    out = ["| trace | structure | query | at KiB | memory / baseline memory at equal error |",
           "|---|---|---|---|---|"]
    for trace in sorted({r["trace"] for r in a}):
        for kind in ("cm", "cs"):
            rs = [r for r in a if r["trace"] == trace and r["kind"] == kind]
            mems = [r["memory_kib"] for r in rs]
            for key, base in (("frag_live_all", "one_all"), ("frag_live_range", "one_range"),
                              ("frag_total_all", "one_all"), ("frag_total_range", "one_range"),
                              ("replicas_frag", "replicas_one")):
                for r in rs:
                    if r["memory_kib"] not in (8, 32):
                        continue
                    need = memory_for(mems, [x[base] for x in rs], r[key])
                    ratio = "outside measured range" if need is None else \
                        f"{r['memory_kib'] / need:.2f}"
                    out.append(f"| {trace} | {kind} {key} | vs {base} | {r['memory_kib']} | "
                               f"{ratio} |")
    for trace in sorted({r["trace"] for r in b}):
        rs = [r for r in b if r["trace"] == trace]
        for label in ("learned", "guard", "free"):
            for r in rs:
                need = memory_for([x["plain_peak_kib"] for x in rs],
                                  [x["plain_error"] for x in rs], r[f"{label}_error"])
                ratio = "outside measured range" if need is None else \
                    f"{r[f'{label}_peak_kib'] / need:.2f}"
                out.append(f"| {trace} | {label} WCSS | window | {r[f'{label}_peak_kib']:.1f} "
                           f"| {ratio} |")
    return out


def write(out: Path, a: list[dict], b: list[dict], args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"part_a": a, "part_b": b,
                                                  "args": vars(args)}, indent=1))
    lines = ["# Telemetry error vs memory (generated by scripts/eval_telemetry.py)", "",
             "## A. Fragmented (DiSketch) vs one sketch, equal memory; error = mean |err| / N",
             "", "| trace | sketch | KiB | one, all | frag total, all | frag live, all | "
             "one, range | frag total, range | frag live, range | replicas one | "
             "replicas frag |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in a:
        lines.append("| {trace} | {kind} | {memory_kib} | {one_all:.2e} | {frag_total_all:.2e} | "
                     "{frag_live_all:.2e} | {one_range:.2e} | {frag_total_range:.2e} | "
                     "{frag_live_range:.2e} | {replicas_one:.2e} | {replicas_frag:.2e} |"
                     .format(**r))
    lines += ["", "## B. Learned (LWCSS) vs plain WCSS sliding window, equal budget; "
              "error = on-arrival mean |err| / W", "",
              "| trace | W | budget KiB | plain error | plain peak KiB | learned error | "
              "learned peak KiB | learned filtered | guard-only error | guard-only peak KiB | "
              "learned, predictor + Bloom not counted: error | its counted KiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in b:
        lines.append("| {trace} | {window} | {budget_kib} | {plain_error:.2e} | "
                     "{plain_peak_kib:.1f} | {learned_error:.2e} | {learned_peak_kib:.1f} | "
                     "{learned_filtered:.2f} | {guard_error:.2e} | {guard_peak_kib:.1f} | "
                     "{free_error:.2e} | {free_peak_kib:.1f} |"
                     .format(**r))
    lines += ["", "## Memory at equal error (interpolated on the measured curves)", ""]
    lines += equal_error_lines(a, b)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot(out, a, b)


def plot(out: Path, a, b) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = sorted({r["trace"] for r in a})
    fig, axes = plt.subplots(2, len(traces), figsize=(5 * len(traces), 8), squeeze=False)
    for col, trace in enumerate(traces):
        for row, label in enumerate(("all", "range")):
            ax = axes[row][col]
            for kind, style in (("cm", "-"), ("cs", "--")):
                rs = [r for r in a if r["trace"] == trace and r["kind"] == kind]
                mem = [r["memory_kib"] for r in rs]
                for key, color in (("one", "k"), ("frag_total", "tab:blue"),
                                   ("frag_live", "tab:green")):
                    ax.loglog(mem, [max(r[f"{key}_{label}"], 1e-7) for r in rs], style,
                              color=color, marker="o", ms=3, label=f"{kind} {key}")
            ax.set_title(f"{trace}: query over {'whole trace' if label == 'all' else 'last 1/8'}")
            ax.set_xlabel("memory (KiB)")
            ax.set_ylabel("mean |err| / N")
            if col == 0 and row == 0:
                ax.legend(fontsize=7)
            _kib_ticks(ax, sorted({r["memory_kib"] for r in a}))
    fig.tight_layout()
    fig.savefig(out / "error_vs_memory.png", dpi=110)
    traces = sorted({r["trace"] for r in b})
    fig, axes = plt.subplots(1, len(traces), figsize=(5 * len(traces), 4), squeeze=False)
    for col, trace in enumerate(traces):
        ax = axes[0][col]
        rs = [r for r in b if r["trace"] == trace]
        ax.loglog([r["plain_peak_kib"] for r in rs], [r["plain_error"] for r in rs], "k-o",
                  ms=3, label="WCSS")
        ax.loglog([r["learned_peak_kib"] for r in rs], [r["learned_error"] for r in rs],
                  "-o", color="tab:red", ms=3, label="learned WCSS")
        ax.loglog([r["guard_peak_kib"] for r in rs], [r["guard_error"] for r in rs],
                  ":o", color="tab:orange", ms=3, label="Bloom guard only (no predictor)")
        ax.loglog([r["free_peak_kib"] for r in rs], [r["free_error"] for r in rs],
                  "--o", color="tab:purple", ms=3, label="learned, predictor+Bloom not counted")
        ax.set_title(f"sliding window, {trace}, W = {rs[0]['window']}")
        ax.set_xlabel("peak memory held (KiB)")
        ax.set_ylabel("on-arrival mean |err| / W")
        ax.legend(fontsize=7)
        _kib_ticks(ax, [4, 8, 16, 32, 64])
    fig.tight_layout()
    fig.savefig(out / "sliding_window.png", dpi=110)


def _kib_ticks(ax, ticks) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/telemetry")
    p.add_argument("--part", choices=("all", "b"), default="all",
                   help="b: rerun part B only, keeping part A from the saved results.json")
    args = p.parse_args()
    t = time.time()
    n, reqs_n = (30_000, 3000) if args.quick else (200_000, 20_000)
    reqs = testbed_requests(reqs_n, args.seed)
    traces = {"zipf": zipf_trace(n, args.seed, False), "zipf-drift": zipf_trace(n, args.seed, True),
              "testbed": testbed_block_trace(reqs)}
    memories = [KIB * m for m in ((2, 8, 32) if args.quick else (2, 4, 8, 16, 32, 64))]
    if args.part == "b":
        a = json.loads((Path(args.out) / "results.json").read_text())["part_a"]
    else:
        a = part_a(traces, memories, args.seed)
    zipf_items = [int(k) for k in traces["zipf"][0][: n // 2]]
    prefix_items, prefix_feats = [], []
    for _, hashes, ntok in reqs:
        if hashes:
            depth = min(len(hashes), 4)
            prefix_items.append(key_of(hashes[depth - 1]))
            prefix_feats.append((("first", key_of(hashes[0])), ("len", int(math.log2(1 + ntok)))))
    # W = 32768: the paper's regime, a window much larger than the summary, where LWCSS's
    # at most two undercounts per window (2 / W) no longer floor the error
    streams = {"zipf": (zipf_items, None, 4096), "zipf-W32k": (zipf_items, None, 32768),
               "testbed": (prefix_items, prefix_feats, 1024)}
    budgets = [KIB * m for m in ((8, 32) if args.quick else (4, 6, 8, 12, 16, 24, 32, 48, 64))]
    b = part_b(streams, budgets)
    write(Path(args.out), a, b, args)
    print(f"done in {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
