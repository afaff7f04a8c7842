"""Per-tool call durations learned online (LAMPS predicts an API call's duration from its type's
history). The prediction for a tool is the mean of its last `window` observed durations; a
tool never seen yet gets the mean over every tool seen, then `prior_s`."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class DurationHistory:
    window: int = 32
    prior_s: float = 1.0
    seen: dict[str, deque] = field(default_factory=dict)

    def observe(self, tool: str, seconds: float) -> None:
        self.seen.setdefault(tool, deque(maxlen=self.window)).append(max(0.0, seconds))

    def predict(self, tool: str) -> float:
        if self.seen.get(tool):
            return _mean(self.seen[tool])
        every = [s for d in self.seen.values() for s in d]
        return _mean(every) if every else self.prior_s

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {t: {"calls_in_window": len(d), "mean_s": _mean(d)} for t, d in self.seen.items()}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
