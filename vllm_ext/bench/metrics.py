"""Per-request serving metrics and their summary, with vLLM `bench serve` field names.

Times are measured by the load generator: TTFT = first content token - send; TPOT = (e2e -
TTFT) / (output tokens - 1); ITL = gaps between streamed chunks; E2EL = last byte - send.
Goodput (``--goodput ttft:MS tpot:MS e2el:MS``, vLLM ``bench serve``'s meaning): completed
requests per second that met every given SLO (a request with <= 1 output token has TPOT 0).
Tails: p99.9 and max of e2e and TTFT. Slowdown = e2e / (output tokens x the run's median TPOT),
a request's latency over its own service time; its mean and p99 say who waits, by size.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    index: int
    arrival_s: float
    send_s: float = 0.0
    ttft_s: float | None = None
    e2el_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None
    text: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2el_s is not None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        row = asdict(self)
        row["tpot_s"] = self.tpot_s
        return row


def _stats(name: str, values_s: list[float]) -> dict:
    arr = np.asarray(values_s, dtype=float) * 1000.0
    if arr.size == 0:
        return {f"{k}_{name}_ms": None for k in ("mean", "median", "std", "p90", "p99")}
    return {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
            f"std_{name}_ms": float(arr.std()), f"p90_{name}_ms": float(np.percentile(arr, 90)),
            f"p99_{name}_ms": float(np.percentile(arr, 99))}


SLO_NAMES = ("ttft", "tpot", "e2el")


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "e2el:3000"]`` -> {"ttft": 500.0, ...} (ms); ValueError naming the pair."""
    slos = {}
    for pair in pairs or []:
        name, sep, value = pair.partition(":")
        try:
            slos[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or name not in SLO_NAMES or slos[name] < 0:
            raise ValueError(f"--goodput: expected NAME:MS with NAME in {', '.join(SLO_NAMES)} "
                             f"and MS >= 0, got {pair!r}")
    return slos


def _meets(r: RequestRecord, slos: dict[str, float]) -> bool:
    tpot = r.tpot_s if r.output_tokens > 1 else 0.0
    values = {"ttft": r.ttft_s, "tpot": tpot, "e2el": r.e2el_s}
    return all(values[k] is not None and values[k] * 1000 <= ms for k, ms in slos.items())


def _tails(done: list[RequestRecord]) -> dict:
    out = {}
    for name, vals in (("e2el", [r.e2el_s for r in done]),
                       ("ttft", [r.ttft_s for r in done if r.ttft_s is not None])):
        arr = np.asarray(vals, dtype=float) * 1000.0
        out[f"p99.9_{name}_ms"] = float(np.percentile(arr, 99.9)) if arr.size else None
        out[f"max_{name}_ms"] = float(arr.max()) if arr.size else None
    tpots = [r.tpot_s for r in done if r.tpot_s is not None]
    if tpots:
        per_token = float(np.median(tpots))
        slow = np.asarray([r.e2el_s / (max(1, r.output_tokens) * per_token) for r in done])
        out["mean_slowdown"], out["p99_slowdown"] = float(slow.mean()), float(
            np.percentile(slow, 99))
    return out


def summarize(records: list[RequestRecord], duration_s: float,
              slos: dict[str, float] | None = None) -> dict:
    done = [r for r in records if r.ok]
    out = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": sum(r.output_tokens for r in done),
        "request_throughput": len(done) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": sum(r.output_tokens for r in done) / duration_s if duration_s else 0.0,
    }
    out.update(_stats("ttft", [r.ttft_s for r in done if r.ttft_s is not None]))
    out.update(_stats("tpot", [r.tpot_s for r in done if r.tpot_s is not None]))
    out.update(_stats("itl", [g for r in done for g in r.itl_s]))
    out.update(_stats("e2el", [r.e2el_s for r in done]))
    if any("tool_s" in r.meta for r in done):  # e2e less the time in server-side tool calls
        out.update(_stats("serve", [r.e2el_s - r.meta.get("tool_s", 0.0) for r in done]))
    out.update(_tails(done))
    answered = [r for r in records if "answer" in r.meta]
    if answered:  # testbed tasks: a failed request counts as wrong
        from vllm_ext.testbed.tasks import parse_answer
        out["accuracy"] = sum(r.ok and parse_answer(r.text) == " ".join(r.meta["answer"].split())
                              for r in answered) / len(answered)
    if slos:
        good = sum(_meets(r, slos) for r in done)
        out["request_goodput"] = good / duration_s if duration_s > 0 else 0.0
        out["goodput_fraction"] = good / len(records) if records else 0.0
    return out
