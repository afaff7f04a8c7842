"""The one method vllm-ext adds to vLLM's EngineCore: a utility call that reaches the scheduler.

Targets vLLM 0.32. The API server reaches EngineCore only through utility calls
(``EngineCoreClient.call_utility_async(name, *args)``, dispatched by
``EngineCore._handle_client_request`` as ``getattr(self, name)(*args)`` in the engine's busy
loop, i.e. between two steps) and the workers through ``collective_rpc``. No utility reaches a
custom scheduler's own methods, and vLLM has no hook to register one, so `install()` adds
``EngineCore.ext_scheduler_call(method, args)``: it calls ``scheduler.<method>(*args)`` for a
method whose name starts with ``ext_`` and refuses any other. It adds a method and replaces
none; `VLLM_TARGETS` records the dispatch it relies on (`vllm_ext.compat.fingerprint`) and
tests/test_live_config.py fails loudly if that changes or vLLM starts defining the name itself.
"""
from __future__ import annotations

from typing import Any

METHOD = "ext_scheduler_call"
VLLM_TARGETS: dict[str, tuple[str, str]] = {
    "vllm.v1.engine.core:EngineCoreProc._handle_client_request": (
        "(self, request_type: vllm.v1.engine.EngineCoreRequestType, request: Any) -> None",
        "6870d40b73da5b70"),
}


def ext_scheduler_call(self, method: str, args: list | tuple = ()) -> Any:
    if not isinstance(method, str) or not method.startswith("ext_"):
        raise ValueError(f"ext_scheduler_call: {method!r} is not a vllm-ext scheduler method")
    target = getattr(self.scheduler, method, None)
    if target is None:
        raise ValueError(f"ext_scheduler_call: the scheduler ({type(self.scheduler).__name__}) "
                         f"has no {method}; serve with --scheduler-cls "
                         "vllm_ext.sched.scheduler.PredictiveScheduler")
    return target(*args)


def install() -> None:
    from vllm.v1.engine.core import EngineCore

    current = getattr(EngineCore, METHOD, None)
    if current is ext_scheduler_call:
        return
    if current is not None:
        raise RuntimeError(f"vLLM's EngineCore already defines {METHOD}; vllm_ext.engine_rpc "
                           "targets vLLM 0.32 and must be revisited")
    setattr(EngineCore, METHOD, ext_scheduler_call)


async def scheduler_call(engine_client, method: str, *args) -> Any:
    """From the API server (an AsyncLLM): `method` on the scheduler, between two steps."""
    return await engine_client.engine_core.call_utility_async(METHOD, method, list(args))
