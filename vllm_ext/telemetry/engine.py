"""The scheduler's side of the telemetry, and its one consumer in the engine: a hot-prefix hint.

`SchedulerTelemetry` is what `PredictiveScheduler` holds (None unless ``--ext-telemetry``):
``on_request`` feeds `collect.PrefixTelemetry` from vLLM's ``Request.block_hashes`` at
``add_request``; ``report`` answers the ``ext_telemetry_report`` scheduler call.

Hot-prefix hint (``--ext-telemetry-hot-prefix N``; rule ours, after the issue's "requests whose
prefix is hot and cached go first"): at arrival a request is *hot* when its top-k prefix item
(first ``telemetry_prefix_blocks`` blocks) already arrived at least N times in the last W
requests (the LWCSS / WCSS estimate) **and** that prefix's last block is in vLLM's prefix
cache now (``BlockPool.get_cached_block``). Before each ``schedule()`` that follows an arrival
(or when a request becomes overdue), the waiting queue (FCFS deque only) is stably
partitioned: first the *overdue* - requests waiting more than ``telemetry_hot_prefix_wait_steps``
scheduler steps (the starvation bound; 0 = none) - then the hot, then the rest, each part in
its existing order. A hot request's prefill is mostly a cache hit, so it is short and its KV
is already resident: shortest-prefill-first without a predictor, and it uses the cached blocks
before eviction can take them; the bound keeps the cold ones from starving behind a stream of
hot ones (measured: docs/telemetry.md). Removals keep a partitioned queue partitioned, so only
arrivals and deadlines trigger it. The LWCSS count may miss a prefix's first two arrivals (its
Bloom guard), so a new prefix turns hot up to two arrivals later than N says.
"""
from __future__ import annotations

import functools
import logging
import time

from vllm_ext.telemetry.collect import PrefixTelemetry
from vllm_ext.telemetry.hashing import key_of

logger = logging.getLogger(__name__)


def _guarded(method):
    """Telemetry must never take the engine down (an exception in a scheduler hook or a
    utility call kills EngineCore): the first error is logged with its traceback, the
    telemetry switches itself off for the engine's lifetime and reports why. Every call's time
    is added to ``seconds`` (what the telemetry costs the engine core, exported as
    ``vllm_ext_telemetry_engine_seconds_total``)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.failed is not None:
            return {"error": self.failed} if method.__name__ == "report" else None
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            logger.exception("vllm-ext telemetry failed in %s; off from now on", method.__name__)
            self.failed = f"{method.__name__}: {exc!r}"
            return {"error": self.failed} if method.__name__ == "report" else None
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1
    return wrapper


class SchedulerTelemetry:
    def __init__(self, cfg) -> None:
        self.prefixes = PrefixTelemetry(cfg)
        self.hot_min = int(cfg.telemetry_hot_prefix)
        self.depth = int(cfg.telemetry_prefix_blocks)
        self.wait_steps = int(cfg.telemetry_hot_prefix_wait_steps)
        self.hot: set[str] = set()   # waiting request ids that were hot at arrival
        self.arrival_step: dict[str, int] = {}  # request id -> step it arrived at (hint on)
        self.steps = 0
        self.next_due = None  # step at which the oldest cold request becomes overdue
        self.arrived = False
        self.failed: str | None = None  # why the telemetry switched itself off
        self.reorders = 0  # partitions that moved a hot request ahead
        self.seconds, self.calls = 0.0, 0  # engine-core time spent in these hooks

    @classmethod
    def build(cls, cfg) -> "SchedulerTelemetry | None":
        return cls(cfg) if cfg.telemetry else None

    @_guarded
    def on_request(self, request, scheduler=None) -> None:
        hashes = request.block_hashes
        if self.hot_min:
            self.arrival_step[request.request_id] = self.steps
        if self.hot_min and hashes and scheduler is not None:
            depth = min(len(hashes), self.depth)
            if self.prefixes.is_hot(key_of(hashes[depth - 1]), self.hot_min) and \
                    _cached(scheduler, hashes[depth - 1]):
                self.hot.add(request.request_id)
                self.arrived = True
        self.prefixes.on_request(hashes, request.num_prompt_tokens)

    @_guarded
    def before_schedule(self, waiting) -> None:
        """Stable partition of the FCFS waiting deque: overdue, hot, rest (after an arrival or
        at a deadline only)."""
        self.steps += 1
        due = self.next_due is not None and self.steps >= self.next_due
        if not (self.arrived or due) or not hasattr(waiting, "extend"):
            return
        self.arrived = False
        items = list(waiting)
        if len(items) < 2 or not any(r.request_id in self.hot for r in items):
            self.next_due = None
            return
        limit = self.steps - self.wait_steps if self.wait_steps else None
        rank = {}
        for r in items:
            overdue = limit is not None and self.arrival_step.get(r.request_id, self.steps) <= limit
            rank[r.request_id] = 0 if overdue else 1 if r.request_id in self.hot else 2
        ordered = sorted(items, key=lambda r: rank[r.request_id])  # stable
        cold = [self.arrival_step.get(r.request_id, self.steps) for r in items
                if rank[r.request_id] == 2]
        self.next_due = min(cold) + self.wait_steps + 1 if cold and self.wait_steps else None
        if any(a is not b for a, b in zip(ordered, items)):
            waiting.clear()
            waiting.extend(ordered)
            self.reorders += 1

    @_guarded
    def forget(self, request_id: str) -> None:
        self.hot.discard(request_id)
        self.arrival_step.pop(request_id, None)

    @_guarded
    def report(self, top_k: int = 10, range_s: float = 60.0, full: bool = False,
               drain: bool = False) -> dict:
        out = self.prefixes.report(top_k, range_s, full, drain)
        out["hot_prefix"] = {"min_count": self.hot_min, "hot_waiting": len(self.hot),
                             "reorders": self.reorders}
        out["engine_cost"] = {"seconds": self.seconds, "calls": self.calls}  # before this one
        return out


def _cached(scheduler, block_hash) -> bool:
    try:
        manager = scheduler.kv_cache_manager
        groups = list(range(len(manager.kv_cache_config.kv_cache_groups)))
        return manager.block_pool.get_cached_block(block_hash, groups) is not None
    except Exception:  # no prefix caching / another manager layout: never hot
        return False
