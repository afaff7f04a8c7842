"""Paired, interleaved blocks and their confidence intervals (`bench compare --same-server`).

This machine's speed drifts by 2-4x between hours, more than the policies differ, so a ratio
of two runs taken minutes apart is an anecdote. Here every configuration runs once per round,
in an order shuffled per round (the first round in the given order), on the same freshly seeded
arrivals; the per-round ratio config / baseline is paired (same arrivals, within a minute on
the same server) and its spread over rounds is what a 95% bootstrap interval describes: rounds
are resampled with replacement and the interval is the 2.5-97.5 percentile of the resampled
median (and of the resampled ratio of means). The same analysis applied to back-to-back
repeats (one server per run) gives the old method's interval, for comparison.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

CI_METRICS = ("mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms", "mean_ttft_ms", "p99_ttft_ms",
              "output_throughput", "request_goodput",  # goodput only with --goodput
              "mean_serve_ms", "p99_serve_ms",  # serve = e2e less tool time (--tools)
              "accuracy")  # testbed answers checked (multi-branch runs)


def block_order(configs: list[str], rounds: int, seed: int) -> list[list[str]]:
    """Round 0 in the given order (ABCD), later rounds shuffled with a seeded RNG."""
    rng = random.Random(seed)
    orders = [list(configs)]
    for _ in range(1, rounds):
        order = list(configs)
        rng.shuffle(order)
        orders.append(order)
    return orders


def paired_ratios(rows: list[dict], baseline: str, metric: str, rate: float,
                  unit: str = "round") -> dict[str, list[float]]:
    """{config: [config / baseline per round]} at `rate`, for rounds where both ran."""
    base = {r[unit]: r[metric] for r in rows
            if r["config"] == baseline and r["rate"] == rate and r.get(metric)}
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["config"] != baseline and r["rate"] == rate and r.get(metric) and r[unit] in base:
            out.setdefault(r["config"], []).append(r[metric] / base[r[unit]])
    return out


def bootstrap_ci(values, stat=np.median, n_boot: int = 10000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    samples = values[rng.integers(0, values.size, size=(n_boot, values.size))]
    boots = np.apply_along_axis(stat, 1, samples) if stat is not np.median \
        else np.median(samples, axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(boots, tail)), float(np.percentile(boots, 100 - tail))


def ratio_summary(rows: list[dict], baseline: str, metric: str, rate: float,
                  unit: str = "round") -> dict[str, dict]:
    """Per config: median paired ratio with its CI, and the ratio of the mean metric with
    its CI (rounds resampled jointly for config and baseline)."""
    out = {}
    base = {r[unit]: r[metric] for r in rows
            if r["config"] == baseline and r["rate"] == rate and r.get(metric)}
    for config, ratios in paired_ratios(rows, baseline, metric, rate, unit).items():
        pairs = np.asarray([(r[metric], base[r[unit]]) for r in rows
                            if r["config"] == config and r["rate"] == rate and r.get(metric)
                            and r[unit] in base])
        lo, hi = bootstrap_ci(ratios)
        mlo, mhi = bootstrap_ci(np.arange(len(pairs)), stat=lambda idx: (
            pairs[idx.astype(int), 0].mean() / pairs[idx.astype(int), 1].mean()))
        out[config] = {"n": len(ratios), "median": float(np.median(ratios)), "lo": lo, "hi": hi,
                       "mean_ratio": float(pairs[:, 0].mean() / pairs[:, 1].mean()),
                       "mean_lo": mlo, "mean_hi": mhi}
    return out


def ci_table(rows: list[dict], baseline: str, unit: str = "round",
             metrics=CI_METRICS) -> str:
    """Mean over blocks per config, and vs the baseline: the ratio of means [95% CI] and the
    median paired ratio [95% CI], per metric and rate."""
    metrics = [m for m in metrics if any(r.get(m) for r in rows)]
    lines = [f"paired ratios vs {baseline} over {unit}s: ratio of means [95% CI] / median of "
             f"per-{unit} ratios [95% CI]; CI = bootstrap over {unit}s"]
    for rate in sorted({r["rate"] for r in rows}):
        lines.append(f"\nrate {rate:g}:")
        lines.append(f"{'config':<12}{'n':>3}" + "".join(f"{m:>44}" for m in metrics))
        summaries = {m: ratio_summary(rows, baseline, m, rate, unit) for m in metrics}
        for config in dict.fromkeys(r["config"] for r in rows):
            vals = {m: [r[m] for r in rows if r["config"] == config and r["rate"] == rate
                        and r.get(m)] for m in metrics}
            n = len(vals[metrics[0]])
            cells = []
            for m in metrics:
                mean = np.mean(vals[m]) if vals[m] else float("nan")
                s = summaries[m].get(config)
                txt = (f"{mean:.0f}" if abs(mean) >= 10 else f"{mean:.3g}") + (
                    f" {s['mean_ratio']:.2f}x[{s['mean_lo']:.2f},{s['mean_hi']:.2f}]"
                    f" {s['median']:.2f}x[{s['lo']:.2f},{s['hi']:.2f}]" if s else "")
                cells.append(f"{txt:>44}")
            lines.append(f"{config:<12}{n:>3}" + "".join(cells))
    return "\n".join(lines)


POOLED = (("e2el_s", 90), ("e2el_s", 99), ("ttft_s", 99))


def block_latencies(run_dir, rows: list[dict], unit: str = "round",
                    fields=("e2el_s", "ttft_s")) -> dict[str, dict]:
    """{field: {(config, rate): {round: that field of every completed request of the block}}},
    each block file read once (``NAME@RATE.bK.jsonl``; ``.rK`` for back-to-back repeats)."""
    tag = "b" if unit == "round" else "r"
    out: dict = {f: {} for f in fields}
    for r in rows:
        path = Path(run_dir) / f"{r['config']}@{r['rate']}.{tag}{r[unit]}.jsonl"
        if not path.exists():
            continue
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for f in fields:
            out[f].setdefault((r["config"], r["rate"]), {})[r[unit]] = np.asarray(
                [x[f] for x in recs if x.get("error") is None and x.get(f) is not None])
    return out


def pooled_ratio(config: dict[int, np.ndarray], base: dict[int, np.ndarray], q: float,
                 n_boot: int = 2000, seed: int = 0) -> dict | None:
    """The q-th percentile over every request of the config's blocks (rounds pooled, as one
    run's percentile: vLLM bench serve's meaning) against the baseline's, with a 95% CI from
    resampling rounds jointly for both (the pairing kept)."""
    rounds = sorted(set(config) & set(base))
    if len(rounds) < 2:
        return None

    def pct(blocks, idx):
        return float(np.percentile(np.concatenate([blocks[rounds[i]] for i in idx]), q))
    every = np.arange(len(rounds))
    value, ref = pct(config, every), pct(base, every)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(rounds), len(rounds))
        boots.append(pct(config, idx) / pct(base, idx))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"value": value, "ratio": value / ref, "lo": float(lo), "hi": float(hi),
            "n": len(rounds)}


def pooled_table(run_dir, rows: list[dict], baseline: str, unit: str = "round") -> str:
    """Percentiles over all of a config's requests (rounds pooled) vs the baseline's, with
    round-bootstrap CIs. The per-block p99 of `ci_table` is, at 40 requests a block, close to
    each block's maximum; this is the p90 / p99 of the run's whole latency distribution."""
    fields = block_latencies(run_dir, rows, unit, tuple(dict.fromkeys(f for f, _ in POOLED)))
    if not any(fields.values()):
        return ""
    heads = [f"p{q:g}_{f.replace('_s', '')} pooled" for f, q in POOLED]
    lines = [f"percentiles over every request of a config's {unit}s (pooled) vs {baseline}: "
             f"value (s) ratio [95% CI, {unit}s resampled]",
             f"{'config':<12}{'rate':>6}" + "".join(f"{h:>32}" for h in heads)]
    for rate in sorted({r["rate"] for r in rows}):
        for config in dict.fromkeys(r["config"] for r in rows):
            cells = []
            for f, q in POOLED:
                blocks, base = fields[f].get((config, rate)), fields[f].get((baseline, rate))
                res = pooled_ratio(blocks, base, q) if blocks and base else None
                cells.append(f"{res['value']:.2f} {res['ratio']:.2f}x[{res['lo']:.2f},"
                             f"{res['hi']:.2f}]" if res else "-")
            lines.append(f"{config:<12}{rate:>6g}" + "".join(f"{c:>32}" for c in cells))
    return "\n".join(lines)


def plot_paired(path, rows: list[dict], baseline: str, metric: str = "mean_e2el_ms",
                unit: str = "round", title: str = "") -> None:
    """Per config and rate: each round's paired ratio (dots) and the median with its CI."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r["rate"] for r in rows})
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        ratios = paired_ratios(rows, baseline, metric, rate, unit)
        for i, (config, vals) in enumerate(ratios.items()):
            lo, hi = bootstrap_ci(vals)
            med = float(np.median(vals))
            ax.scatter([i] * len(vals), vals, s=14, alpha=0.4)
            ax.errorbar([i + 0.15], [med], yerr=[[med - lo], [hi - med]], fmt="o", capsize=5,
                        color="black")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(ratios)), list(ratios))
        ax.set_ylabel(f"{metric} / {baseline} (paired per {unit})")
        ax.set_title(f"{title} rate {rate:g}".strip(), fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
