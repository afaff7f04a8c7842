"""Calibrate the simulator's `StepCost` on the live engine.

Runs the model through vLLM's `LLMEngine` step by step: for each batch size, one prefill step of
B prompts, then decode steps of B tokens; each step's wall time is recorded with the tokens and
requests it scheduled, and `base + per_token * tokens + per_seq * seqs` is fitted by least
squares. ``vllm-ext simulate profile --out profile.json`` writes the fit and the raw samples.
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


def write_profile(path: Path, model: str, samples) -> StepCost:
    cost, err = fit_step_cost(samples)
    path.write_text(json.dumps({"model": model, "cost": cost.__dict__, "fit_mean_rel_error": err,
                                "samples": samples}, indent=1))
    return cost


def load_profile(path: str | Path) -> StepCost:
    return StepCost(**json.loads(Path(path).read_text())["cost"])
