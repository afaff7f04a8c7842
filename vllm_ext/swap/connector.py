"""`SwapConnector`: the LAMPS swap tier (arXiv 2410.18248) as a vLLM 0.32 KV connector.

LAMPS gives a request paused for an API call three ways to treat its KV: Preserve (keep it),
Discard (free it, recompute on return) or Swap (copy it out, copy it back on return). The
rule here: a request paused under "swap" (`vllm_ext.sched.pauses`) has its *full* computed
blocks saved to the disk tier, keyed by vLLM's block hashes, and then freed like a discard;
when the tool result arrives the request re-enters the waiting queue, vLLM's prefix cache
gives back whatever it still holds, and this connector reports the blocks the tier holds
beyond that local hit, which the worker reads into the newly allocated blocks before the
step's forward. The partial last block (fewer than block_size tokens) is recomputed. A tier
that fails falls back to recompute (per block: vLLM's invalid-block path with
``kv_load_failure_policy = "recompute"``) and, if the store itself is gone, to discard for
every later pause; it never raises into the engine.

Selected with ``--kv-transfer-config '{"kv_connector": "SwapConnector",
"kv_connector_module_path": "vllm_ext.swap.connector", "kv_role": "kv_both",
"kv_load_failure_policy": "recompute"}'``, which ``vllm-ext serve --ext-swap-dir DIR`` adds
itself; the tier's settings (``swap_dir``, ``swap_gib``, ``swap_depth``, ``swap_profile``)
come from the one `ExtConfig` in ``--additional-config``.

vLLM interfaces (``vllm/distributed/kv_transfer/kv_connector/v1/base.py``), as the scheduler
(``vllm/v1/core/sched/scheduler.py``) and model runner
(``vllm/v1/worker/kv_connector_model_runner_mixin.py``, ``gpu_model_runner.execute_model``)
call them in 0.32:
  scheduler  get_num_new_matched_tokens (admission of a request with no computed tokens,
             after the local prefix-cache lookup), update_state_after_alloc (its blocks),
             build_connector_meta (end of every schedule()), update_connector_output (every
             step's worker report), has_pending_push_work (keeps an otherwise idle engine
             stepping until queued saves reach a worker), reset_cache.
  worker     register_kv_caches, handle_preemptions (top of execute_model, before vLLM's
             block zeroing and the forward: saves are copied here), start_load_kv (before the
             forward when the step has synchronous loads: loads), build_connector_worker_meta,
             get_block_ids_with_load_errors, shutdown.
The bookkeeping is `vllm_ext.swap.tier.SwapIndex` (pure), the block I/O
`vllm_ext.swap.kv_io` (on top of `vllm_ext.swap.store.SlotStore`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole,
                                                               KVConnectorWorkerMetadata)

from vllm_ext.config import ExtConfig
from vllm_ext.swap.record import HEADER_BYTES
from vllm_ext.swap.tier import SwapIndex, SwapPlan

logger = logging.getLogger("vllm_ext.swap")

CONNECTOR = "SwapConnector"
MODULE = "vllm_ext.swap.connector"
ALIGN = 4096
# transfer-cost prior (MB/s one way) until a save and a load have been measured, without
# --ext-swap-profile: the order of the O_DIRECT reads measured here (docs/lamps_swap.md)
PRIOR_MB_S = 500.0


def kv_transfer_config() -> dict:
    """The ``--kv-transfer-config`` that selects this connector."""
    return {"kv_connector": CONNECTOR, "kv_connector_module_path": MODULE,
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}


def num_slots(swap_gib: float, block_bytes: int) -> int:
    """Blocks a worker's store holds in `swap_gib` GiB (slot = header + block, 4 KiB aligned)."""
    stride = -(-(HEADER_BYTES + block_bytes) // ALIGN) * ALIGN
    return max(1, int(swap_gib * 2**30) // stride)


@dataclass
class SwapConnectorMetadata(KVConnectorMetadata):
    plan: SwapPlan = field(default_factory=SwapPlan)


@dataclass
class SwapWorkerMeta(KVConnectorWorkerMetadata):
    report: dict = field(default_factory=dict)

    def aggregate(self, other: "SwapWorkerMeta") -> "SwapWorkerMeta":
        a, b = self.report, other.report
        merged = {k: a.get(k, 0) + b.get(k, 0) for k in ("save_bytes", "load_bytes")}
        merged.update({k: max(a.get(k, 0.0), b.get(k, 0.0)) for k in ("save_s", "load_s")})
        merged.update({k: list(a.get(k, [])) + list(b.get(k, []))
                       for k in ("failed_saves", "failed_loads")})
        merged["broken"] = a.get("broken") or b.get("broken") or ""
        return SwapWorkerMeta(merged)


class SwapConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.ext = ExtConfig.from_vllm_config(vllm_config)
        self.index: SwapIndex | None = None     # scheduler side
        self.swapper = None                     # worker side (kv_io.BlockSwapper)
        self._matched: dict[str, tuple[int, int]] = {}
        self._prior_mb_s: float | None = PRIOR_MB_S
        self._max_in_flight = self.ext.swap_depth
        if self.ext.swap_profile:
            self._read_profile(self.ext.swap_profile)
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler(vllm_config, kv_cache_config)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a later recompute

    # ---- scheduler side -------------------------------------------------------------------
    def _init_scheduler(self, vllm_config, kv_cache_config) -> None:
        block_size = vllm_config.cache_config.block_size
        problem = self._unsupported(vllm_config, kv_cache_config)
        block_bytes = 0
        if kv_cache_config is not None and kv_cache_config.num_blocks:
            block_bytes = sum(t.size for t in kv_cache_config.kv_cache_tensors) \
                // kv_cache_config.num_blocks
        capacity = num_slots(self.ext.swap_gib, block_bytes) if block_bytes else 1
        self.index = SwapIndex(capacity, block_size, block_bytes)
        if problem:
            self.index.disable(problem)
            logger.warning("vllm-ext swap tier off: %s (paused requests are discarded)", problem)
        else:
            logger.info("vllm-ext swap tier: %s, %d blocks of %d tokens (%.1f KiB each), "
                        "%d I/Os in flight", self.ext.swap_dir, capacity, block_size,
                        block_bytes / 1024, self._max_in_flight)

    @staticmethod
    def _unsupported(vllm_config, kv_cache_config) -> str:
        if not vllm_config.cache_config.enable_prefix_caching:
            return "prefix caching is off (the tier is keyed by vLLM's block hashes)"
        if kv_cache_config is None or len(kv_cache_config.kv_cache_groups) != 1:
            return "only models with one KV cache group (full attention) are supported"
        from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        if not isinstance(kv_cache_config.kv_cache_groups[0].kv_cache_spec, FullAttentionSpec):
            return "the KV cache group is not full attention"
        block, hashed = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
        if block != hashed or block != vllm_config.cache_config.block_size:
            return f"block hashes of {hashed} tokens differ from blocks of {block}"
        return ""

    @property
    def enabled(self) -> bool:
        return self.index is not None and self.index.enabled

    def swap_out(self, request, block_ids: list[int]) -> int:
        """From `vllm_ext.sched.pauses`, before the paused request's blocks are freed: queue
        the saves of its full computed blocks; returns the tokens the tier holds for it."""
        if not self.enabled:
            return 0
        bs = self.index.block_size
        n = min(request.num_computed_tokens // bs, len(request.block_hashes), len(block_ids))
        return self.index.swap_out(list(request.block_hashes[:n]), block_ids[:n]) * bs

    def save_request(self, kv_cache_manager, request) -> int:
        """`swap_out` of `request`'s blocks as `kv_cache_manager` holds them (a tool pause or
        a preemption, just before vLLM frees them); returns the tokens the tier holds."""
        (block_ids,) = kv_cache_manager.get_block_ids(request.request_id)
        return self.swap_out(request, list(block_ids))

    def save_or_reason(self, kv_cache_manager, request) -> tuple[int, str]:
        """`save_request` that never raises into the engine: (tokens held, why none were)."""
        try:
            held = self.save_request(kv_cache_manager, request)
        except Exception as exc:  # the caller falls back (discard / recompute)
            return 0, f"{type(exc).__name__}: {exc}"
        return held, "" if held else (self.stats().get("disabled_reason")
                                      or "no full block to swap")

    def swap_s_per_token(self) -> float | None:
        return self.index.s_per_token(self._prior_mb_s) if self.index is not None else None

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        if not self.enabled:
            return 0, False
        bs = self.index.block_size
        start = num_computed_tokens // bs
        limit = (request.num_tokens - 1) // bs - start   # vLLM computes >= 1 token itself
        n = self.index.match(request.block_hashes, start, limit) if limit > 0 else 0
        if n:
            self._matched[request.request_id] = (start, n)
        else:
            self._matched.pop(request.request_id, None)
        return n * bs, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        matched = self._matched.pop(request.request_id, None)
        if num_external_tokens <= 0 or matched is None or self.index is None:
            return
        start, n = matched
        n = min(n, num_external_tokens // self.index.block_size)
        block_ids = blocks.get_block_ids()[0]
        self.index.plan_load(list(request.block_hashes[start:start + n]),
                             block_ids[start:start + n])

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return SwapConnectorMetadata(self.index.take_plan() if self.index is not None else SwapPlan())

    def update_connector_output(self, connector_output) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if not isinstance(meta, SwapWorkerMeta) or self.index is None:
            return
        r = meta.report
        if r.get("failed_saves"):
            self.index.forget(r["failed_saves"], failed="save")
        if r.get("failed_loads"):
            self.index.forget(r["failed_loads"], failed="load")
        self.index.observe(r.get("save_s", 0.0), r.get("save_bytes", 0),
                           r.get("load_s", 0.0), r.get("load_bytes", 0))
        if r.get("broken") and self.index.enabled:
            logger.error("vllm-ext swap tier off: a worker's store failed (%s); paused "
                         "requests are discarded from now on", r["broken"])
            self.index.disable(f"worker store failed: {r['broken']}")

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        self._matched.pop(request.request_id, None)
        return False, None

    def has_pending_push_work(self) -> bool:
        return self.index is not None and self.index.has_pending()

    def reset_cache(self) -> bool | None:
        if self.index is not None:
            self.index.reset()
        return True

    def stats(self) -> dict:
        out = self.index.to_dict() if self.index is not None else {"enabled": False}
        out["s_per_token"] = self.swap_s_per_token()
        return out

    # ---- worker side ----------------------------------------------------------------------
    def register_kv_caches(self, kv_caches) -> None:
        from vllm_ext.swap.kv_io import BlockRegions, BlockSwapper, store_path

        try:
            regions = BlockRegions(kv_caches, self._kv_cache_config)
            slots = num_slots(self.ext.swap_gib, regions.block_bytes)
            path = store_path(self.ext.swap_dir, _rank())
            self.swapper = BlockSwapper(regions, path, slots, self._max_in_flight)
            logger.info("vllm-ext swap store %s: %d slots of %d bytes, %d I/Os in flight",
                        path, slots, regions.block_bytes, self._max_in_flight)
        except Exception as exc:  # reported as broken at the first step
            logger.exception("vllm-ext swap: the worker's store could not be set up")
            self.swapper = None
            self._setup_error = f"{type(exc).__name__}: {exc}"

    def handle_preemptions(self, kv_connector_metadata) -> None:
        plan = getattr(kv_connector_metadata, "plan", None)
        if self.swapper is not None and plan is not None:
            self.swapper.run_saves(plan)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        if self.swapper is None:
            return
        meta = self._connector_metadata
        self.swapper.run_loads(getattr(meta, "plan", None))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # saves are taken in handle_preemptions

    def wait_for_save(self) -> None:
        return  # disk writes run off the step; reads of a block wait for its write

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self.swapper is not None:
            return self.swapper.take_failed_blocks()
        return self._failed_without_store()

    def build_connector_worker_meta(self):
        if self.swapper is not None:
            report = self.swapper.collect()
            return SwapWorkerMeta(report) if any(report.values()) else None
        error = getattr(self, "_setup_error", "")
        if self.role == KVConnectorRole.WORKER and error:
            return SwapWorkerMeta({"broken": error, **self._fail_meta()})
        return None

    def shutdown(self) -> None:
        if self.swapper is not None:
            self.swapper.close()
            self.swapper = None

    # ---- internals --------------------------------------------------------------------
    def _read_profile(self, path: str) -> None:
        from vllm_ext.swap.disk import DiskProfile

        try:
            profile = DiskProfile.load(path)
            i = profile.depths.index(profile.chosen_depth)
            self._max_in_flight = profile.chosen_depth
            read, write = profile.read_mb_s[i], profile.write_mb_s[i]
            self._prior_mb_s = 2 / (1 / read + 1 / write) if read > 0 and write > 0 else None
        except Exception:
            logger.exception("vllm-ext swap: disk profile %s unreadable; %d I/Os in flight",
                             path, self._max_in_flight)

    def _failed_without_store(self) -> set[int]:
        """No store (setup failed): every planned load fails, vLLM recomputes those blocks."""
        meta = self._connector_metadata
        plan = getattr(meta, "plan", None)
        return {b for _, b in plan.loads} if plan is not None else set()

    def _fail_meta(self) -> dict:
        plan = getattr(self._connector_metadata, "plan", None)
        if plan is None:
            return {}
        return {"failed_saves": [k for k, _ in plan.saves],
                "failed_loads": [k for k, _ in plan.loads]}


def _rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_world_group
        return get_world_group().rank
    except Exception:
        return 0


def tier_of(scheduler) -> SwapConnector | None:
    """The scheduler's swap connector if the tier is configured, else None."""
    connector = getattr(scheduler, "connector", None)
    return connector if isinstance(connector, SwapConnector) else None

