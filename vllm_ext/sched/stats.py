"""What the scheduler counts for `/metrics` (`vllm_ext.server.metrics`): plain counters.

* preemptions by cause: ``policy`` (the policy's victim for a waiting request) and
  ``kv_pressure`` (vLLM's own preemption of the last running request when KV blocks run out,
  or a prefix-cache reset);
* policy fallbacks: a policy that raised and was replaced by FCFS;
* the prediction error at finish: |predicted - actual| remaining output tokens at a request's
  first prediction, as a histogram over `ERROR_BUCKETS` (tokens).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

ERROR_BUCKETS = (4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)  # upper bounds; +Inf implied
PREEMPTION_CAUSES = ("policy", "kv_pressure")


@dataclass
class SchedStats:
    preemptions: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(PREEMPTION_CAUSES, 0))
    error_counts: list[int] = field(default_factory=lambda: [0] * (len(ERROR_BUCKETS) + 1))
    error_sum: float = 0.0
    policy_fallbacks: int = 0
    fallback_reason: str | None = None

    def count_preemption(self, cause: str) -> None:
        self.preemptions[cause] += 1

    def observe_error(self, abs_error: float) -> None:
        self.error_counts[bisect.bisect_left(ERROR_BUCKETS, abs_error)] += 1
        self.error_sum += abs_error

    def fallback(self, reason: str) -> None:
        self.policy_fallbacks += 1
        self.fallback_reason = reason

    def to_dict(self) -> dict:
        return {"preemptions": dict(self.preemptions), "error_buckets": list(ERROR_BUCKETS),
                "error_counts": list(self.error_counts), "error_sum": self.error_sum,
                "policy_fallbacks": self.policy_fallbacks}
