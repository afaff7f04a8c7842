"""The scheduler's admin surface: live configuration, state and counters, tool pauses.

Mixed into `vllm_ext.sched.scheduler.PredictiveScheduler` and reached from the API server
through the one method `vllm_ext.engine_rpc` adds to EngineCore. ``ext_apply_config`` swaps
the policy between two steps (`vllm_ext.config.LIVE_FIELDS`); ``ext_get_config`` and
``ext_get_stats`` report it and the counters behind ``/metrics``; ``ext_get_state`` sizes
every per-request structure (the lifetime checks); ``ext_tool_pause`` is the LAMPS tool loop's
call before a tool runs (`vllm_ext.sched.pauses`).
"""
from __future__ import annotations

from vllm.logger import init_logger

from vllm_ext.sched.build import build_policy
from vllm_ext.sched.lamps import LampsPolicy
from vllm_ext.sched.pauses import pause_costs
from vllm_ext.swap.connector import tier_of

logger = init_logger("vllm_ext.sched.scheduler")


class AdminMixin:
    """The ``ext_*`` methods; the attributes they read are set by the scheduler's __init__."""

    def ext_tool_pause(self, session: str, tool: str, predicted_s: float) -> dict:
        """From the tool loop, before the tool runs: keep or free the paused request's KV."""
        lamps = isinstance(self.ext_policy, LampsPolicy)
        done = self.ext_pauses.pause(self, session, tool, float(predicted_s),
                                     "min_waste" if lamps else self.ext_config.tool_handling)
        if lamps and done["handling"] is not None:
            self.ext_policy.tool_users.add(self.ext_pauses.sessions[session])
            now = pause_costs(self, 0, float(predicted_s), tier_of(self))
            self.ext_policy.call_s = now.call_s
            self.ext_policy.batch_tokens = now.batch_tokens
            self.ext_policy.swap_s_per_token = now.swap_s_per_token
        self.ext_dirty = self.ext_waiting_dirty = True
        return done

    def ext_telemetry_report(self, *args) -> dict | None:
        return None if self.ext_telemetry is None else self.ext_telemetry.report(*args)

    def ext_get_config(self) -> dict:
        return {**self.ext_config.to_dict(), "active_policy": self.ext_policy.name,
                "fallback": self.ext_stats.fallback_reason}

    def ext_apply_config(self, live: dict) -> dict:
        """Swap to the live settings `live` (validated by the caller and again here) between
        two steps. The new policy learns the prompts of the requests already here, and the
        predictions they have, so running requests keep their place in its order. Session
        pins are released."""
        config = self.ext_config.with_live_changes(live)
        policy = build_policy(config, self.vllm_config.model_config)
        on_arrival = getattr(policy, "on_arrival", None)
        observe = getattr(policy, "observe", None)
        for req_id, request in self.requests.items():
            if on_arrival is not None:
                on_arrival(req_id, request.prompt_token_ids or [])
            if observe is not None and req_id in self.ext_predictions:
                observe(req_id, self.ext_predictions[req_id], request.num_output_tokens)
        # every change starts session keeping afresh: pins (kept for the old settings) go, so
        # a benchmark block never inherits the blocks a previous config pinned
        self.ext_sessions.reset(self)
        self.ext_config, self.ext_policy = config, policy
        self.ext_waiting_keys = {}
        self.ext_dirty = self.ext_waiting_dirty = True
        logger.info("vllm-ext PredictiveScheduler: live config %s (policy %s)",
                    config.live_dict(), policy.name)
        return self.ext_get_config()

    def ext_get_state(self) -> dict:
        """Sizes of every per-request structure and the free KV blocks (lifetime checks:
        after the engine drains, per_request is all zeros and free_blocks is back)."""
        policy = {f"policy.{k}": len(v) for k, v in vars(self.ext_policy).items()
                  if isinstance(v, (dict, set))}
        return {"requests": len(self.requests),
                "free_blocks": self.kv_cache_manager.block_pool.get_num_free_blocks(),
                "paused_sessions": self.num_waiting_for_streaming_input,
                "swap_stored_blocks": (tier_of(self).stats()["stored_blocks"]
                                       if tier_of(self) is not None else 0),
                # work queued for the workers: true keeps the engine stepping (must drain)
                "swap_pending": tier_of(self) is not None and tier_of(self).has_pending_push_work(),
                # finished turns' blocks pinned for their session's next turn (not free)
                "session_pinned_blocks": self.ext_sessions.to_dict()["pinned_blocks"],
                "per_request": {"predictions": len(self.ext_predictions),
                                "waiting_keys": len(self.ext_waiting_keys),
                                "preempt_context": len(self.ext_returns.context),
                                **self.ext_sessions.sizes(),
                                **self.ext_pauses.sizes(), **policy}}

    def ext_get_stats(self) -> dict:
        tier = tier_of(self)
        tools, swap = self.ext_pauses.to_dict(), tier.stats() if tier is not None else None
        if swap:  # admission counted a load as reused; a failed one was recomputed after all
            failed = min(swap["tokens_failed"], tools["reused_tokens"])
            tools["reused_tokens"] -= failed
            tools["recompute_tokens"] += failed
        return {**self.ext_stats.to_dict(), "policy": self.ext_policy.name,
                "kv_bits": self.ext_config.kv_bits, "step_cost": self.ext_step_cost.to_dict(),
                "tools": tools, "swap": swap, "preempt": self.ext_returns.to_dict(),
                "sessions": self.ext_sessions.to_dict()}
