"""Probes per lookup of the bubble-up cuckoo index (arXiv 2501.02312) as it fills.

Fills a `CuckooIndex` with (request_id, block_index) keys and, at each load, looks every
stored key up (positive probes) and as many absent keys (negative probes), and reports the
evictions per insertion since the previous load and where keys sit among their d choices:
    .venv/bin/python scripts/cuckoo_probes.py --capacity 100000 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from vllm_ext.swap.cuckoo import CuckooIndex, IndexFull

LOADS = (0.5, 0.8, 0.9, 0.95, 0.99)


def measure(capacity: int, eps: float, alpha: float, seed: int, loads=LOADS) -> dict:
    ix = CuckooIndex(capacity, eps=eps, alpha=alpha, seed=seed)
    rows, n = [], 0
    for load in loads:
        ev0, ins0 = ix.stats.evictions, ix.stats.inserts
        try:
            while n < round(load * capacity):
                ix.insert((f"req-{seed}-{n // 64}", n % 64), n)
                n += 1
        except IndexFull:
            break
        fill = ix.stats
        ix.reset_stats()                  # lookups counted apart from the fill
        for i in range(n):
            assert ix.lookup((f"req-{seed}-{i // 64}", i % 64)) == i
        for i in range(n):
            ix.lookup((f"absent-{seed}", i))
        rows.append({"load": load, "mean_positive_probes": ix.stats.mean_positive_probes,
                     "mean_negative_probes": ix.stats.mean_negative_probes,
                     "evictions_per_insert": (fill.evictions - ev0) / max(fill.inserts - ins0, 1),
                     "choice_counts": ix.choice_counts(), "active_choices": ix.k})
        ix.stats = fill
    try:
        while True:
            ix.insert((f"req-{seed}-{n // 64}", n % 64), n)
            n += 1
    except IndexFull:
        pass
    return {"seed": seed, "d": ix.d, "d_core": ix.d_core, "rows": rows, "max_load": n / capacity}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", type=int, default=100_000)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", help="write the raw results as JSON")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    runs = [measure(args.capacity, args.eps, args.alpha, int(s)) for s in args.seeds.split(",")]
    d = runs[0]["d"]
    print(f"capacity {args.capacity}, eps {args.eps}, alpha {args.alpha}: d = {d}, "
          f"d_core = {runs[0]['d_core']}, seeds {args.seeds}")
    print("| load | mean probes, hit | mean probes, miss | evictions / insert | keys at choice 0..d-1 (%) |")
    print("|---|---|---|---|---|")
    for j, load in enumerate(LOADS):
        rows = [r["rows"][j] for r in runs if len(r["rows"]) > j]
        if not rows:
            continue
        mean = lambda k: statistics.mean(r[k] for r in rows)  # noqa: E731
        counts = [sum(r["choice_counts"][i] for r in rows) for i in range(d)]
        share = " ".join(f"{100 * c / sum(counts):.0f}" for c in counts)
        print(f"| {load:.2f} | {mean('mean_positive_probes'):.3f} | "
              f"{mean('mean_negative_probes'):.3f} | {mean('evictions_per_insert'):.2f} | {share} |")
    full = ", ".join(f"{r['max_load']:.4f}" for r in runs)
    print(f"max load before IndexFull: {full}; {time.perf_counter() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
