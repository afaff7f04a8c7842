"""Which attention backend an engine gets: HACK only when its ExtConfig has ``kv_bits != 16``.

Paper: HACK (arXiv 2502.03589). Rule: ``vllm_ext.register()`` runs in every vLLM process before
any engine config exists, so it cannot know the bit width. It registers this module's attribute
as the class path of ``CPU_ATTN`` (CPU) or ``CUSTOM`` (GPU); vLLM resolves that path inside its
backend selection, where the engine's config is current, and the module attribute answers then:
the HACK backend for 8/4/2 bits, vLLM's own class object (unchanged) for 16 bits.
"""
from __future__ import annotations

import logging

from vllm_ext.config import ExtConfig, ExtConfigError

logger = logging.getLogger("vllm_ext")
HACK_CPU = "vllm_ext.kernels.cpu_backend.HackCPUAttentionBackend"
HACK_GPU = "vllm_ext.kernels.gpu_backend.HackTritonAttentionBackend"
_seen: ExtConfig | None = None


def active_ext_config() -> ExtConfig:
    """ExtConfig of the current vLLM config; else the last one seen at selection; else default."""
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    return ExtConfig.from_vllm_config(cfg) if cfg is not None else (_seen or ExtConfig())


def _resolve(name: str):
    global _seen
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    _seen = ext = active_ext_config()
    if ext.kv_bits == 16:
        if name == "CUSTOM":
            raise ExtConfigError("--attention-backend CUSTOM is vllm-ext's HACK backend: set "
                                 "--ext-kv-bits to 8, 4 or 2")
        return resolve_obj_by_qualname(AttentionBackendEnum[name].value)
    logger.info("vllm-ext: HACK attention on %d-bit KV (partition %d)", ext.kv_bits,
                ext.kv_partition)
    return resolve_obj_by_qualname(HACK_CPU if name == "CPU_ATTN" else HACK_GPU)


def __getattr__(name: str):
    if name in ("CPU_ATTN", "CUSTOM"):
        return _resolve(name)
    raise AttributeError(name)


def install() -> None:
    """Point vLLM's backend registry at this module (idempotent, imports no backend)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.CPU_ATTN")
    elif current_platform.is_cuda_alike():
        register_backend(AttentionBackendEnum.CUSTOM, f"{__name__}.CUSTOM")
