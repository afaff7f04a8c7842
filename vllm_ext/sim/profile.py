"""Calibrate the simulator's `StepCost` on the live engine.

Runs the model through vLLM's `LLMEngine` step by step: for each batch size, one prefill step of
B prompts, then decode steps of B tokens; each step's wall time is recorded with the tokens and
requests it scheduled, and `base + per_token * tokens + per_seq * seqs` is fitted by least
squares. ``vllm-ext simulate profile --out profile.json`` writes the fit and the raw samples.

``--served`` measures the served engine instead (`profile_server`): the OpenAI server started
as `bench compare` starts it, timed by the same streaming client. That cost includes what the
in-process `LLMEngine` loop does not see (API server, IPC, detokenisation and streaming, all
sharing the CPU with the engine), which is what a replay of served latencies needs.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from vllm_ext.sim.replica import StepCost


def fit_step_cost(samples: list[tuple[int, int, float]]) -> tuple[StepCost, float]:
    """Least-squares fit (non-negative by clipping) and the mean relative error of the fit."""
    a = np.array([[1.0, t, s] for t, s, _ in samples])
    y = np.array([dt for _, _, dt in samples])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    coef = np.clip(coef, 0.0, None)
    pred = a @ coef
    return StepCost(*map(float, coef)), float(np.mean(np.abs(pred - y) / y))


def profile_engine(model: str, batch_sizes=(1, 2, 4, 8, 16, 32), prompt_len: int = 64,
                   decode_steps: int = 48, **engine_kwargs) -> list[tuple[int, int, float]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="bfloat16", seed=0, **engine_kwargs)
    engine = llm.llm_engine
    prompt = {"prompt_token_ids": [100 + (i % 50) for i in range(prompt_len)]}
    params = SamplingParams(max_tokens=decode_steps + 1, ignore_eos=True, temperature=0.0)
    samples = []
    for warm in (True, False):
        for b in batch_sizes:
            for i in range(b):
                engine.add_request(f"{warm}-{b}-{i}", prompt, params)
            step = 0
            while engine.has_unfinished_requests():
                t0 = time.perf_counter()
                engine.step()
                dt = time.perf_counter() - t0
                tokens = b * prompt_len if step == 0 else b
                if not warm and 0 < step <= decode_steps or (not warm and step == 0):
                    samples.append((tokens, b, dt))
                step += 1
    return samples


def profile_server(base_url: str, model: str = "bench", batch_sizes=(1, 2, 4, 8),
                   prompt_lens=(64, 256, 1024), decode_tokens: int = 64, repeats: int = 3):
    """(tokens, seqs, seconds) samples from a live server: B concurrent requests decoding
    ``decode_tokens`` each give (B, B, median inter-token gap); one request of P prompt
    tokens and a single output token gives (P, 1, time to first token)."""
    import asyncio

    from vllm_ext.bench.loadgen import run_load
    from vllm_ext.bench.workload import BenchRequest

    def run(reqs):
        return asyncio.run(run_load(base_url, model, reqs, send_true_len=False, ignore_eos=True,
                                    progress=False))[0]

    text = "calc 12+34 = " * 200   # byte-level tokenizer: one token per character
    run([BenchRequest(0.0, text[:64], 8)])  # warm-up
    samples = []
    for _ in range(repeats):
        for b in batch_sizes:
            recs = run([BenchRequest(0.0, text[:16 + i], decode_tokens) for i in range(b)])
            gaps = [g for r in recs if r.ok for g in r.itl_s[2:]]
            samples.append((b, b, float(np.median(gaps))))
        for p in prompt_lens:
            rec = run([BenchRequest(0.0, text[:p], 1)])[0]
            samples.append((rec.prompt_tokens or p, 1, rec.ttft_s))
    return samples


def fit_served_cost(samples) -> tuple[StepCost, float, float]:
    """Served samples: decode gaps (tokens == seqs) fix ``base`` and ``per_token + per_seq``;
    the slope of TTFT over prompt length fixes ``per_token``; what TTFT has beyond one step is
    the per-request overhead of the server (HTTP, tokenisation, first chunk), returned apart
    because it delays a request without occupying engine steps. Also the fit's mean relative
    error over the decode samples."""
    dec = np.array([(t, dt) for t, s, dt in samples if t == s])
    pre = np.array([(t, dt) for t, s, dt in samples if t != s])
    per_tok_seq, base = np.polyfit(dec[:, 0], dec[:, 1], 1)
    per_token = max(0.0, float(np.polyfit(pre[:, 0], pre[:, 1], 1)[0]))
    cost = StepCost(max(0.0, float(base)), per_token, max(0.0, float(per_tok_seq) - per_token))
    overhead = float(np.mean([dt - cost.step_time(int(t), 1) for t, dt in pre]))
    err = float(np.mean([abs(cost.step_time(int(t), int(t)) - dt) / dt for t, dt in dec]))
    return cost, max(0.0, overhead), err


STALL_FACTOR = 10.0  # an inter-token gap over this x the run's median is a stall, not a step


def loaded_decode_samples(records: list[dict],
                          stall: float = STALL_FACTOR) -> list[tuple[int, int, float]]:
    """Decode step times under real load, from one `bench serve`/`compare` run's records:
    every inter-token gap of every request, with the number of requests decoding at that
    moment; the mean gap per concurrency B gives a (B, B, seconds) sample. Under load a step
    is slower than on an idle server (the API server's work for arriving requests shares the
    CPU), which is why a replay of loaded runs needs these rather than idle decode timings.
    A gap over ``stall`` x the median gap is a preempted request waiting, not a step: it is
    left out, and the request does not count as decoding during it."""
    runs = [r["send_s"] + r["ttft_s"] + np.concatenate([[0.0], np.cumsum(r["itl_s"])])
            for r in records if r.get("error") is None and r.get("itl_s")]
    cutoff = stall * float(np.median(np.concatenate([np.diff(t) for t in runs])))
    starts, ends, gaps = [], [], []
    for t in runs:
        d = np.diff(t)
        breaks = np.flatnonzero(d > cutoff)
        starts += [t[0], *t[breaks + 1]]
        ends += [*t[breaks], t[-1]]
        keep = d <= cutoff
        gaps += list(zip(((t[:-1] + t[1:]) / 2)[keep], d[keep]))
    starts, ends = np.sort(starts), np.sort(ends)
    mids = np.array([m for m, _ in gaps])
    conc = np.searchsorted(starts, mids) - np.searchsorted(ends, mids)
    dts = np.array([g for _, g in gaps])
    return [(int(b), int(b), float(np.mean(dts[conc == b])))
            for b in np.unique(conc) if b > 0 and (conc == b).sum() >= 50]


def write_profile(path: Path, model: str, samples, served: bool = False) -> dict:
    """Fit the samples, write the profile JSON and return what was written."""
    if served:
        cost, overhead, err = fit_served_cost(samples)
    else:
        (cost, err), overhead = fit_step_cost(samples), 0.0
    data = {"model": model, "served": served, "cost": cost.__dict__,
            "request_overhead_s": overhead, "fit_mean_rel_error": err, "samples": samples}
    path.write_text(json.dumps(data, indent=1))
    return data


def prefill_samples(path: str | Path) -> list[tuple]:
    """A profile's prefill timings (samples whose token count differs from the batch's)."""
    return [tuple(x) for x in json.loads(Path(path).read_text()).get("samples", [])
            if x[0] != x[1]]


def load_profile(path: str | Path) -> tuple[StepCost, float]:
    """The step cost and the seconds a served request spends outside engine steps (0 for an
    LLMEngine profile)."""
    data = json.loads(Path(path).read_text())
    return StepCost(**data["cost"]), float(data.get("request_overhead_s", 0.0))
