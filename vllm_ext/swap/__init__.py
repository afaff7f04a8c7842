"""KV swap tier, pure parts: the slot index, the disk calibration and the file-backed slot store.

  cuckoo  bubble-up cuckoo index, key -> slot (Kuszmaul & Mitzenmacher, arXiv 2501.02312)
  disk    MQSSD-style calibration: throughput vs in-flight requests, knee depth (arXiv 2507.06349)
  store   SlotStore: one file of fixed-size slots, bounded in-flight I/O
  record  the slot record (nonce, key, length, checksum) and the store's errors

The engine side (moving vLLM's KV blocks through the connector / offloading interfaces) is
built separately; nothing here imports vLLM or torch.
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
