"""TRAIL (arXiv 2410.01035): SRPT on predicted remaining length with limited preemption.

Predictions per request:
  * before prefill: the prompt-only predictor (ridge on hashed prompt-token counts, shipped in
    the length-probe file) gives an initial total length, counted down per generated token;
  * from the end of prefill: the length probe on the model's own hidden state gives a
    distribution over remaining-length bins every k decode steps; between refinements the
    estimate counts down by one per token. With Bayesian smoothing (default on) the new
    distribution is combined with the previous one moved forward: prior = T^s q, where T
    shifts mass one bin down with probability 1/bin-width per generated token, and
    posterior ∝ prior ⊙ p. The prediction is the expected value over bin midpoints.
Every prediction is capped by what the request's ``max_tokens`` leaves.
Starvation bound (default on, ``tail_factor``): a request whose time in the system exceeds
``tail_factor x max(tail_min_tokens, its first predicted length) x step_s`` (a bounded
slowdown over its predicted service time; ``step_s`` = the engine's measured decode step) is
overdue: overdue requests go first, in arrival order, and are never preempted. SRPT keeps
its order among the rest. The rule is the slowdown bound of SRPT-with-aging schedulers
(HRRN's response ratio (wait + service) / service, capped instead of ranked).
Scheduling (policy `trail`): waiting ordered by predicted remaining (ties by arrival); a
running request is preemptible only while generated <= c x its initial prediction, never
after; a waiting request preempts the preemptible running request with the largest prediction
if its own prediction + margin is smaller, at most `max_preemptions_per_request` times per
victim. Policy `spjf` is the ablation: prompt-only prediction, never refined.
Pure python + numpy: the engine adapter and the simulator use the same objects.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from vllm_ext.sched.policy import RequestView, SrptPolicy


@dataclass(frozen=True)
class LengthBins:
    edges: tuple[float, ...]                    # K + 1 increasing edges, first 0

    @cached_property  # read on every sort of the queues: computed once per bins object
    def midpoints(self) -> np.ndarray:
        e = np.asarray(self.edges)
        return (e[:-1] + e[1:]) / 2

    @cached_property
    def widths(self) -> np.ndarray:
        return np.diff(np.asarray(self.edges))

    def shift(self, steps: int) -> np.ndarray:
        """T^steps: per generated token, mass in bin i moves to bin i-1 with probability
        1/width_i (`shift_matrix`). Cached: refinements come every k tokens, so a few powers
        serve every request."""
        cache = self.__dict__.setdefault("_shift_cache", {})
        steps = max(0, int(steps))
        if steps not in cache:
            if len(cache) > 256:
                cache.clear()
            cache[steps] = np.linalg.matrix_power(shift_matrix(self.widths), steps)
        return cache[steps]

    def index(self, remaining) -> np.ndarray:
        k = len(self.edges) - 1
        return np.clip(np.searchsorted(self.edges, remaining, side="right") - 1, 0, k - 1)

    @classmethod
    def make(cls, lengths, k: int = 10, mode: str = "quantile", max_len: float | None = None):
        lengths = np.asarray(lengths, dtype=float)
        top = float(max_len or lengths.max() + 1)
        if mode == "equal":
            edges = np.linspace(0, top, k + 1)
        elif mode == "quantile":
            inner = np.quantile(lengths, np.linspace(0, 1, k + 1)[1:-1])
            edges = np.unique(np.concatenate([[0.0], np.maximum.accumulate(inner), [top]]))
        else:
            raise ValueError(f"unknown bin mode {mode!r} (equal, quantile)")
        return cls(tuple(float(x) for x in edges))


def shift_matrix(widths: np.ndarray) -> np.ndarray:
    """T for one generated token (column-stochastic); bin 0 absorbs."""
    move = 1.0 / np.maximum(np.asarray(widths, dtype=float), 1.0)
    t = np.diag(1 - move)
    t[np.arange(len(move) - 1), np.arange(1, len(move))] = move[1:]
    t[0, 0] += move[0]
    return t


@dataclass
class RemainingTracker:
    bins: LengthBins
    smoothing: bool = True
    q: np.ndarray | None = None
    generated_at: int = 0
    initial: float | None = None
    mean: float = 0.0                  # expected total at `generated_at`, kept for sorting

    def observe(self, probs, generated: int) -> None:
        p = np.asarray(probs, dtype=float)
        p = p / p.sum() if p.sum() > 0 else np.full_like(p, 1 / p.size)
        if self.q is not None and self.smoothing:
            prior = self.bins.shift(generated - self.generated_at) @ self.q
            post = prior * p
            p = post / post.sum() if post.sum() > 1e-12 else p
        self.q, self.generated_at = p, generated
        self.mean = float(p @ self.bins.midpoints)
        if self.initial is None:
            self.initial = self.mean

    def expected(self) -> float:
        return self.mean

    def remaining(self, generated: int) -> float:
        return max(1.0, self.mean - (generated - self.generated_at))


@dataclass(frozen=True)
class PromptModel:
    """Prompt-only length predictor: ridge on [1, log1p(prompt len), hashed token counts]."""
    coef: tuple[float, ...]
    buckets: int = 64

    @staticmethod
    def features(prompt_ids, buckets: int = 64) -> np.ndarray:
        x = np.zeros(buckets + 2)
        x[0], x[1] = 1.0, np.log1p(len(prompt_ids))
        for t in prompt_ids:
            x[2 + zlib.crc32(int(t).to_bytes(4, "little")) % buckets] += 1.0
        x[2:] /= max(1, len(prompt_ids))
        return x

    def predict(self, prompt_ids) -> float:
        return max(1.0, float(self.features(prompt_ids, self.buckets) @ np.asarray(self.coef)))


@dataclass
class TrailPolicy(SrptPolicy):
    bins: LengthBins | None = None
    prompt_model: PromptModel | None = None
    preempt_fraction: float = 0.8      # c: preemptible while generated <= c * initial
    smoothing: bool = True
    refine: bool = True                # False = spjf (prompt-only, no refinement)
    charges_recompute = True           # cost-aware preemption (vllm_ext.sched.step_cost)
    tail_factor: float = 3.0           # starvation bound: overdue past this slowdown (0 = off)
    tail_min_tokens: float = 64.0      # ... over at least this many tokens of service
    step_s: float = 0.0                # decode step (s), kept current by the engine; 0 = no bound
    prompt_pred: dict[str, float] = field(default_factory=dict)
    trackers: dict[str, RemainingTracker] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "trail" if self.refine else "spjf"

    def on_arrival(self, request_id: str, prompt_ids) -> None:
        if self.prompt_model is not None:
            self.prompt_pred[request_id] = self.prompt_model.predict(prompt_ids)

    def observe(self, request_id: str, values: dict, generated: int) -> None:
        if not self.refine or self.bins is None:
            return
        k = len(self.bins.edges) - 1
        probs = [values.get(f"bin{i}", 0.0) for i in range(k)]
        tracker = self.trackers.get(request_id)
        if tracker is None:
            tracker = self.trackers[request_id] = RemainingTracker(self.bins, self.smoothing)
        tracker.observe(probs, generated)

    def forget(self, request_id: str) -> None:
        self.prompt_pred.pop(request_id, None)
        self.trackers.pop(request_id, None)

    def first_prediction(self, view: RequestView) -> float | None:
        tracker = self.trackers.get(view.request_id)
        if tracker is not None and tracker.initial is not None:
            return tracker.initial
        return self.prompt_pred.get(view.request_id)

    def initial(self, view: RequestView) -> float:
        tracker = self.trackers.get(view.request_id)
        if tracker is not None and tracker.initial is not None:
            return min(tracker.initial, view.max_tokens)
        return min(self.prompt_pred.get(view.request_id, float("inf")), view.max_tokens)

    def remaining(self, view: RequestView) -> float:
        """Predicted remaining tokens, never more than ``max_tokens`` leaves: the probe reads
        the model's state, not the request's cap, so a request that would run past its cap
        (a looping generation) would otherwise look long until its very last token and be
        every preemption's victim."""
        left = max(1.0, view.max_tokens - view.num_output_tokens)
        tracker = self.trackers.get(view.request_id)
        if tracker is not None:
            return min(tracker.remaining(view.num_output_tokens), left)
        total = self.prompt_pred.get(view.request_id)
        if total is None:
            return float("inf")
        return min(max(1.0, total - view.num_output_tokens), left)

    def preemptible(self, view: RequestView) -> bool:
        return (super().preemptible(view) and not self.overdue(view)
                and view.num_output_tokens <= self.preempt_fraction * self.initial(view))

    def calibrate(self, step_s: float, recompute_steps_per_token: float) -> None:
        super().calibrate(step_s, recompute_steps_per_token)
        self.step_s = step_s

    def overdue_at(self, view: RequestView) -> float:
        """When the request passes the starvation bound (inf: no bound)."""
        if self.tail_factor <= 0 or self.step_s <= 0:
            return float("inf")
        service = max(self.tail_min_tokens, min(self.initial(view), view.max_tokens))
        return view.arrival_time + self.tail_factor * service * self.step_s

    def overdue(self, view: RequestView) -> bool:
        return view.now >= self.overdue_at(view)

    def sort_key(self, view: RequestView) -> tuple:
        if self.overdue(view):
            return (view.priority, 0, view.arrival_time, view.request_id)
        return (view.priority, 1, *super().sort_key(view)[1:])
