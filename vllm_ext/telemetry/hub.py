"""The API server's side of the telemetry: the one place that assembles a telemetry payload
(for ``GET /v1/ext/telemetry``, ``/metrics`` and the cross-server merge, `export`).

It holds what lives in the API server process - per-expert load fragments fed from the
workers' MoE counters (`collect.ExpertTelemetry`) and the tenant top-k (`collect.
TenantTelemetry`, fed by `tenants.TenantMiddleware`) - and asks the scheduler for the prefix
telemetry (``ext_telemetry_report`` through `vllm_ext.engine_rpc`), taking over the
fragments the engine has closed since the last pull (DiSketch's collector: the engine holds
only its open fragment and the ones not pulled yet, `collect.PrefixHistory` the history).
With several API servers each would take a share of the fragments: one of them should be
the one queried (or merge them all with ``vllm-ext telemetry merge``). One `Hub` per process,
built on first use from the engine's ExtConfig; None while ``--ext-telemetry`` is off.
"""
from __future__ import annotations

import asyncio
import logging
import time

from vllm_ext.config import ExtConfig
from vllm_ext.telemetry.collect import (ExpertTelemetry, PrefixHistory, TenantTelemetry,
                                        node_name)
from vllm_ext.telemetry.export import Query

logger = logging.getLogger(__name__)
RPC_TIMEOUT_S = 10.0
_EXPERT_KEYS = ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts")


class Hub:
    def __init__(self, cfg: ExtConfig) -> None:
        self.cfg = cfg
        self.node = node_name()
        self.experts = ExpertTelemetry(cfg, self.node)
        self.tenants = TenantTelemetry(cfg)
        self.prefix_history = PrefixHistory(cfg)
        self.lock = asyncio.Lock()

    async def poll_experts(self, engine) -> None:
        """Feed the change of every expert's routed tokens since the last poll (only while the
        MoE load counters run: ``--ext-moe-track-load`` or a load-aware router)."""
        if not (self.cfg.moe_track_load or self.cfg.moe_router != "topk"):
            return
        hf = getattr(getattr(engine.vllm_config, "model_config", None), "hf_config", None)
        n = next((getattr(hf, k) for k in _EXPERT_KEYS if isinstance(getattr(hf, k, None), int)),
                 None)
        if not n:
            return
        reports = await asyncio.wait_for(
            engine.collective_rpc("ext_expert_load", kwargs={"ep_devices": n}), RPC_TIMEOUT_S)
        self.experts.feed(reports)

    async def payload(self, engine, query: Query) -> dict:
        from vllm_ext.engine_rpc import scheduler_call

        async with self.lock:
            try:
                await self.poll_experts(engine)
            except Exception as exc:
                logger.warning("vllm-ext telemetry: expert load not polled: %s", exc)
            prefixes = await asyncio.wait_for(
                scheduler_call(engine, "ext_telemetry_report", query.top_k, query.range_s,
                               False, True), RPC_TIMEOUT_S)  # drain closed fragments
            if prefixes and "error" not in prefixes:
                prefixes = self.prefix_history.absorb(prefixes, query.range_s, query.fragments)
            now = time.time()
            sketch = self.experts.sketch
            experts = {"windows": self.experts.windows(list(query.windows), now),
                       "memory_bytes": sketch.memory_bytes, "budget_bytes": sketch.budget_bytes,
                       "fragments": len(sketch.all_fragments()), "dropped": sketch.dropped,
                       "items": sketch.items, "kind": sketch.kind}
            if query.fragments:
                experts["fragments_data"] = sketch.to_dict()
            return {"node": self.node, "time": now, "servers": 1, "prefixes": prefixes,
                    "experts": experts, "tenants": self.tenants.report(query.top_k),
                    "memory_bytes": {
                        "prefix_sketch": (prefixes or {}).get("sketch", {}).get("memory_bytes", 0),
                        "prefix_history": self.prefix_history.memory_bytes,
                        "prefix_topk": (prefixes or {}).get("tracker", {}).get("memory_bytes", 0),
                        "expert_sketch": sketch.memory_bytes,
                        "tenant_topk": self.tenants.top.memory_bytes}}


_hub: Hub | None = None


def hub_for(app) -> Hub | None:
    """The process's Hub, or None when the engine runs without ``--ext-telemetry``."""
    global _hub
    if _hub is None:
        engine = getattr(getattr(app, "state", None), "engine_client", None)
        if engine is None:
            return None
        cfg = ExtConfig.from_vllm_config(engine.vllm_config)
        if not cfg.telemetry:
            return None
        _hub = Hub(cfg)
    return _hub


def reset() -> None:
    """Forget the Hub (tests build several apps in one process)."""
    global _hub
    _hub = None


async def telemetry_response(app, params) -> tuple[int, dict]:
    """(status, body) of ``GET /v1/ext/telemetry``: 400 naming a bad parameter, 404 when
    telemetry is off, 503 when the engine does not answer."""
    from vllm_ext.telemetry.export import TelemetryQueryError, parse_query

    def error(status: int, message: str) -> tuple[int, dict]:
        return status, {"error": {"message": message, "type": "TelemetryError", "code": status}}

    try:
        query = parse_query(params)
    except TelemetryQueryError as exc:
        return error(400, str(exc))
    hub = hub_for(app)
    if hub is None:
        return error(404, "telemetry is off (serve with --ext-telemetry)")
    try:
        return 200, await hub.payload(app.state.engine_client, query)
    except Exception as exc:  # engine busy or gone
        return error(503, f"telemetry: the engine did not answer: {exc}")
