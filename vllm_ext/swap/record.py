"""The swap store's on-disk slot record and its errors (used by `vllm_ext.swap.store`).

Rule (staleness, for the LAMPS swap tier, arXiv 2410.18248): nothing in a slot is trusted
unless this store instance wrote it. A record is a 72-byte header followed by the payload:

    magic "VXSWAP01" | nonce (16 B, random per store open) | blake2b-128 of the key's
    canonical repr | slot index (u64) | payload length (u64) | blake2b-128 checksum over the
    header's first 64 bytes and the payload

`verify_record` checks them in this order: no magic (a never-written or zeroed slot) or a
different nonce (an earlier or other store) -> StaleSlot; wrong slot, key, length or
checksum -> CorruptSlot.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Any, Hashable

from vllm_ext.swap.cuckoo import canonical_key

MAGIC = b"VXSWAP01"
_HEADER = struct.Struct("<8s16s16sQQ16s")  # magic, nonce, key hash, slot, length, checksum
HEADER_BYTES = _HEADER.size


class SwapStoreError(Exception):
    """Base class of the slot store's errors."""


class StoreFull(SwapStoreError):
    pass


class StoreClosed(SwapStoreError):
    pass


class StoreFileMissing(SwapStoreError, FileNotFoundError):
    pass


class PayloadTooLarge(SwapStoreError, ValueError):
    pass


class SlotError(SwapStoreError):
    def __init__(self, slot: int, message: str):
        super().__init__(f"slot {slot}: {message}")
        self.slot = slot


class StaleSlot(SlotError):
    """The slot holds nothing this store instance wrote (never written, or an earlier store)."""


class CorruptSlot(SlotError):
    """The slot's header or payload does not match what this store wrote there."""


def key_digest(key: Hashable) -> bytes:
    return hashlib.blake2b(repr(canonical_key(key)).encode(), digest_size=16).digest()


def as_buffer(payload: Any) -> memoryview:
    """A flat byte view of bytes-like objects, numpy arrays and CPU/GPU torch tensors."""
    if type(payload).__module__.split(".")[0] == "torch":
        import torch
        t = payload.detach().to("cpu").contiguous()
        payload = t.reshape(-1).view(torch.uint8).numpy()
    view = memoryview(payload)
    if not view.c_contiguous:
        raise ValueError("payload must be C-contiguous")
    try:
        return view.cast("B")
    except (TypeError, ValueError):
        return memoryview(view.tobytes())


def _checksum(head: bytes, payload) -> bytes:
    check = hashlib.blake2b(head, digest_size=16)
    check.update(payload)
    return check.digest()


def encode_header(nonce: bytes, slot: int, key: Hashable, payload: memoryview) -> bytes:
    head = _HEADER.pack(MAGIC, nonce, key_digest(key), slot, payload.nbytes, b"")[:-16]
    return head + _checksum(head, payload)


def verify_record(raw: bytes, nonce: bytes, slot: int, key: Hashable, length: int) -> bytes:
    """The payload of `raw` (header + payload read from `slot`), or StaleSlot / CorruptSlot."""
    magic, got_nonce, kd, s, n, check = _HEADER.unpack_from(raw.ljust(HEADER_BYTES, b"\0"))
    if magic != MAGIC:
        raise StaleSlot(slot, "no record written by this store (never written here, or "
                              "left by an earlier store)")
    if got_nonce != nonce:
        raise StaleSlot(slot, "record written by another store instance (stale file)")
    if s != slot:
        raise CorruptSlot(slot, f"header names slot {s}")
    if kd != key_digest(key):
        raise CorruptSlot(slot, f"holds a different key than {key!r}")
    if n != length or len(raw) != HEADER_BYTES + length:
        raise CorruptSlot(slot, f"payload length {n} in header, expected {length}")
    payload = raw[HEADER_BYTES:]
    if _checksum(raw[:HEADER_BYTES - 16], payload) != check:
        raise CorruptSlot(slot, "checksum mismatch")
    return payload
