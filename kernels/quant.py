"""HACK KV quantization format: asymmetric low-bit codes, packed into fixed-size partition records.

Paper: HACK, "Homomorphic Acceleration via Compression of the Key-Value Cache for Disaggregated
LLM Inference" (Zhang et al., arXiv 2502.03589).

Rule (as in ``shared/PAPERS.md``):

* K is quantized **per channel over partitions of Π tokens**: for one partition, channel ``d`` has
  its own ``(scale, min)``; ``k = scale[d] * code + min[d]``.
* V is quantized **per token over groups of** ``V_GROUP`` **channels**:
  ``v = scale[t, g] * code + min[t, g]``.
* Asymmetric: ``scale = (max - min) / (2^b - 1)``, ``code = floor((x - min) / scale + 0.5)``
  clamped to ``[0, 2^b - 1]`` (round to nearest; the paper uses stochastic rounding).
  Scales and mins are stored as fp16, and codes are computed with the stored fp16 values.
* ``b`` in {8, 4, 2}; codes are bit-packed into uint8 along the channel axis (channel ``d`` of a
  token sits in byte ``d // (8/b)`` at bit ``b * (d % (8/b))``).
* Summation elimination: each record caches the integer code sums the homomorphic products need,
  ``ksum[t] = sum_d kcode[t, d]`` and ``vsum[d] = sum_t vcode[t, d]`` (int16).

One sealed partition of one KV head is one record of ``record_bytes`` bytes (fields 16-byte
aligned, total a multiple of ``2 * Π`` so a token costs an even number of bytes in vLLM's page).
The open partition and the 4 sink tokens stay in 16-bit outside the records (``kv_store.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

V_GROUP = 32
SINK_TOKENS = 4
SUPPORTED_BITS = (8, 4, 2)
SUPPORTED_HEAD_SIZES = (32, 64, 128)
SUPPORTED_PARTITIONS = (32, 64, 128)

_FIELDS = ("k_codes", "v_codes", "k_scale", "k_min", "v_scale", "v_min", "k_sum", "v_sum")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class HackLayout:
    """Byte layout of one partition record (one KV head, Π tokens)."""

    bits: int
    head_size: int
    partition: int = 64

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.head_size not in SUPPORTED_HEAD_SIZES:
            raise ValueError(f"head size must be one of {SUPPORTED_HEAD_SIZES}, "
                             f"got {self.head_size}")
        if self.partition not in SUPPORTED_PARTITIONS:
            raise ValueError(f"partition must be one of {SUPPORTED_PARTITIONS}, "
                             f"got {self.partition}")

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    @property
    def row_bytes(self) -> int:
        """Packed bytes of one token's codes (one head)."""
        return self.head_size * self.bits // 8

    @property
    def groups(self) -> int:
        return self.head_size // V_GROUP

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @cached_property
    def sizes(self) -> dict[str, int]:
        P, D, G = self.partition, self.head_size, self.groups
        return {"k_codes": P * self.row_bytes, "v_codes": P * self.row_bytes,
                "k_scale": 2 * D, "k_min": 2 * D, "v_scale": 2 * P * G, "v_min": 2 * P * G,
                "k_sum": 2 * P, "v_sum": 2 * D}

    @cached_property
    def offsets(self) -> dict[str, int]:
        out, pos = {}, 0
        for name in _FIELDS:
            out[name] = pos
            pos = _align(pos + self.sizes[name], 16)
        return out

    @cached_property
    def record_bytes(self) -> int:
        end = self.offsets["v_sum"] + self.sizes["v_sum"]
        return _align(end, 2 * self.partition)

    @property
    def token_bytes(self) -> int:
        """Bytes per (head, token) cell in vLLM's page: what ``customize_spec`` declares."""
        return self.record_bytes // self.partition

    def compression_vs_16bit(self) -> float:
        return 4 * self.head_size / self.token_bytes


# ---- codes ----------------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., D]`` -> packed uint8 ``[..., D * bits / 8]``."""
    f = 8 // bits
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // f, f)
    shifts = torch.arange(f, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """packed uint8 ``[..., B]`` -> uint8 codes ``[..., B * 8 / bits]``."""
    f = 8 // bits
    shifts = torch.arange(f, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * f).to(torch.uint8)


def asym_params(x: torch.Tensor, dim: int, qmax: int, valid: torch.Tensor | None = None):
    """fp16-rounded (scale, min) of ``x`` over ``dim``; ``valid`` masks entries out of the range."""
    x = x.float()
    if valid is None:
        lo, hi = x.amin(dim), x.amax(dim)
    else:
        lo = torch.where(valid, x, float("inf")).amin(dim)
        hi = torch.where(valid, x, float("-inf")).amax(dim)
        empty = ~valid.any(dim)
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    mn = lo.half()
    scale = ((hi - mn.float()) / qmax).half()
    return scale, mn


def quantize(x: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, qmax: int) -> torch.Tensor:
    """Codes of ``x`` for broadcastable fp16 ``scale``/``mn`` (round to nearest, clamped)."""
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.floor((x.float() - mn.float()) / s + 0.5).clamp_(0, qmax).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + mn.float()


# ---- records --------------------------------------------------------------------------------
def encode_records(layout: HackLayout, k: torch.Tensor, v: torch.Tensor,
                   k_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Seal partitions: ``k, v [N, H, Π, D]`` -> records ``uint8 [N, H, record_bytes]``.

    ``k_valid [N, Π]`` (bool) excludes tokens from the K ranges: the 16-bit sink tokens of a
    sequence's first partition and, for an early seal, the tokens not yet written.
    """
    N, H, P, D = k.shape
    L = layout
    kv = None if k_valid is None else k_valid[:, None, :, None].expand(N, H, P, D)
    k_scale, k_min = asym_params(k, 2, L.qmax, kv)                          # [N, H, D]
    k_codes = quantize(k, k_scale[:, :, None], k_min[:, :, None], L.qmax)  # [N, H, P, D]
    vg = v.float().reshape(N, H, P, L.groups, V_GROUP)
    v_scale, v_min = asym_params(vg, 4, L.qmax)                             # [N, H, P, G]
    v_codes = quantize(vg, v_scale[..., None], v_min[..., None], L.qmax).reshape(N, H, P, D)
    fields = {
        "k_codes": pack_codes(k_codes, L.bits), "v_codes": pack_codes(v_codes, L.bits),
        "k_scale": k_scale, "k_min": k_min, "v_scale": v_scale, "v_min": v_min,
        "k_sum": k_codes.to(torch.int32).sum(-1).to(torch.int16),
        "v_sum": v_codes.to(torch.int32).sum(2).to(torch.int16),
    }
    out = torch.zeros(N, H, L.record_bytes, dtype=torch.uint8, device=k.device)
    for name, t in fields.items():
        raw = t.contiguous().reshape(N, H, -1).view(torch.uint8)
        out[:, :, L.offsets[name]:L.offsets[name] + L.sizes[name]] = raw
    return out


def decode_records(layout: HackLayout, records: torch.Tensor) -> dict[str, torch.Tensor]:
    """Records ``[N, H, R]`` -> codes (uint8, unpacked), fp32 scales/mins, int32 code sums."""
    L = layout
    N, H, _ = records.shape
    P, D, G = L.partition, L.head_size, L.groups

    def raw(name, dtype):
        off = L.offsets[name]
        return records[:, :, off:off + L.sizes[name]].contiguous().view(dtype)

    return {
        "k_codes": unpack_codes(raw("k_codes", torch.uint8).reshape(N, H, P, L.row_bytes), L.bits),
        "v_codes": unpack_codes(raw("v_codes", torch.uint8).reshape(N, H, P, L.row_bytes), L.bits),
        "k_scale": raw("k_scale", torch.float16).float(),
        "k_min": raw("k_min", torch.float16).float(),
        "v_scale": raw("v_scale", torch.float16).float().reshape(N, H, P, G),
        "v_min": raw("v_min", torch.float16).float().reshape(N, H, P, G),
        "k_sum": raw("k_sum", torch.int16).int(),
        "v_sum": raw("v_sum", torch.int16).int(),
    }


def dequantize_records(layout: HackLayout, records: torch.Tensor):
    """Records -> fp32 ``k, v [N, H, Π, D]`` (the dequantize-then-attend baseline's input)."""
    f = decode_records(layout, records)
    N, H, P, D = f["k_codes"].shape
    k = dequantize(f["k_codes"], f["k_scale"][:, :, None], f["k_min"][:, :, None])
    vc = f["v_codes"].reshape(N, H, P, layout.groups, V_GROUP)
    v = dequantize(vc, f["v_scale"][..., None], f["v_min"][..., None]).reshape(N, H, P, D)
    return k, v
