"""The scheduler's side of the telemetry, and its one consumer in the engine: a hot-prefix hint.

`SchedulerTelemetry` is what `PredictiveScheduler` holds (None unless ``--ext-telemetry``):
``on_request`` feeds `collect.PrefixTelemetry` from vLLM's ``Request.block_hashes`` at
``add_request``; ``report`` answers the ``ext_telemetry_report`` scheduler call.

Hot-prefix hint (``--ext-telemetry-hot-prefix N``; rule ours, after the issue's "requests whose
prefix is hot and cached go first"): at arrival a request is *hot* when its top-k prefix item
(first ``telemetry_prefix_blocks`` blocks) already arrived at least N times in the last W
requests (the LWCSS / WCSS estimate) **and** that prefix's last block is in vLLM's prefix
cache now (``BlockPool.get_cached_block``). Before each ``schedule()`` that follows an arrival,
the waiting queue (FCFS deque only) is stably partitioned: hot requests first, each part in
its existing order. A hot request's prefill is mostly a cache hit, so it is short and its KV
is already resident: shortest-prefill-first without a predictor, and it uses the cached blocks
before eviction can take them. Removals keep a partitioned queue partitioned, so only arrivals
trigger it; requests already preempted keep vLLM's order among the cold.
"""
from __future__ import annotations

from vllm_ext.telemetry.collect import PrefixTelemetry
from vllm_ext.telemetry.hashing import key_of


class SchedulerTelemetry:
    def __init__(self, cfg) -> None:
        self.prefixes = PrefixTelemetry(cfg)
        self.hot_min = int(cfg.telemetry_hot_prefix)
        self.depth = int(cfg.telemetry_prefix_blocks)
        self.hot: set[str] = set()   # waiting request ids that were hot at arrival
        self.arrived = False
        self.hot_admitted = 0

    @classmethod
    def build(cls, cfg) -> "SchedulerTelemetry | None":
        return cls(cfg) if cfg.telemetry else None

    def on_request(self, request, scheduler=None) -> None:
        hashes = request.block_hashes
        if self.hot_min and hashes and scheduler is not None:
            depth = min(len(hashes), self.depth)
            if self.prefixes.is_hot(key_of(hashes[depth - 1]), self.hot_min) and \
                    _cached(scheduler, hashes[depth - 1]):
                self.hot.add(request.request_id)
                self.arrived = True
        self.prefixes.on_request(hashes, request.num_prompt_tokens)

    def before_schedule(self, waiting) -> None:
        """Stable partition of the FCFS waiting deque: hot first (after an arrival only)."""
        if not self.arrived:
            return
        self.arrived = False
        if not hasattr(waiting, "extend") or len(waiting) < 2:
            return
        items = list(waiting)
        hot = [r for r in items if r.request_id in self.hot]
        if not hot or len(hot) == len(items):
            return
        cold = [r for r in items if r.request_id not in self.hot]
        waiting.clear()
        waiting.extend(hot + cold)
        self.hot_admitted += len(hot)

    def forget(self, request_id: str) -> None:
        self.hot.discard(request_id)

    def report(self, top_k: int = 10, range_s: float = 60.0, full: bool = False) -> dict:
        out = self.prefixes.report(top_k, range_s, full)
        out["hot_prefix"] = {"min_count": self.hot_min, "hot_waiting": len(self.hot),
                             "reordered": self.hot_admitted}
        return out


def _cached(scheduler, block_hash) -> bool:
    try:
        manager = scheduler.kv_cache_manager
        groups = list(range(len(manager.kv_cache_config.kv_cache_groups)))
        return manager.block_pool.get_cached_block(block_hash, groups) is not None
    except Exception:  # no prefix caching / another manager layout: never hot
        return False
