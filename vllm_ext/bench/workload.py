"""Benchmark workloads: what to send (`BenchRequest`) and when (arrival processes, traces).

Arrivals: Poisson (exponential gaps) or gamma (gaps with a chosen coefficient of variation,
burstier when cv > 1) at a mean rate, seeded, so every configuration of a comparison replays
the identical sequence. A trace is JSONL, one request per line:
``{"arrival_s": 0.12, "prompt": "...", "max_tokens": 64, "true_output_len": 40}`` (optional
``true_output_len``, ``tool_calls``, ``branches``); a bad line is rejected with its number.
The default workload is the testbed task suite (`vllm_ext.testbed.tasks`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class TraceError(ValueError):
    pass


@dataclass
class BenchRequest:
    arrival_s: float
    prompt: str
    max_tokens: int
    true_output_len: int | None = None
    meta: dict = field(default_factory=dict)


def arrival_times(n: int, rate: float, seed: int, process: str = "poisson",
                  cv: float = 1.0) -> np.ndarray:
    """Arrival offsets in seconds (first at 0) of n requests at `rate` per second."""
    if rate <= 0 or n < 1:
        raise ValueError("rate must be > 0 and n >= 1")
    rng = np.random.default_rng(seed)
    if process == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n - 1)
    elif process == "gamma":
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n - 1)
    else:
        raise ValueError(f"unknown arrival process {process!r} (poisson, gamma)")
    return np.concatenate([[0.0], np.cumsum(gaps)])


def parse_trace(path: str | Path) -> list[BenchRequest]:
    out = []
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise TraceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise TraceError("not a JSON object")
            arrival, prompt, max_tokens = row["arrival_s"], row["prompt"], row["max_tokens"]
            if not isinstance(arrival, (int, float)) or arrival < 0:
                raise TraceError(f"arrival_s must be a number >= 0, got {arrival!r}")
            if not isinstance(prompt, str) or not prompt:
                raise TraceError("prompt must be a non-empty string")
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise TraceError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
            true_len = row.get("true_output_len")
            if true_len is not None and (not isinstance(true_len, int) or true_len < 0):
                raise TraceError(f"true_output_len must be an integer >= 0, got {true_len!r}")
        except (json.JSONDecodeError, KeyError, TraceError) as exc:
            what = (f"missing field {exc}" if isinstance(exc, KeyError) else
                    f"not valid JSON ({exc})" if isinstance(exc, json.JSONDecodeError) else str(exc))
            raise TraceError(f"{path}:{lineno}: {what}") from None
        meta = {k: v for k, v in row.items()
                if k not in ("arrival_s", "prompt", "max_tokens", "true_output_len")}
        out.append(BenchRequest(float(arrival), prompt, max_tokens, true_len, meta))
    if not out:
        raise TraceError(f"{path}: no requests")
    return sorted(out, key=lambda r: r.arrival_s)


def testbed_requests(n: int, rate: float, seed: int, process: str = "poisson", cv: float = 1.0,
                     max_tokens: int = 256, tools: bool | str = False,
                     kinds: list[str] | None = None,
                     client_latency: str = "") -> list[BenchRequest]:
    """n testbed tasks (prompt with chat template) at seeded arrivals; the true output length
    is the length of the reference answer in tokens (bytes + EOS), for the oracle policy.
    `tools`: True / "only": only the tool tasks (calc, lookup), sent with their calls run in
    the server (``vllm_xargs.ext_tools``; LAMPS); "mixed": every kind in `kinds` (default all),
    the tool tasks among them with their calls run in the server; "client": as "mixed", but
    the client runs the calls, one request per turn with a session_id (`bench.conversation`,
    tool latencies from `client_latency`, the --ext-tool-latency syntax). `kinds`: only these
    task kinds (repeat one to weight it). Each request's meta holds the task's answer, so the
    summary reports accuracy."""
    from vllm_ext.bench.conversation import client_tools_meta
    from vllm_ext.testbed.tasks import TOOL_KINDS, generate_tasks, prompt_text

    if tools not in (False, True, "only", "mixed", "client"):
        raise ValueError(f"tools must be False, True, 'only', 'mixed' or 'client', got {tools!r}")
    key = "client_tools" if tools == "client" else "tools"
    only = tools is True or tools == "only"
    tasks = generate_tasks(n, seed, kinds=TOOL_KINDS if only else kinds)
    times = arrival_times(n, rate, seed, process, cv)
    return [BenchRequest(float(t), prompt_text(task), max_tokens,
                         min(max_tokens, len(task.target.encode()) + 1),
                         {"kind": task.kind, "difficulty": task.difficulty, "answer": task.answer,
                          **({key: client_tools_meta(client_latency, seed * 100_003 + i)
                              if tools == "client" else True}
                             if tools and task.kind in TOOL_KINDS else {})})
            for i, (t, task) in enumerate(zip(times, tasks))]
