"""vllm-ext's metrics on vLLM's own ``/metrics`` (its prometheus registry, no second server).

The counters live where the work happens (scheduler: `vllm_ext.sched.stats`; workers: probe
runs and time, expert load), in other processes than the API server. `refresh` pulls them over
the engine's RPC paths just before vLLM renders ``/metrics`` (the middleware awaits it), and
`ExtCollector`, registered once in prometheus_client's ``REGISTRY`` (the one vLLM exposes with
a single API server), yields them at scrape time:

  vllm_ext_policy_info{policy}                         the active scheduling policy
  vllm_ext_preemptions_total{cause}                    policy / kv_pressure
  vllm_ext_policy_fallbacks_total                      failed policies replaced by FCFS
  vllm_ext_probe_runs_total, vllm_ext_probe_seconds_total
  vllm_ext_prediction_abs_error_tokens (histogram)     |predicted - actual| output at the
                                                       first prediction, per finished request
  vllm_ext_expert_load_max_over_mean{layer}            when expert load is tracked
  vllm_ext_kv_cache_bits                               KV cache bits in use
  vllm_ext_step_cost_seconds{term}                     base / per_token step cost fitted online
                                                       (cost-aware preemption), once calibrated
  vllm_ext_tool_*                                      tool pauses by handling, pause time,
                                                       recomputed / reused context tokens
  vllm_ext_preempt_*_tokens_total, ..._swapped_total   a preempted request's context
                                                       re-prefilled / found computed on its
                                                       return; victims saved to the swap tier
  vllm_ext_swap_*                                      with --ext-swap-dir: blocks saved /
                                                       loaded, tokens loaded, failures,
                                                       evictions, fallbacks, stored blocks
  vllm_ext_telemetry_*                                 with --ext-telemetry: sketch memory,
                                                       top prefixes / tenants, per-expert load
                                                       (`vllm_ext.telemetry.export`)
With several API servers (``--api-server-count`` > 1) vLLM switches to a multiprocess registry
that these collected values do not reach; they are then absent from ``/metrics``.
"""
from __future__ import annotations

import asyncio
import logging

from vllm_ext.engine_rpc import scheduler_call

logger = logging.getLogger(__name__)
RPC_TIMEOUT_S = 10.0


class ExtCollector:
    def __init__(self) -> None:
        self.snapshot: dict = {}

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily, InfoMetricFamily)
        snap = self.snapshot
        sched, workers = snap.get("scheduler"), snap.get("workers") or []
        if sched:
            yield InfoMetricFamily("vllm_ext_policy", "active vllm-ext scheduling policy",
                                   value={"policy": sched["policy"]})
            pre = CounterMetricFamily("vllm_ext_preemptions", "preemptions by cause",
                                      labels=["cause"])
            for cause, n in sched["preemptions"].items():
                pre.add_metric([cause], n)
            yield pre
            yield CounterMetricFamily("vllm_ext_policy_fallbacks", "policies that failed and "
                                      "were replaced by FCFS", value=sched["policy_fallbacks"])
            yield HistogramMetricFamily(
                "vllm_ext_prediction_abs_error_tokens",
                "|predicted - actual| output tokens at a request's first prediction",
                buckets=_cumulative(sched["error_buckets"], sched["error_counts"]),
                sum_value=sched["error_sum"])
            yield GaugeMetricFamily("vllm_ext_kv_cache_bits", "KV cache bits in use",
                                    value=sched["kv_bits"])
            tools = sched.get("tools") or {}
            pauses = CounterMetricFamily("vllm_ext_tool_pauses", "requests paused for a tool "
                                         "call, by KV handling", labels=["handling"])
            for handling, n in (tools.get("pauses") or {}).items():
                pauses.add_metric([handling], n)
            yield pauses
            yield CounterMetricFamily("vllm_ext_tool_pause_seconds", "time requests spent "
                                      "paused for tool calls", value=tools.get("pause_seconds", 0))
            yield CounterMetricFamily("vllm_ext_tool_recompute_tokens", "context tokens "
                                      "re-prefilled after a discarded or swapped pause",
                                      value=tools.get("recompute_tokens", 0))
            yield CounterMetricFamily("vllm_ext_tool_reused_tokens", "context tokens of a "
                                      "discarded or swapped pause found computed on resume "
                                      "(prefix cache + swap tier)",
                                      value=tools.get("reused_tokens", 0))
            yield from _swap_families(sched.get("swap"), tools.get("swap_fallbacks", 0))
            yield from _preempt_families(sched.get("preempt") or {})
            yield from _session_families(sched.get("sessions") or {})
            cost = sched.get("step_cost") or {}
            if cost.get("base_s") is not None:
                fit = GaugeMetricFamily("vllm_ext_step_cost_seconds", "engine step cost fitted "
                                        "online: base + per_token x scheduled tokens",
                                        labels=["term"])
                fit.add_metric(["base"], cost["base_s"])
                fit.add_metric(["per_token"], cost["per_token_s"])
                yield fit
        if workers:
            yield CounterMetricFamily("vllm_ext_probe_runs", "probe evaluations (steps)",
                                      value=sum(w["probe_runs"] for w in workers))
            yield CounterMetricFamily("vllm_ext_probe_seconds", "time spent in probes",
                                      value=sum(w["probe_seconds"] for w in workers))
        layers = snap.get("expert_load") or {}
        if layers:
            load = GaugeMetricFamily("vllm_ext_expert_load_max_over_mean",
                                     "expert load max/mean per MoE layer", labels=["layer"])
            for name, value in layers.items():
                load.add_metric([name], value)
            yield load
        if snap.get("telemetry"):
            from vllm_ext.telemetry.export import families
            yield from families(snap["telemetry"])


SWAP_COUNTERS = {  # ext_get_stats()["swap"] key -> help (vllm_ext_swap_<key>_total)
    "blocks_saved": "KV blocks sent to the swap tier", "blocks_loaded": "KV blocks loaded "
    "back from the swap tier", "tokens_loaded": "tokens whose KV was loaded from the swap tier",
    "save_failures": "blocks the swap tier failed to save", "load_failures": "blocks the swap "
    "tier failed to load (recomputed)", "evictions": "swap tier blocks evicted (LRU)"}


def _swap_families(swap: dict | None, fallbacks: int):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if not swap:
        return
    for key, help_text in SWAP_COUNTERS.items():
        yield CounterMetricFamily(f"vllm_ext_swap_{key}", help_text, value=swap.get(key, 0))
    yield CounterMetricFamily("vllm_ext_swap_fallbacks", "swap pauses done as discard "
                              "(tier off or failing)", value=fallbacks)
    yield GaugeMetricFamily("vllm_ext_swap_stored_blocks", "KV blocks held by the swap tier",
                            value=swap.get("stored_blocks", 0))
    yield GaugeMetricFamily("vllm_ext_swap_enabled", "1 while the swap tier is on",
                            value=1.0 if swap.get("enabled") else 0.0)


def _cumulative(edges, counts) -> list[tuple[str, float]]:
    out, total = [], 0
    for edge, n in zip([*map(str, edges), "+Inf"], counts):
        total += n
        out.append((edge, total))
    return out


_collector: ExtCollector | None = None


def collector() -> ExtCollector:
    global _collector
    if _collector is None:
        from prometheus_client import REGISTRY
        _collector = ExtCollector()
        REGISTRY.register(_collector)
    return _collector


async def refresh(app) -> None:
    """Pull the engine's counters into the collector; on failure the last snapshot stays."""
    engine = app.state.engine_client
    target = collector()
    try:
        sched = await asyncio.wait_for(scheduler_call(engine, "ext_get_stats"), RPC_TIMEOUT_S)
        workers = await asyncio.wait_for(engine.collective_rpc("ext_stats"), RPC_TIMEOUT_S)
        snap = {"scheduler": sched, "workers": [w for w in workers or [] if w]}
        config = (engine.vllm_config.additional_config or {}).get("vllm_ext", {})
        if config.get("moe_track_load") or config.get("moe_router", "topk") != "topk":
            reports = await asyncio.wait_for(engine.collective_rpc("ext_expert_load"),
                                             RPC_TIMEOUT_S)
            snap["expert_load"] = expert_imbalance(reports)
        if config.get("telemetry"):
            snap["telemetry"] = await _telemetry(app)
        target.snapshot = snap
    except Exception as exc:
        logger.warning("vllm-ext: /metrics could not refresh engine counters: %s", exc)


async def _telemetry(app) -> dict | None:
    from vllm_ext.telemetry.export import Query
    from vllm_ext.telemetry.hub import hub_for

    hub = hub_for(app)
    return None if hub is None else await hub.payload(app.state.engine_client, Query())


def expert_imbalance(reports: list) -> dict[str, float]:
    out: dict[str, float] = {}
    for report in reports or []:  # one `load_report` per worker
        for layer in (report or {}).get("layers", []):
            out[layer["layer"]] = float(layer["max_over_mean"])
    return out


def _preempt_families(pre: dict):
    """A preempted request's return (`vllm_ext.sched.preempt_swap`)."""
    from prometheus_client.core import CounterMetricFamily

    yield CounterMetricFamily("vllm_ext_preempt_recompute_tokens", "context tokens a "
                              "preempted request re-prefilled on its return",
                              value=pre.get("recompute_tokens", 0))
    yield CounterMetricFamily("vllm_ext_preempt_reused_tokens", "context tokens a preempted "
                              "request found computed on its return (prefix cache + swap "
                              "tier)", value=pre.get("reused_tokens", 0))
    yield CounterMetricFamily("vllm_ext_preempt_swapped", "preemptions whose KV blocks went "
                              "to the swap tier (--ext-preempt-mode swap)",
                              value=pre.get("swapped", 0))


def _session_families(ses: dict):
    """Finished turns kept for their session's next turn (`vllm_ext.sched.sessions`)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    turns = CounterMetricFamily("vllm_ext_session_turns", "finished turns with a session_id "
                                "by the handling of their KV (--ext-session-keep)",
                                labels=["handling"])
    for handling in ("preserve", "discard", "swap"):
        turns.add_metric([handling], ses.get(handling, 0))
    yield turns
    yield CounterMetricFamily("vllm_ext_session_recompute_tokens", "context tokens a "
                              "session's next turn re-prefilled", value=ses.get("recompute_tokens", 0))
    yield CounterMetricFamily("vllm_ext_session_reused_tokens", "context tokens a session's "
                              "next turn found computed (prefix cache, pins, swap tier)",
                              value=ses.get("reused_tokens", 0))
    yield GaugeMetricFamily("vllm_ext_session_pinned_blocks", "KV blocks pinned for sessions' "
                            "next turns", value=ses.get("pinned_blocks", 0))

