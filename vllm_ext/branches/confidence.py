"""Token confidence joined to the correctness probe: DUCHESS's branch score, per branch.

Paper: DUCHESS (arXiv 2509.24957) scores each branch with a probe on one layer's hidden state.
On the embedded model that probe ranks prompts (difficulty) but not the branches of one prompt
(within-prompt AUROC 0.50, docs/duchess.md): a branch at temperature 1 goes wrong by sampling
one unlikely token and then continues consistently from it. The sampled tokens' own
probabilities see that moment (the token-confidence signals of DeepConf, Fu et al. 2025, and
Dynasor's certainty, Fu et al. 2024).

Rule. Per branch, over the tokens it sampled so far (inherited ones included): the lowest
sampled-token logprob, their mean, the lowest mean over a sliding window of `WINDOW` tokens
(the mean so far while fewer tokens exist) and log(tokens so far). The branch's score is a
logistic combination of these, the probe's latest logit and its logit at the end of the
prompt's prefill (what it knows of the prompt's difficulty),
    s = sigmoid(bias + sum_f w_f * feature_f),
fitted on held-out prompts when the probe is trained (`vllm_ext.probes.confidence`) and kept
in the probe file's ``meta["confidence"]``. Without a fitted combiner the probe's own value is
the score; without a probe value there is no score (the plan continues the branch).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

WINDOW = 8
FEATURES = ("probe_logit", "prefill_logit", "min_logprob", "mean_logprob", "min_window_mean",
            "log_tokens")
META_KEY = "confidence"


@dataclass
class Confidence:
    """Running confidence of one branch's sampled tokens."""
    count: int = 0
    total: float = 0.0
    lowest: float = 0.0
    lowest_window: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=WINDOW))

    def add(self, logprobs) -> None:
        for lp in logprobs:
            lp = float(lp)
            self.count += 1
            self.total += lp
            self.lowest = lp if self.count == 1 else min(self.lowest, lp)
            self.recent.append(lp)
            if self.count < WINDOW:   # no full window yet: the mean so far
                self.lowest_window = self.total / self.count
                continue
            window_mean = sum(self.recent) / WINDOW
            self.lowest_window = (window_mean if self.count == WINDOW
                                  else min(self.lowest_window, window_mean))

    def copy(self) -> "Confidence":
        return Confidence(self.count, self.total, self.lowest, self.lowest_window,
                          deque(self.recent, maxlen=WINDOW))

    def features(self, p_probe: float, p_prefill: float) -> dict[str, float]:
        return {"probe_logit": _logit(p_probe), "prefill_logit": _logit(p_prefill),
                "min_logprob": self.lowest,
                "mean_logprob": self.total / self.count if self.count else 0.0,
                "min_window_mean": self.lowest_window, "log_tokens": math.log(max(1, self.count))}


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def confidence_of(logprobs, upto: int) -> Confidence:
    """The tracker after the first `upto` sampled tokens (what the runner has at that point)."""
    conf = Confidence()
    conf.add(logprobs[:upto])
    return conf


@dataclass
class Combiner:
    bias: float
    weights: dict[str, float]

    def score(self, p_probe: float | None, p_prefill: float | None,
              conf: Confidence) -> float | None:
        """The branch's P(correct); None without a probe value (a missing prefill value
        takes the latest one's place)."""
        if p_probe is None:
            return None
        feats = conf.features(p_probe, p_probe if p_prefill is None else p_prefill)
        z = self.bias + sum(w * feats[name] for name, w in self.weights.items())
        return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))

    def to_meta(self) -> dict:
        return {"bias": self.bias, "weights": dict(self.weights), "window": WINDOW}

    @classmethod
    def from_meta(cls, meta: dict | None) -> "Combiner | None":
        """The combiner a probe file carries, or None; ValueError on a malformed entry."""
        if not meta:
            return None
        weights = {str(k): float(v) for k, v in dict(meta["weights"]).items()}
        unknown = set(weights) - set(FEATURES)
        if unknown or int(meta.get("window", WINDOW)) != WINDOW:
            raise ValueError(f"confidence combiner: unknown features {sorted(unknown)} or "
                             f"window {meta.get('window')} (this build: {FEATURES}, {WINDOW})")
        return cls(float(meta["bias"]), weights)
