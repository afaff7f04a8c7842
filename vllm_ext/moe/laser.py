"""LASER: load-aware MoE routing at inference time (arXiv 2510.03293), as pure tensor functions.

The rule, per token. ``scores`` are the gate's softmax (or sigmoid) outputs; ``p`` is ``scores``
normalised to sum 1 (for softmax ``p == scores``):

1. A *peaked* gate keeps plain top-k. Peaked = top-k mass ``sum(top-k p) >= eps_high`` or
   normalised entropy ``H(p) / log(E) <= entropy_max`` (``entropy_max = 0`` turns that test off).
2. Otherwise a candidate pool is built: among the top-c experts (``c = pool_max``, or ``2k``
   when ``pool_max`` is 0, the default: a fixed c is a no-op on a router with k >= c), those whose
   score is within ``pool_threshold`` (relative) of the best, ``p_e >= (1 - pool_threshold) *
   p_max``. The top-k experts are always in the pool, so it holds at least k experts.
3. The k least-loaded experts of the pool are chosen; equal loads go to the higher score.
4. Weights are the gate scores of the chosen experts, renormalised to sum 1 when the router
   renormalises (vLLM's ``renormalize`` flag: softmax over the chosen logits == p_i / sum p),
   times ``routed_scaling_factor``.
Always k distinct experts (the choice is k positions of a top-c list of distinct experts).
``least_loaded``, an evaluation baseline, skips 1 and 2: the k least loaded of the top-c.

Load seen by a token = ``base_load`` (the caller passes the decayed window of earlier forward
passes, see `vllm_ext.moe.router.ExpertLoad`) + the tokens already routed in this pass.
*Approximation*: exact sequential greedy routing needs one step per token. Instead the pass
is split into ``rounds`` contiguous rounds of tokens (token t is in round ``t * rounds // T``);
a token sees the choices of all tokens of earlier rounds, while the tokens of one round are
routed in parallel against the same load. ``rounds >= T`` is exact sequential greedy, so decode
batches of up to ``rounds`` requests are routed exactly; a long prefill herds within a round.

Dynamo-safe: tensor ops only, no ``.item()``, no Python branch on data or on the token count
(the round loop has a fixed, configured length; branches read only static settings).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from vllm_ext.config import ExtConfig

MODES = ("laser", "least_loaded")
SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class LaserParams:
    """One layer's routing settings; the defaults are the engine's (`ExtConfig.laser_*`)."""
    mode: str = "laser"
    eps_high: float = ExtConfig.laser_eps_high
    entropy_max: float = ExtConfig.laser_entropy_max
    pool_threshold: float = ExtConfig.laser_pool_threshold
    pool_max: int = ExtConfig.laser_pool_max
    rounds: int = ExtConfig.laser_rounds

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"LASER mode must be one of {MODES}, got {self.mode!r}")
        if self.pool_max < 0 or self.rounds < 1:
            raise ValueError("pool_max must be >= 0 (0 = 2 x top-k) and rounds >= 1")


class Routing(NamedTuple):
    weights: torch.Tensor  # [T, k] float32
    ids: torch.Tensor      # [T, k] int32, distinct per row
    flat: torch.Tensor     # [T] bool: the token went through the load-aware pool
    moved: torch.Tensor    # [T] bool: its expert set differs from plain top-k


def gate_scores(logits: torch.Tensor, scoring_func: str = "softmax") -> torch.Tensor:
    logits = logits.float()
    if scoring_func == "softmax":
        return torch.softmax(logits, dim=-1)
    if scoring_func == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"LASER supports scoring {SCORING_FUNCS}, got {scoring_func!r}")


def group_limit(scores: torch.Tensor, num_expert_group: int, topk_group: int) -> torch.Tensor:
    """Grouped top-k's restriction (DeepSeek-V2): zero the experts outside each token's best
    ``topk_group`` groups, a group scoring as its best expert."""
    num_tokens, num_experts = scores.shape
    grouped = scores.view(num_tokens, num_expert_group, num_experts // num_expert_group)
    best = grouped.amax(dim=-1)
    keep = torch.zeros_like(best).scatter_(1, best.topk(topk_group, dim=-1).indices, 1.0)
    return (grouped * keep.unsqueeze(-1)).view(num_tokens, num_experts)


def pool_cap(params: LaserParams, top_k: int) -> int:
    """c, the pool's cap: ``pool_max``, or 2k when it is 0."""
    return params.pool_max or 2 * top_k


def is_peaked(probs: torch.Tensor, top_k: int, eps_high: float, entropy_max: float) -> torch.Tensor:
    """[T] bool: the gate has a clear preference (top-k mass or normalised-entropy test)."""
    mass = probs.topk(top_k, dim=-1).values.sum(dim=-1)
    entropy = -(probs * probs.clamp_min(1e-20).log()).sum(dim=-1)
    return (mass >= eps_high) | (entropy <= entropy_max * math.log(max(probs.shape[-1], 2)))


def candidate_pool(scores: torch.Tensor, top_k: int, params: LaserParams):
    """Top-c candidates (score order) and which of them are in each token's pool; a peaked
    token's pool is its top-k."""
    pool_size = min(max(pool_cap(params, top_k), top_k), scores.shape[-1])
    cand_scores, cand_ids = scores.topk(pool_size, dim=-1)
    is_topk = torch.arange(pool_size, device=scores.device) < top_k
    in_pool = (cand_scores > 0) | is_topk
    if params.mode == "least_loaded":
        return cand_ids, in_pool, torch.ones_like(in_pool[:, 0])
    probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    flat = ~is_peaked(probs, top_k, params.eps_high, params.entropy_max)
    near_best = cand_scores >= (1.0 - params.pool_threshold) * cand_scores[:, :1]
    in_pool = torch.where(flat.unsqueeze(1), in_pool & near_best, is_topk.expand_as(in_pool))
    return cand_ids, in_pool | is_topk, flat


def pick_least_loaded(cand_ids: torch.Tensor, outside: torch.Tensor, load: torch.Tensor,
                      top_k: int) -> torch.Tensor:
    """[T, k] expert ids: the k least-loaded pool members (``outside`` is 0 in the pool, +inf
    elsewhere); a stable sort keeps score order among equal loads."""
    order = torch.sort(load[cand_ids] + outside, dim=-1, stable=True).indices[:, :top_k]
    return cand_ids.gather(1, order)


def token_rounds(num_tokens: int, rounds: int, device: torch.device) -> torch.Tensor:
    """[T] round of each token: ``rounds`` contiguous, near-equal chunks of the pass."""
    return torch.arange(num_tokens, device=device) * rounds // num_tokens


def route_in_rounds(cand_ids: torch.Tensor, in_pool: torch.Tensor, base_load: torch.Tensor,
                    top_k: int, rounds: int) -> torch.Tensor:
    """Least-loaded choice with the load updated between rounds (see the module docstring)."""
    device = cand_ids.device
    outside = torch.zeros(in_pool.shape, device=device).masked_fill(~in_pool, math.inf)
    now = token_rounds(cand_ids.shape[0], rounds, device) == torch.arange(
        rounds, device=device).unsqueeze(1)  # [R, T]
    counted = now.unsqueeze(-1).expand(-1, -1, top_k).reshape(rounds, -1).float()  # [R, T*k]
    load = base_load.float()
    ids = cand_ids[:, :top_k]
    for r in range(rounds):
        chosen = pick_least_loaded(cand_ids, outside, load, top_k)
        ids = torch.where(now[r].unsqueeze(1), chosen, ids)
        if r + 1 < rounds:
            load = load.index_add(0, chosen.reshape(-1), counted[r])
    return ids


def routing_weights(scores: torch.Tensor, ids: torch.Tensor, renormalize: bool,
                    routed_scaling_factor: float = 1.0) -> torch.Tensor:
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights


def laser_route(logits: torch.Tensor, top_k: int, load: torch.Tensor, params: LaserParams, *,
                renormalize: bool = True, scoring_func: str = "softmax",
                routed_scaling_factor: float = 1.0, num_expert_group: int = 0,
                topk_group: int = 0) -> Routing:
    """The full rule on gate logits [T, E] with the current load [E]; see the module docstring."""
    scores = gate_scores(logits, scoring_func)
    if num_expert_group > 1 and topk_group < num_expert_group:
        scores = group_limit(scores, num_expert_group, topk_group)
    cand_ids, in_pool, flat = candidate_pool(scores, top_k, params)
    ids = route_in_rounds(cand_ids, in_pool, load, top_k, params.rounds)
    topk_ids = cand_ids[:, :top_k]
    moved = (ids.sort(dim=-1).values != topk_ids.sort(dim=-1).values).any(dim=-1)
    weights = routing_weights(scores, ids, renormalize, routed_scaling_factor)
    return Routing(weights.float().contiguous(), ids.to(torch.int32).contiguous(), flat, moved)


def laser_topk(logits: torch.Tensor, top_k: int, load: torch.Tensor, params: LaserParams,
               **router) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, ids [T, k] int32), vLLM's ``_compute_routing`` contract."""
    routing = laser_route(logits, top_k, load, params, **router)
    return routing.weights, routing.ids
