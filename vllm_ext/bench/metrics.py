"""Per-request serving metrics and their summary, with vLLM `bench serve` field names.

Times are measured by the load generator: TTFT = first content token - send; TPOT = (e2e -
TTFT) / (output tokens - 1); ITL = gaps between streamed chunks; E2EL = last byte - send.
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


def summarize(records: list[RequestRecord], duration_s: float) -> dict:
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
    return out
