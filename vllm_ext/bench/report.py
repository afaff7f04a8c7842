"""Tables and PNG plots for benchmark results (matplotlib, Agg backend)."""
from __future__ import annotations

import json
from pathlib import Path

from vllm_ext.bench.metrics import RequestRecord
from vllm_ext.bench.servers import CPU_ROLES

TABLE_FIELDS = ("mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms", "p99.9_e2el_ms",
                "max_e2el_ms", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                "output_throughput", "request_goodput", "accuracy")
SUMMARY_STATS = ("mean", "median", "p90", "p99", "p99.9", "max")


def summary_table(summary: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"completed {summary['completed']}  failed {summary['failed']}  "
                 f"duration {summary['duration']:.1f} s  "
                 f"req/s {summary['request_throughput']:.2f}  "
                 f"out tok/s {summary['output_throughput']:.1f}")
    lines.append(f"{'metric':<8}" + "".join(f"{k:>10}" for k in SUMMARY_STATS) + "  (ms)")
    for name in ("ttft", "tpot", "itl", "e2el"):
        vals = [summary.get(f"{k}_{name}_ms") for k in SUMMARY_STATS]
        lines.append(f"{name:<8}" + "".join(f"{v:>10.1f}" if v is not None else f"{'-':>10}"
                                            for v in vals))
    if summary.get("mean_slowdown") is not None:
        lines.append(f"slowdown (e2e / own service time): mean {summary['mean_slowdown']:.2f}  "
                     f"p99 {summary['p99_slowdown']:.2f}")
    if "request_goodput" in summary:
        lines.append(f"goodput {summary['request_goodput']:.2f} req/s "
                     f"({summary['goodput_fraction']:.0%} of requests met every SLO)")
    return "\n".join(lines)


def cpu_table(rows: list[dict], baseline: str) -> str:
    """Server CPU time per output token (ms) by process, with the total's ratio to the
    baseline: what each configuration's own work costs on a CPU engine."""
    rows = [r for r in rows if all(f"cpu_{k}_ms_per_tok" in r for k in CPU_ROLES)]
    if not rows:
        return ""
    total = {(r["config"], r["rate"]): sum(r[f"cpu_{k}_ms_per_tok"] for k in CPU_ROLES)
             for r in rows}
    lines = ["server CPU per output token (ms):",
             f"{'config':<14}{'rate':>6}" + "".join(f"{k:>10}" for k in CPU_ROLES)
             + f"{'total':>18}"]
    for r in rows:
        t, b = total[(r["config"], r["rate"])], total.get((baseline, r["rate"]))
        ratio = f" ({t / b:.3f}x)" if b else ""
        lines.append(f"{r['config']:<14}{r['rate']:>6.2f}"
                     + "".join(f"{r[f'cpu_{k}_ms_per_tok']:>10.3f}" for k in CPU_ROLES)
                     + f"{f'{t:.3f}' + ratio:>18}")
    return "\n".join(lines)


def mean_over_repeats(rows: list[dict]) -> list[dict]:
    """One row per (config, rate): the mean of every numeric field over repeats."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["rate"]), []).append(r)
    out = []
    for (config, rate), group in groups.items():
        merged = {"config": config, "rate": rate, "repeats": len(group)}
        for f in group[0]:
            vals = [g.get(f) for g in group]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                merged.setdefault(f, sum(vals) / len(vals))
        out.append(merged)
    return out


def ratio_table(rows: list[dict], baseline: str, by_repeat: bool = False) -> str:
    """rows: {"config", "rate", **summary}; ratios are config / baseline at the same rate
    (and the same repeat, when `by_repeat`)."""
    key = (lambda r: (r["rate"], r.get("repeat"))) if by_repeat else (lambda r: r["rate"])
    base = {key(r): r for r in rows if r["config"] == baseline}
    head = f"{'config':<14}{'rate':>6}" + "".join(f"{f:>20}" for f in TABLE_FIELDS)
    lines = [head]
    for r in rows:
        b = base.get(key(r))
        cells = []
        for f in TABLE_FIELDS:
            v = r.get(f)
            ratio = f" ({v / b[f]:.2f}x)" if b and v is not None and b.get(f) else ""
            cells.append(f"{(f'{v:.1f}' if v is not None else '-') + ratio:>20}")
        lines.append(f"{r['config']:<14}{r['rate']:>6.2f}" + "".join(cells))
    return "\n".join(lines)


def write_records(path: Path, records: list[RequestRecord]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")


def plot_cdfs(path: Path, runs: dict[str, list[RequestRecord]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, records in runs.items():
        for ax, attr in zip(axes, ("e2el_s", "ttft_s")):
            vals = np.sort([getattr(r, attr) for r in records if r.ok])
            if vals.size:
                ax.plot(vals, np.arange(1, vals.size + 1) / vals.size, label=label)
    for ax, name in zip(axes, ("end-to-end latency (s)", "TTFT (s)")):
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(path: Path, rows: list[dict], metric: str = "mean_e2el_ms", title: str = "",
               xlabel: str = "request rate (req/s)") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    means = mean_over_repeats(rows)  # one line point per rate; each repeat as a faint dot
    for config in dict.fromkeys(r["config"] for r in rows):
        pts = sorted((r["rate"], r[metric]) for r in means if r["config"] == config and r[metric])
        line, = ax.plot([p[0] for p in pts], [p[1] / 1000 for p in pts], marker="o",
                        label=config)
        if any(r.get("repeats", 1) > 1 for r in means if r["config"] == config):
            reps = [(r["rate"], r[metric]) for r in rows if r["config"] == config and r[metric]]
            ax.scatter([p[0] for p in reps], [p[1] / 1000 for p in reps], s=12, alpha=0.35,
                       color=line.get_color())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric.replace("_ms", "") + " (s)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_length_latency(path: Path, runs: dict[str, list[RequestRecord]], bins: int = 8) -> None:
    """Who waits, by size: mean and p99 e2e latency per output-length bin, one line per run
    (bins are quantiles of all runs' output lengths, so every run is cut at the same sizes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = np.asarray([r.output_tokens for recs in runs.values() for r in recs if r.ok])
    if lengths.size == 0:
        return
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, bins + 1)))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for label, records in runs.items():
        ok = [r for r in records if r.ok]
        idx = np.clip(np.searchsorted(edges, [r.output_tokens for r in ok], side="right") - 1,
                      0, len(edges) - 2)
        e2e = np.asarray([r.e2el_s for r in ok])
        mids, means, p99s = [], [], []
        for b in range(len(edges) - 1):
            vals = e2e[idx == b]
            if vals.size:
                mids.append((edges[b] + edges[b + 1]) / 2)
                means.append(vals.mean())
                p99s.append(np.percentile(vals, 99))
        axes[0].plot(mids, means, marker="o", label=label)
        axes[1].plot(mids, p99s, marker="o", label=label)
    for ax, what in zip(axes, ("mean", "p99")):
        ax.set_xlabel("output tokens (bin midpoint)")
        ax.set_ylabel(f"{what} e2e latency (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
