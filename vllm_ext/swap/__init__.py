"""KV swap tier for requests paused on a tool call (LAMPS Swap, arXiv 2410.18248).

Pure parts (no vLLM, no torch; imported here):
  cuckoo  bubble-up cuckoo index, key -> slot (Kuszmaul & Mitzenmacher, arXiv 2501.02312)
  disk    MQSSD-style calibration: throughput vs in-flight requests, knee depth (arXiv 2507.06349)
  store   SlotStore: one file of fixed-size slots, bounded in-flight I/O
  record  the slot record (nonce, key, length, checksum) and the store's errors
  tier    SwapIndex: the scheduler's bookkeeping of the tier (keys, LRU, each step's plan)
Engine side (imported on demand): `connector` (SwapConnector, vLLM's KVConnectorBase_V1,
selected by ``--ext-swap-dir``) and `kv_io` (the workers' block gather/scatter, torch).
"""
from vllm_ext.swap.cuckoo import CuckooIndex, CuckooStats, IndexFull, choices_for
from vllm_ext.swap.record import (CorruptSlot, PayloadTooLarge, SlotError, StaleSlot,
                                 StoreClosed, StoreFileMissing, StoreFull, SwapStoreError)
from vllm_ext.swap.store import SlotStore

_DISK = ("DiskProfile", "calibrate", "knee_depth")


def __getattr__(name: str):
    # lazy, so `python -m vllm_ext.swap.disk` does not find the module imported already
    if name in _DISK:
        from vllm_ext.swap import disk
        return getattr(disk, name)
    raise AttributeError(name)


__all__ = [
    "CuckooIndex", "CuckooStats", "IndexFull", "choices_for",
    "DiskProfile", "calibrate", "knee_depth",
    "SlotStore", "SwapStoreError", "StoreFull", "StoreClosed", "StoreFileMissing",
    "PayloadTooLarge", "SlotError", "StaleSlot", "CorruptSlot",
]
