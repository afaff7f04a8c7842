"""What a preempted request costs on its return, and the swap tier for its KV (LAMPS Swap,
arXiv 2410.18248, offered to TRAIL's victims: ``--ext-preempt-mode swap|recompute``).

vLLM 0.32 preempts by recompute: ``Scheduler._preempt_request`` frees the victim's blocks and
resets ``num_computed_tokens`` to 0; on its return the prefix cache gives back the full blocks
nobody has evicted since, and the rest is prefilled again. With ``preempt_mode = "swap"`` (and
the tier on: ``--ext-swap-dir``) the victim's full computed blocks are first handed to the
swap tier (`vllm_ext.swap.connector.SwapConnector.save_request`), exactly as a tool pause under
"swap" does; on its return the connector reports the blocks the tier holds beyond the local
prefix-cache hit and the worker loads them before the forward. A tier that is off or fails
leaves plain recompute (logged once).

Either way, the return is measured: the victim's context at preemption minus the tokens vLLM
found computed when it was scheduled again (prefix cache + tier) is what it re-prefilled
(``recompute_tokens``), the rest ``reused_tokens``; both go to ``/metrics``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger("vllm_ext.swap")



@dataclass
class PreemptReturns:
    context: dict[str, int] = field(default_factory=dict)  # victim id -> tokens at preemption
    swapped: int = 0              # preemptions whose blocks the tier took
    swapped_tokens: int = 0       # ... tokens it held for them
    recompute_tokens: int = 0     # context re-prefilled on return
    reused_tokens: int = 0        # context found computed on return (prefix cache + tier)
    fallback_logged: bool = False

    def on_preempt(self, sched, request, mode: str, tier) -> None:
        """Before vLLM frees the victim's blocks: remember its context; under swap, save."""
        self.context[request.request_id] = request.num_computed_tokens
        if mode != "swap":
            return
        held, why = save_or_reason(tier, sched, request)
        if held:
            self.swapped += 1
            self.swapped_tokens += held
        elif not self.fallback_logged and why != "no full block to swap":
            logger.warning("vllm-ext: --ext-preempt-mode swap falls back to recompute: %s", why)
            self.fallback_logged = True

    def after_schedule(self, output) -> None:
        """Victims scheduled again in `output` (new or resumed, by vLLM's runner kind)."""
        if self.context:
            reused, recomputed = count_returns(self.context, output)
            self.reused_tokens += reused
            self.recompute_tokens += recomputed

    def forget(self, req_id: str) -> None:
        self.context.pop(req_id, None)

    def to_dict(self) -> dict:
        return {"swapped": self.swapped, "swapped_tokens": self.swapped_tokens,
                "recompute_tokens": self.recompute_tokens, "reused_tokens": self.reused_tokens}


def save_or_reason(tier, sched, request) -> tuple[int, str]:
    """Hand `request`'s blocks to `tier` before vLLM frees them: (tokens held, why none were).
    Shared by a swapped tool pause and a swapped preemption; never raises."""
    if tier is None:
        return 0, "the swap tier is off (--ext-swap-dir)"
    return tier.save_or_reason(sched.kv_cache_manager, request)


def count_returns(context: dict[str, int], output) -> tuple[int, int]:
    """Pop every request of `context` (id -> tokens it had) that `output` schedules again
    from the waiting queue; returns (tokens found computed, tokens re-prefilled)."""
    reused = recomputed = 0
    for req_id, computed in _returned(output):
        had = context.pop(req_id, None)
        if had is not None:
            found = min(had, computed)
            reused, recomputed = reused + found, recomputed + had - found
    return reused, recomputed


def _returned(output):
    """(request id, computed tokens found at admission) of every request in `output` that
    starts from the waiting queue: new requests, and those vLLM lists as resumed."""
    for new in output.scheduled_new_reqs:
        yield new.req_id, new.num_computed_tokens
    cached = output.scheduled_cached_reqs
    resumed = getattr(cached, "resumed_req_ids", None) or ()
    for i, req_id in enumerate(cached.req_ids):
        if req_id in resumed:
            yield req_id, cached.num_computed_tokens[i]
