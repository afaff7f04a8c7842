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

import random

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
