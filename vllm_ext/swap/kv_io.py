"""Worker side of the KV swap tier (LAMPS Swap, arXiv 2410.18248): vLLM KV blocks <-> slot store.

`BlockRegions` sees a worker's paged KV cache as byte regions ``[num_blocks, bytes]`` (one per
layer, or per K/V half where a layout puts that outermost), found from vLLM's
`KVCacheConfig.kv_cache_tensors` placement the way vLLM's own SimpleCPUOffloadWorker does
(`vllm/v1/simple_kv_offload/worker.py`). A block's swap payload is its bytes in every region,
concatenated, so the code is the same for the CPU backend's
``[blocks, kv_heads, block_size, 2 * head]`` bf16 cache, a GPU ``[2, blocks, ...]`` cache and
the HACK uint8 caches; on a GPU the gather is copied to host memory before it reaches the disk.

`BlockSwapper` runs one step's plan (`vllm_ext.swap.tier.SwapPlan`) against a `SlotStore`:
deletes; saves: gather the blocks into a host copy at once (the blocks may be reallocated and
overwritten by this very step's forward), then write asynchronously (at most the store's
`max_in_flight` I/Os, the MQSSD knee depth); loads: read (a read of a block whose write is
still in flight waits for that write), verify (nonce + checksum: a slot written by any other
store instance or process is refused), scatter into the new blocks. Failures never raise:
failed keys and block ids are reported to the scheduler (vLLM recomputes those blocks), and a
store that is gone (`StoreFileMissing`, `StoreClosed`, an I/O error at open) marks the tier
broken, which the scheduler turns into discard for every later pause.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future

import torch

from vllm_ext.swap.record import StoreClosed, StoreFileMissing, SwapStoreError
from vllm_ext.swap.store import SlotStore

logger = logging.getLogger("vllm_ext.swap")


class BlockRegions:
    """Byte views ``[num_blocks, nbytes]`` of every distinct KV region of this worker."""

    def __init__(self, kv_caches: dict, kv_cache_config):
        num_blocks = kv_cache_config.num_blocks
        regions: list[torch.Tensor] = []
        seen: set[tuple[str, int]] = set()
        for tensor in kv_cache_config.kv_cache_tensors:
            name = next((n for n in tensor.layers if n in kv_caches), None)
            if name is None:
                continue
            cache = kv_caches[name]
            if isinstance(cache, (list, tuple)):
                raise ValueError(f"KV cache {name} is a list (a Mamba layer): not supported")
            block_bytes = tensor.block_stride
            blocks_span = num_blocks * block_bytes
            if tensor.layer_stride >= blocks_span:      # layer-outermost: region(s) per layer
                start, span = tensor.offset, len(tensor.layers) * tensor.layer_stride
            else:                                       # block-outermost: one packed region
                start, span = 0, blocks_span
            raw = torch.empty(0, dtype=torch.uint8, device=cache.device).set_(
                cache.untyped_storage())
            if raw.numel() < start + span:
                raise ValueError(f"KV cache {name}: storage of {raw.numel()} bytes is smaller "
                                 f"than the {start + span} bytes its placement needs")
            for region in raw[start:start + span].view(-1, num_blocks, block_bytes):
                key = (str(region.device), region.data_ptr())
                if key not in seen:
                    seen.add(key)
                    regions.append(region)
        if not regions:
            raise ValueError("no KV cache regions to swap")
        self.regions = regions
        self.num_blocks = num_blocks
        self.device = regions[0].device
        self.widths = [r.shape[1] for r in regions]
        self.block_bytes = sum(self.widths)

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        """A host-memory copy ``[len(block_ids), block_bytes]`` (uint8) of the blocks."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        parts = [r.index_select(0, index) for r in self.regions]
        out = torch.cat(parts, dim=1)
        return out.cpu() if out.device.type != "cpu" else out

    def scatter(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Write ``data`` ([len(block_ids), block_bytes] uint8, host) into the blocks."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        data = data.to(self.device, non_blocking=False)
        col = 0
        for region, width in zip(self.regions, self.widths):
            region.index_copy_(0, index, data[:, col:col + width])
            col += width


def store_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"vllm-ext-swap-{os.getpid()}-r{rank}.slots")


class BlockSwapper:
    def __init__(self, regions: BlockRegions, path: str, num_slots: int, max_in_flight: int):
        self.regions = regions
        self.store = SlotStore(path, regions.block_bytes, num_slots, max_in_flight)
        self.broken = ""
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._args = (path, regions.block_bytes, num_slots, max_in_flight)
        self._failed_saves: list = []
        self._failed_loads: list = []
        self._failed_blocks: set[int] = set()
        self._save_s = self._load_s = 0.0
        self._save_bytes = self._load_bytes = 0

    # ---- one step's plan: saves before the step's forward, loads after vLLM's zeroing ----
    def run_saves(self, plan) -> None:
        """Deletes and saves (KVConnectorBase_V1.handle_preemptions: before anything of this
        step can write a block the scheduler freed)."""
        if plan is None or not (plan.reset or plan.deletes or plan.saves):
            return
        if self.broken:
            with self._lock:
                self._failed_saves += [k for k, _ in plan.saves]
            return
        try:
            if plan.reset:
                self._reset()
            for key in plan.deletes:
                self.store.delete(key)
            if plan.saves:
                self._save(plan.saves)
        except Exception as exc:  # the store itself failed: nothing more goes through it
            self._break(exc)
            with self._lock:
                self._failed_saves += [k for k, _ in plan.saves]

    def run_loads(self, plan) -> None:
        """Loads (start_load_kv: after vLLM zeroed the new blocks, before the forward)."""
        if plan is None or not plan.loads:
            return
        if self.broken:
            self._fail_loads(plan.loads)
            return
        self._load(plan.loads)

    def _save(self, saves: list) -> None:
        data = self.regions.gather([b for _, b in saves])   # the copy, before any forward
        batch = {"t0": time.perf_counter(), "left": 0, "bytes": 0}
        accepted = []
        for row, (key, _) in enumerate(saves):
            payload = data[row].numpy()
            try:
                fut = self.store.put(key, payload)
            except (StoreFileMissing, StoreClosed):
                raise
            except SwapStoreError as exc:   # full, index full: this block is not swapped
                logger.warning("vllm-ext swap: save of a block refused: %s", exc)
                with self._lock:
                    self._failed_saves.append(key)
                continue
            accepted.append((key, fut, payload.nbytes))
        with self._lock:
            batch["left"] = len(accepted)
        for key, fut, nbytes in accepted:  # the callback may run at once (write done)
            fut.add_done_callback(
                lambda f, k=key, n=nbytes: self._on_saved(batch, k, f, n))

    def _on_saved(self, batch: dict, key, fut: Future, nbytes: int) -> None:
        """A write ended (I/O thread): a batch's time is submit to its last write's end."""
        exc = fut.exception()
        with self._lock:
            if exc is None:
                batch["bytes"] += nbytes
            else:
                self._failed_saves.append(key)
                self._errors.append(exc)
            batch["left"] -= 1
            if batch["left"] == 0:
                self._save_s += time.perf_counter() - batch["t0"]
                self._save_bytes += batch["bytes"]

    def _load(self, loads: list) -> None:
        start = time.perf_counter()
        futures = []
        for key, block_id in loads:
            try:
                futures.append((key, block_id, self.store.get(key)))
            except (KeyError, SwapStoreError) as exc:
                self._note_load_failure(key, block_id, exc)
        ok_ids, rows = [], []
        for key, block_id, fut in futures:
            try:
                payload = fut.result()
            except Exception as exc:  # StaleSlot, CorruptSlot, I/O: recompute this block
                self._note_load_failure(key, block_id, exc)
                if isinstance(exc, (StoreFileMissing, StoreClosed)):
                    self._break(exc)
                continue
            ok_ids.append(block_id)
            rows.append(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        if ok_ids:
            self.regions.scatter(ok_ids, torch.stack(rows))
            with self._lock:
                self._load_bytes += sum(r.numel() for r in rows)
                self._load_s += time.perf_counter() - start

    # ---- reports (once per step, to the scheduler) ------------------------------------
    def collect(self) -> dict:
        """Saves completed and failures since the last call (then reset)."""
        with self._lock:
            errors, self._errors = self._errors, []
            out = {"failed_saves": self._failed_saves, "failed_loads": self._failed_loads,
                   "save_s": self._save_s, "save_bytes": self._save_bytes,
                   "load_s": self._load_s, "load_bytes": self._load_bytes}
            self._failed_saves, self._failed_loads = [], []
            self._save_s = self._load_s = 0.0
            self._save_bytes = self._load_bytes = 0
        for exc in errors:
            logger.warning("vllm-ext swap: a block's write failed: %s", exc)
            if isinstance(exc, (StoreFileMissing, StoreClosed, OSError)):
                self._break(exc)
        out["broken"] = self.broken
        return out

    def take_failed_blocks(self) -> set[int]:
        out, self._failed_blocks = self._failed_blocks, set()
        return out

    def close(self) -> None:
        try:
            self.store.close()
        except Exception:
            logger.exception("vllm-ext swap: closing the store failed")

    # ---- internals --------------------------------------------------------------------
    def _reset(self) -> None:
        """Drop every stored block: a fresh store (new file, new nonce) replaces this one."""
        self.store.close()
        self.store = SlotStore(*self._args)

    def _note_load_failure(self, key, block_id: int, exc: BaseException) -> None:
        logger.warning("vllm-ext swap: loading a block failed (%s: %s); vLLM recomputes it",
                       type(exc).__name__, exc)
        self._fail_loads([(key, block_id)])

    def _fail_loads(self, loads: list) -> None:
        with self._lock:
            for key, block_id in loads:
                self._failed_loads.append(key)
                self._failed_blocks.add(int(block_id))

    def _break(self, exc: BaseException) -> None:
        if not self.broken:
            logger.error("vllm-ext swap: the store failed (%s: %s); the tier is off, paused "
                         "requests are discarded from now on", type(exc).__name__, exc)
            self.broken = f"{type(exc).__name__}: {exc}"
