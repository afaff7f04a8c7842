"""Cost-aware preemption: what recomputing a preempted request costs, in decode steps.

vLLM V1 preempts by recompute: the victim's KV blocks are freed and, when it is admitted again,
its prompt and every token it generated so far are prefilled again. SRPT (TRAIL, SPJF) compares
remaining lengths in tokens, i.e. decode steps, so the recompute is charged in the same unit:
the prefill time of the victim's tokens divided by the time of one decode step of the running
batch. Both come from the engine's own step cost, fitted online on the steps it runs
(`StepCostFit`: ``dt = base + per_token * scheduled tokens``, least squares over a sliding
window), never from constants. The rule (`SrptPolicy.choose_victim`): preempt only if

    candidate remaining + margin + recompute(victim) < victim remaining.

Until `min_samples` busy steps were seen the recompute is charged 0 (the margin-only rule).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepCostFit:
    window: int = 512          # most recent busy steps kept
    min_samples: int = 32      # no estimate before this many
    refit_every: int = 32      # steps between least-squares fits
    samples: deque = field(default_factory=deque)
    base_s: float | None = None
    per_token_s: float | None = None
    _since_fit: int = 0

    def add(self, tokens: int, dt_s: float) -> None:
        """One busy engine step: `tokens` scheduled, `dt_s` seconds since the previous one."""
        if tokens <= 0 or not dt_s > 0:
            return
        self.samples.append((float(tokens), float(dt_s)))
        while len(self.samples) > self.window:
            self.samples.popleft()
        self._since_fit += 1
        if len(self.samples) >= self.min_samples and (
                self.base_s is None or self._since_fit >= self.refit_every):
            self._fit()

    def _fit(self) -> None:
        data = np.asarray(self.samples)
        tokens, dt = data[:, 0], data[:, 1]
        if np.ptp(tokens) == 0:  # only one batch shape seen: no slope to fit yet
            return
        a = np.stack([np.ones_like(tokens), tokens], axis=1)
        (base, per_token), *_ = np.linalg.lstsq(a, dt, rcond=None)
        self.base_s, self.per_token_s = max(float(base), 1e-6), max(float(per_token), 0.0)
        self._since_fit = 0

    def step_s(self, batch: int) -> float:
        """Seconds of one decode step of `batch` requests (0 while uncalibrated)."""
        if self.base_s is None:
            return 0.0
        return self.base_s + self.per_token_s * max(1, batch)

    def steps_per_token(self, batch: int) -> float:
        """Decode steps one recomputed token costs with `batch` requests decoding (0 while
        uncalibrated)."""
        step = self.step_s(batch)
        return self.per_token_s / step if step else 0.0

    def to_dict(self) -> dict:
        return {"samples": len(self.samples), "base_s": self.base_s,
                "per_token_s": self.per_token_s}

