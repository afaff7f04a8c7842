"""Keys and hash rows for the telemetry sketches (arXiv 2503.13515 and 2409.11516 both assume
independent hash functions; this is the one place they come from).

Rule: every item is first reduced to a 64-bit key (`key_of`: a vLLM block hash is bytes, a
tenant is a string, an expert is a (layer, expert) pair); row ``r`` of a sketch maps a key with
``splitmix64(key ^ seed_r)``. Bucket = the low bits of that value, so a width that is a power
of two folds exactly onto a smaller power of two (``bucket mod w_small`` of the larger
fragment's bucket): fragments of different sizes stay comparable, which is what lets a query
merge them. The sign of Count Sketch comes from bit 63 of a second mix. Everything is
vectorised over numpy ``uint64`` arrays.
"""
from __future__ import annotations

import hashlib

import numpy as np

MASK64 = (1 << 64) - 1
_C1, _C2, _C3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), \
    np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Stafford's splitmix64 finaliser over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _C1
        z = (z ^ (z >> np.uint64(30))) * _C2
        z = (z ^ (z >> np.uint64(27))) * _C3
        return z ^ (z >> np.uint64(31))


def mix64(x: int) -> int:
    """`splitmix64` of one Python int (the per-request path, where numpy's call overhead
    dominates); equal to the array version bit for bit."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def key_of(item) -> int:
    """A 64-bit key: ints as they are (mod 2^64), bytes by their first 8 bytes when they are
    already a hash (vLLM block hashes: sha256 / cbor digests, >= 8 bytes), anything else by
    blake2b of its repr-free encoding."""
    if type(item) is bytes and len(item) >= 16:  # a vLLM block hash: the common case
        return int.from_bytes(item[-8:], "little")
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        return int(item) & MASK64
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        if len(data) >= 16:
            return int.from_bytes(data[-8:], "little")
    elif isinstance(item, str):
        data = item.encode()
    elif isinstance(item, tuple):
        data = "\x1f".join(map(str, item)).encode()
    else:
        data = str(item).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def keys_array(items) -> np.ndarray:
    if isinstance(items, np.ndarray) and items.dtype == np.uint64:
        return items
    return np.fromiter((key_of(i) for i in items), dtype=np.uint64)


def row_seeds(depth: int, seed: int) -> np.ndarray:
    """One seed per row, derived from the sketch seed (equal seeds = mergeable sketches)."""
    base = np.arange(1, depth + 1, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93)
    return splitmix64(base ^ np.uint64(seed & MASK64))


def row_hashes(keys: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """[depth, n] uint64 hashes of `keys` under each row seed."""
    return splitmix64(keys[None, :] ^ seeds[:, None])


def signs(hashes: np.ndarray) -> np.ndarray:
    """+1/-1 per hash (Count Sketch), from a second mix so it is independent of the bucket."""
    return np.where(splitmix64(hashes) >> np.uint64(63), 1, -1).astype(np.int64)
