"""Where the telemetry is fed: prefix popularity in the scheduler, expert load and tenants in
the API server. The structures are `fragments` (DiSketch, arXiv 2503.13515) and `learned`
(LWCSS, arXiv 2409.11516); this module only decides what goes into them.

* `PrefixTelemetry` (EngineCore, `PredictiveScheduler.add_request`): every arriving request's
  prefix-block hashes (vLLM's ``Request.block_hashes``: block i's hash covers the whole prompt
  prefix up to block i) go into a fragmented sketch, so the popularity of any prefix over any
  time range can be asked; closed fragments move to the API server's `PrefixHistory` at each
  pull (DiSketch's node / collector split); one item per request - the hash of its first
  ``telemetry_prefix_blocks`` blocks (fewer if the prompt is shorter) - goes into the top-k
  tracker over the last W requests, with the first block (the template) and the prompt length
  as the predictor's extra features.
* `ExpertTelemetry` (API server): per-expert routed tokens from the MoE load counters (the
  ``ext_expert_load`` worker RPC, one "device" per expert so ``device_tokens`` is the per-expert
  total), fed as the change since the previous pull, so a sub-epoch's resolution is the pull
  interval (every ``/metrics`` scrape and ``/v1/ext/telemetry`` call). Only while those
  counters run (``--ext-moe-track-load`` or a load-aware router): they cost time in every MoE
  layer of every step (docs/laser.md), the rest of the telemetry none per step.
* `TenantTelemetry` (API server): the request's tenant (header or ``user`` field) into a
  top-k tracker over the last W requests.
"""
from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field

from vllm_ext.telemetry.fragments import Fragment, FragmentedSketch
from vllm_ext.telemetry.hashing import key_of
from vllm_ext.telemetry.learned import LearnedWindow
from vllm_ext.telemetry.wcss import WindowSpaceSaving

COUNTER_BYTES = 20        # WCSS bytes per counter, measured: its Space Saving entry (16 B) and
#                           its share of queued overflows (peak_bytes / counters ~ 18-21 B)
PREDICTOR_BYTES = 2048    # 2^8 float32 weights + 32 sampled arrivals x 32 B
MIN_COUNTERS = 8


def node_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def tracker(budget_bytes: int, window: int, learned: bool, threshold: float = 0.5):
    """A top-k tracker of `budget_bytes`: LWCSS (predictor + two Bloom filters of ``window / 2``
    bytes each - about 8 bits per filtered arrival - capped at an eighth of the budget, the
    rest counters) or plain WCSS (all counters)."""
    if not learned:
        return WindowSpaceSaving(window, max(MIN_COUNTERS, budget_bytes // COUNTER_BYTES))
    bloom_bytes = max(64, min(window // 2, budget_bytes // 8))
    rest = budget_bytes - PREDICTOR_BYTES - 2 * bloom_bytes
    return LearnedWindow(window, max(MIN_COUNTERS, rest // COUNTER_BYTES), threshold,
                         bloom_bits=8 * bloom_bytes, buffer_size=32)


def fragmented(cfg, budget_bytes: int, node: str, parts: int = 8) -> FragmentedSketch:
    """Fragments of at most ``budget / parts`` bytes each, within `budget_bytes` together."""
    return FragmentedSketch(kind=cfg.telemetry_sketch, depth=cfg.telemetry_depth,
                            budget_bytes=budget_bytes,
                            fragment_bytes=max(budget_bytes // parts, 1024),
                            rho=cfg.telemetry_rho, epoch_s=cfg.telemetry_epoch_s, node=node)


def _add_top(top, key: int, extra=()) -> None:
    if isinstance(top, LearnedWindow):
        top.add(key, extra)
    else:
        top.add(key)


def _tracker_stats(top) -> dict:
    out = {"window": top.window, "counters": top.wcss.counters if isinstance(top, LearnedWindow)
           else top.counters, "memory_bytes": top.memory_bytes,
           "error_bound": top.error_bound(), "learned": isinstance(top, LearnedWindow)}
    if isinstance(top, LearnedWindow):
        out.update(filtered=top.filtered, guarded=top.guarded, labels=top.predictor.labels)
    return out


@dataclass
class PrefixTelemetry:
    cfg: object
    node: str = field(default_factory=node_name)

    def __post_init__(self) -> None:
        # the engine holds its open fragment and up to three closed ones not pulled yet
        # (`report(drain=True)`), a quarter of the budget each; older ones are dropped
        # (counted); the history is the collector's (`PrefixHistory`, API server)
        self.sketch = fragmented(self.cfg, self.cfg.telemetry_prefix_bytes, self.node, parts=4)
        self.top = tracker(self.cfg.telemetry_topk_bytes, self.cfg.telemetry_window,
                           self.cfg.telemetry_learned)
        self.depth: dict[int, int] = {}  # top-k item key -> its prefix length in blocks
        self.requests = 0
        self.blocks = 0
        self.unhashed = 0  # requests without a full block (or prefix caching off)

    def on_request(self, block_hashes, num_prompt_tokens: int, now: float | None = None) -> None:
        self.requests += 1
        if not block_hashes:
            self.unhashed += 1
            return
        now = time.time() if now is None else now
        self.sketch.add(block_hashes, now=now)
        self.blocks += len(block_hashes)
        depth = min(len(block_hashes), self.cfg.telemetry_prefix_blocks)
        key = key_of(block_hashes[depth - 1])
        _add_top(self.top, key, (("first", key_of(block_hashes[0])),
                                 ("len", int(math.log2(1 + num_prompt_tokens)))))
        self.depth[key] = depth
        if len(self.depth) > 4 * self.cfg.telemetry_window:
            live = self.top.wcss.keys() if isinstance(self.top, LearnedWindow) else self.top.keys()
            self.depth = {k: d for k, d in self.depth.items() if k in live}

    def is_hot(self, key: int, min_count: int) -> bool:
        return self.top.wcss.query(key) >= min_count if isinstance(self.top, LearnedWindow) \
            else self.top.query(key) >= min_count

    def report(self, top_k: int = 10, range_s: float = 60.0, full: bool = False,
               drain: bool = False, now: float | None = None) -> dict:
        """What ``ext_telemetry_report`` returns: the top prefixes over the last W requests,
        their counts over the last `range_s` seconds from the fragments held here, sizes,
        (`full`) the fragments themselves for a cross-replica merge, and (`drain`) the closed
        fragments handed over to the collector - they leave the engine - and the open one."""
        now = time.time() if now is None else now
        self.sketch.tick(now)
        top = self.top.top(top_k)
        est = self.sketch.estimate([k for k, _ in top], now - range_s, math.inf, now=now)
        rows = [{"prefix": f"{k:016x}", "blocks": self.depth.get(k, 0), "window_count": int(c),
                 "range_count": float(v)} for (k, c), v in zip(top, est.values)]
        out = {"node": self.node, "time": now, "requests": self.requests,
               "blocks": self.blocks, "unhashed": self.unhashed, "top": rows,
               "range_s": range_s, "range_bound": est.bound,
               "range_failure_probability": est.failure_probability,
               "range_covered": [est.start, est.end], "tracker": _tracker_stats(self.top),
               "sketch": {"kind": self.sketch.kind, "depth": self.sketch.depth,
                          "memory_bytes": self.sketch.memory_bytes,
                          "budget_bytes": self.sketch.budget_bytes,
                          "fragments": len(self.sketch.all_fragments()),
                          "dropped": self.sketch.dropped, "items": self.sketch.items}}
        if full:
            out["fragments"] = self.sketch.to_dict()
        if drain:
            out["drained"] = [f.to_dict() for f in self.sketch.fragments]
            self.sketch.fragments = []
            active = self.sketch.active
            out["open"] = None if active is None else active.to_dict()
        return out


@dataclass
class PrefixHistory:
    """The collector's side of DiSketch (API server): fragments drained from the engine, kept
    within ``telemetry_history_bytes`` (oldest dropped), plus the engine's open fragment of the
    latest pull, answer the range counts."""
    cfg: object

    def __post_init__(self) -> None:
        self.fragments: list[Fragment] = []
        self.dropped = 0

    @property
    def memory_bytes(self) -> int:
        return sum(f.sketch.memory_bytes for f in self.fragments)

    def absorb(self, report: dict, range_s: float, full: bool) -> dict:
        """`report` (drained) with its range counts recomputed over history + open fragment."""
        self.fragments += [Fragment.from_dict(f) for f in report.pop("drained", [])]
        while self.fragments and self.memory_bytes > self.cfg.telemetry_history_bytes:
            self.fragments.pop(0)
            self.dropped += 1
        view = FragmentedSketch(self.cfg.telemetry_sketch, self.cfg.telemetry_depth,
                                budget_bytes=1 << 62, node=report["node"])
        view.fragments = self.fragments + ([Fragment.from_dict(report["open"])]
                                           if report.get("open") else [])
        report.pop("open", None)
        now = report["time"]
        est = view.estimate([int(r["prefix"], 16) for r in report["top"]], now - range_s,
                            math.inf, now=now)
        for row, value in zip(report["top"], est.values):
            row["range_count"] = float(value)
        report.update(range_bound=est.bound, range_failure_probability=est.failure_probability,
                      range_covered=[est.start, est.end],
                      history={"memory_bytes": self.memory_bytes,
                               "budget_bytes": self.cfg.telemetry_history_bytes,
                               "fragments": len(self.fragments), "dropped": self.dropped})
        if full:
            report["fragments"] = view.to_dict()
        return report


@dataclass
class ExpertTelemetry:
    cfg: object
    node: str = field(default_factory=node_name)

    def __post_init__(self) -> None:
        self.sketch = fragmented(self.cfg, self.cfg.telemetry_expert_bytes, self.node)
        self.last: dict[tuple[str, int], float] = {}
        self.experts: dict[str, int] = {}  # layer -> number of experts

    def feed(self, reports, now: float | None = None) -> None:
        """`reports`: one ``load_report`` per worker, taken with ``ep_devices`` = experts."""
        now = time.time() if now is None else now
        keys, counts = [], []
        for report in reports or []:
            for layer in (report or {}).get("layers", []):
                name, tokens = str(layer["layer"]), layer.get("device_tokens") or []
                self.experts[name] = len(tokens)
                for e, total in enumerate(tokens):
                    before = self.last.get((name, e), 0.0)
                    delta = total - before if total >= before else total  # counters were reset
                    self.last[(name, e)] = total
                    if delta > 0:
                        keys.append(key_of((name, e)))
                        counts.append(int(round(delta)))
        self.sketch.tick(now)
        if keys:
            self.sketch.add(keys, counts, now=now)

    def windows(self, seconds: list[float], now: float | None = None) -> dict:
        now = time.time() if now is None else now
        out = {}
        for s in seconds:
            layers, bound = {}, 0.0
            for name, n in self.experts.items():
                est = self.sketch.estimate([key_of((name, e)) for e in range(n)], now - s,
                                           math.inf, now=now)
                layers[name] = [max(0.0, float(v)) for v in est.values]
                bound = max(bound, est.bound)
            out[f"{s:g}"] = {"layers": layers, "bound": bound}
        return out


@dataclass
class TenantTelemetry:
    cfg: object

    def __post_init__(self) -> None:
        self.top = tracker(self.cfg.telemetry_topk_bytes, self.cfg.telemetry_window,
                           self.cfg.telemetry_learned)
        self.names: dict[int, str] = {}
        self.requests = 0

    def on_request(self, tenant: str) -> None:
        self.requests += 1
        key = key_of(tenant)
        _add_top(self.top, key)
        self.names[key] = tenant[:64]
        if len(self.names) > 4 * self.cfg.telemetry_window:
            live = self.top.wcss.keys() if isinstance(self.top, LearnedWindow) else self.top.keys()
            self.names = {k: n for k, n in self.names.items() if k in live}

    def report(self, top_k: int) -> dict:
        return {"requests": self.requests, "tracker": _tracker_stats(self.top),
                "top": [{"tenant": self.names.get(k, f"{k:016x}"), "window_count": int(c)}
                        for k, c in self.top.top(top_k)]}
