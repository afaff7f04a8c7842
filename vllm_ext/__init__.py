"""vllm-ext: predictive scheduling, MoE routing and quantized-KV attention as a vLLM plugin.

`register()` is the ``vllm.general_plugins`` entry point. vLLM runs it in every process (API
server, EngineCore, workers), so it is idempotent and cheap: it checks the vLLM version, installs
the MoE routing patch (`vllm_ext.moe.patch`, a no-op for engines with ``moe_router=topk``) and
logs once which features are available. Scheduling and probes are switched on per engine through
``--scheduler-cls`` / ``--worker-cls`` / ``--additional-config`` (see `vllm-ext serve`).
"""
from __future__ import annotations

import logging
import os

__version__ = "0.1.0"
_registered = False
logger = logging.getLogger("vllm_ext")

FEATURES = {
    "scheduler": "vllm_ext.sched.scheduler.PredictiveScheduler (policies: fcfs, oracle, trail, spjf)",
    "worker": "vllm_ext.worker.probe_worker.ProbeWorker (prediction channel)",
    "server": "vllm_ext.server.middleware.ExtMiddleware (/v1/ext/config, predictions)",
    "moe": "vllm_ext.moe (MoE routers: topk, laser, least_loaded; expert-load counters)",
    "kv": "vllm_ext.kernels (HACK attention on 8/4/2-bit KV; --ext-kv-bits)",
}


class _ToVllmLogger(logging.Handler):
    """Hands each record to the ``vllm`` logger, whatever handlers vLLM gives it later."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("vllm").handle(record)


def share_vllm_logging() -> None:
    """Log through vLLM's handlers at vLLM's level. vLLM configures only the ``vllm`` logger,
    and in each process only after plugins load, so ``vllm_ext.*`` INFO lines would otherwise
    be dropped and warnings printed without vLLM's format."""
    ext = logging.getLogger("vllm_ext")
    if not any(isinstance(h, _ToVllmLogger) for h in ext.handlers):
        ext.addHandler(_ToVllmLogger())
        ext.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
        ext.propagate = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm_ext.compat import check_vllm_version

    version = check_vllm_version()
    share_vllm_logging()
    from vllm_ext.moe.patch import install as install_moe_patch

    install_moe_patch()  # acts per engine at MoE layer construction; topk engines untouched
    from vllm_ext.kernels.select import install as install_hack_backend

    install_hack_backend()  # resolved per engine at backend selection; 16-bit KV gets stock vLLM
    from vllm_ext.engine_rpc import install as install_engine_rpc

    install_engine_rpc()  # adds EngineCore.ext_scheduler_call (live config, /metrics)
    _registered = True
    logger.info("vllm-ext %s registered on vLLM %s; available: %s", __version__, version,
                "; ".join(FEATURES.values()))
