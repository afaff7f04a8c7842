"""Per-layer routing state attached to a vLLM MoE router: LASER (arXiv 2510.03293) + load counters.

`attach_ext_routing(runner, ext, vllm_config)` (called by `vllm_ext.moe.patch` right after vLLM
builds an MoE layer) reads the layer's vLLM router into a `RouterSpec` and sets the router
instance's ``_compute_routing`` to an `ExtRouting` module:
  * ``moe_router = laser | least_loaded``: `vllm_ext.moe.laser.laser_route` with the layer band's
    thresholds (early/middle/late third of the decoder layers) and the layer's `ExpertLoad`;
  * ``moe_router = topk`` with ``moe_track_load``: vLLM's own ``_compute_routing``, counted.
vLLM's ``BaseRouter._select_experts`` still does the rest (capture, EPLB mapping, dtype).

`ExpertLoad` holds tensor counters (buffers, updated in place with ``index_add_``/``index_copy_``
inside the traced forward, so they count in eager and compiled mode alike): a decayed window
``W_s = decay * W_(s-1) + C_s`` of tokens per expert (LASER's load across steps: a token in pass
s sees ``decay * W_(s-1)`` plus the tokens already routed in s), the total since the last reset,
the last `HISTORY_STEPS` passes' counts, and LASER's flat/moved token counts. The worker reads
them through ``ProbeWorker.ext_expert_load`` (`expert_loads` finds them in the model).
Routers LASER cannot drive (custom routing functions, correction bias, sqrtsoftplus, routers
other than CPURouter/FusedTopKRouter/GroupedTopKRouter) keep vLLM's routing, counted, and a
warning names the layer. Monolithic expert kernels never call the router: not covered.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from vllm_ext.moe.laser import SCORING_FUNCS, LaserParams, laser_route

logger = logging.getLogger("vllm_ext.moe")

HISTORY_STEPS = 512
BANDS = ("early", "middle", "late")


@dataclass(frozen=True)
class RouterSpec:
    """What LASER needs to reproduce a vLLM router's scoring and weights."""
    top_k: int
    renormalize: bool
    scoring_func: str = "softmax"
    num_expert_group: int = 0
    topk_group: int = 0
    routed_scaling_factor: float = 1.0

    def router_kwargs(self) -> dict[str, Any]:
        return dict(renormalize=self.renormalize, scoring_func=self.scoring_func,
                    routed_scaling_factor=self.routed_scaling_factor,
                    num_expert_group=self.num_expert_group, topk_group=self.topk_group)


def router_spec(router: Any, num_experts: int) -> RouterSpec | str:
    """The `RouterSpec` of a vLLM 0.32 router, or the reason LASER cannot drive it."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter
    from vllm.model_executor.layers.fused_moe.router.fused_topk_router import FusedTopKRouter
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import GroupedTopKRouter

    if not isinstance(router, (CPURouter, FusedTopKRouter, GroupedTopKRouter)):
        return f"router {type(router).__name__} is not supported"
    if getattr(router, "custom_routing_function", None) is not None:
        return "a custom routing function"
    if getattr(router, "e_score_correction_bias", None) is not None:
        return "an expert score correction bias"
    if router.scoring_func not in SCORING_FUNCS:
        return f"scoring function {router.scoring_func!r}"
    spec = RouterSpec(top_k=router.top_k, renormalize=router.renormalize,
                      scoring_func=router.scoring_func)
    grouped = isinstance(router, GroupedTopKRouter) or (
        isinstance(router, CPURouter) and router.use_grouped_topk)
    groups = getattr(router, "num_expert_group", None) or 0
    valid = groups > 0 and num_experts % groups == 0 and (
        num_experts > groups or isinstance(router, CPURouter))
    if grouped and valid:  # vLLM applies the scaling factor on its grouped paths only
        spec = replace(spec, num_expert_group=groups, topk_group=router.topk_group or groups,
                       routed_scaling_factor=router.routed_scaling_factor)
    return spec


class ExpertLoad(torch.nn.Module):
    """Tensor counters of one MoE layer (see the module docstring)."""

    def __init__(self, num_experts: int, decay: float, history: int = HISTORY_STEPS,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_experts, self.decay, self.history_steps = num_experts, decay, history
        zeros = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.register_buffer("window", zeros(num_experts))
        self.register_buffer("total", zeros(num_experts, dtype=torch.float64))
        self.register_buffer("history", zeros(history, num_experts))
        self.register_buffer("steps", zeros((), dtype=torch.int64))
        self.register_buffer("tokens", zeros(3, dtype=torch.float64))  # routed, flat, moved

    def base_load(self) -> torch.Tensor:
        return self.window * self.decay

    def record(self, ids: torch.Tensor) -> None:
        """Count one forward pass's choices [T, k] (negative ids = padding, not counted)."""
        flat = ids.reshape(-1).long()
        valid = (flat >= 0).to(torch.float32)
        counts = torch.zeros_like(self.window).index_add_(0, flat.clamp_min(0), valid)
        self.window.mul_(self.decay).add_(counts)
        self.total.add_(counts)
        slot = torch.remainder(self.steps, self.history_steps).reshape(1)
        self.history.index_copy_(0, slot, counts.unsqueeze(0))
        self.steps.add_(1)
        self.tokens[0].add_(ids.shape[0])

    def record_laser(self, flat: torch.Tensor, moved: torch.Tensor) -> None:
        self.tokens[1:].add_(torch.stack([flat.sum(), moved.sum()]).to(self.tokens.dtype))

    def reset(self) -> None:
        for buf in self.buffers():
            buf.zero_()

    def snapshot(self) -> dict[str, Any]:
        """Plain-Python copy for the stats (history rows oldest first)."""
        steps = int(self.steps)
        rows = min(steps, self.history_steps)
        start = steps % self.history_steps if steps > self.history_steps else 0
        history = torch.roll(self.history, -start, dims=0)[:rows]
        routed, flat, moved = self.tokens.tolist()
        return {"total": self.total.tolist(), "history": history.tolist(), "steps": steps,
                "tokens": routed, "flat_tokens": flat, "moved_tokens": moved,
                "decay": self.decay}


class ExtRouting(torch.nn.Module):
    """Replaces one vLLM router's ``_compute_routing`` (same signature and contract)."""

    def __init__(self, spec: RouterSpec, params: LaserParams | None, load: ExpertLoad,
                 vllm_routing: Callable | None = None):
        super().__init__()
        self.spec, self.params, self.load = spec, params, load
        self.vllm_routing = vllm_routing

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor,
                indices_type: torch.dtype | None = None, *, input_ids: torch.Tensor | None = None):
        if self.params is None:
            weights, ids = self.vllm_routing(hidden_states, router_logits, indices_type,
                                             input_ids=input_ids)
        else:
            routing = laser_route(router_logits, self.spec.top_k, self.load.base_load(),
                                  self.params, **self.spec.router_kwargs())
            self.load.record_laser(routing.flat, routing.moved)
            weights, ids = routing.weights, routing.ids
        self.load.record(ids)
        return weights, ids


# ---- configuration -> per-layer state --------------------------------------------------------

def layer_band(layer_name: str, num_layers: int) -> str:
    """early/middle/late third of the decoder stack from ``...layers.<i>...`` (else middle)."""
    match = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", layer_name)
    if not match or num_layers <= 0:
        return "middle"
    return BANDS[min(2, int(match.group(1)) * 3 // num_layers)]


def laser_params(ext: Any, band: str) -> LaserParams:
    """LaserParams for one band: the ExtConfig's laser_* values, then its per-band overrides."""
    values = dict(mode=ext.moe_router, eps_high=ext.laser_eps_high,
                  entropy_max=ext.laser_entropy_max, pool_threshold=ext.laser_pool_threshold,
                  pool_max=ext.laser_pool_max, rounds=ext.laser_rounds)
    values.update(ext.laser_bands.get(band, {}))
    return LaserParams(**values)


def attach_ext_routing(runner: Any, ext: Any, vllm_config: Any) -> ExtRouting:
    """Install `ExtRouting` on ``runner.router`` (an MoERunner just built by vLLM)."""
    router = runner.router
    num_experts = runner.moe_config.num_logical_experts
    spec = router_spec(router, num_experts)
    params = None
    if ext.moe_router != "topk":
        if isinstance(spec, str):
            logger.warning("vllm-ext: %s keeps vLLM's top-k routing (LASER does not support %s)",
                           runner.layer_name, spec)
        else:
            hf = vllm_config.model_config.hf_text_config if vllm_config.model_config else None
            band = layer_band(runner.layer_name, getattr(hf, "num_hidden_layers", 0))
            params = laser_params(ext, band)
    if isinstance(spec, str):
        spec = RouterSpec(top_k=router.top_k, renormalize=getattr(router, "renormalize", True))
    load = ExpertLoad(num_experts, ext.laser_load_decay)  # on vLLM's model-building device
    routing = ExtRouting(spec, params, load, vllm_routing=router._compute_routing)
    router._compute_routing = routing
    return routing


def expert_loads(model: torch.nn.Module) -> dict[str, ExpertLoad]:
    """{layer name: ExpertLoad} of every MoE layer of ``model`` that carries vllm-ext routing."""
    found = {}
    for name, module in model.named_modules():
        routing = getattr(getattr(module, "router", None), "__dict__", {}).get("_compute_routing")
        if isinstance(routing, ExtRouting):
            found[getattr(module, "layer_name", name)] = routing.load
    return found
