"""Torch reference of HACK attention on the quantized paged cache, and what it approximates.

Paper: HACK (arXiv 2502.03589). The rule is the homomorphic product: for ``a = s_a a' + m_a`` and
``b = s_b b' + m_b`` constant-scale over a reduction of length n,

    sum(a b) = s_a s_b sum(a' b') + m_b s_a sum(a') + m_a s_b sum(b') + n m_a m_b,

so a matmul runs on integer codes and is corrected with code sums, never dequantizing the cache.
With K per channel and V per token (``quant.py``) the cache's scale varies along each product's
reduction axis, so it is folded into the operand quantized on the fly (Q, or P):

* scores, per sealed partition: ``a = q * k_scale`` (8-bit, over the D channels), then
  ``q.k_t = s_a (a'.kcode_t) + m_a ksum_t + q.k_min`` (the identity with ``b = kcode``).
* output, per sealed partition and V group g: ``b_t = p_t * v_scale[t, g]`` (8-bit, over the Π
  tokens), then ``sum_t p_t v_t = s_b (b'.vcode) + m_b vsum + sum_t p_t v_min[t, g]``.

``p`` is the unnormalised softmax numerator; 8-bit asymmetric quantization is scale-equivariant,
so any running max (as in the Triton kernel) gives the same result. Code products are done as
fp32 matmuls on integer-valued tensors: exact, since every partial sum is below 2^24
(255 * 255 * 128). Sink tokens and the open partition are attended in 16-bit.

Also here: ``dense_attention`` (fp32 on the original K/V) and ``dequant_attention`` (dequantize the
records, then exact attention), the two baselines the tests and ``scripts/bench_hack.py`` use.
"""
from __future__ import annotations

import torch

from vllm_ext.kernels.kv_store import HackBatch, HackCache
from vllm_ext.kernels.quant import SINK_TOKENS, V_GROUP, decode_records, dequantize_records


def quantize_8bit(x: torch.Tensor, dim: int):
    """On-the-fly asymmetric 8-bit quantization in fp32: (scale, min, integer-valued codes)."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    s = (hi - lo) / 255.0
    codes = torch.floor((x - lo) / torch.where(s > 0, s, torch.ones_like(s)) + 0.5).clamp_(0, 255)
    return s, lo, codes


def homomorphic_scores(q: torch.Tensor, f: dict) -> torch.Tensor:
    """``q [H, M, D]`` (scaled) x sealed records ``f`` -> scores ``[N, H, M, Π]``."""
    a = q[None] * f["k_scale"][:, :, None, :]
    s_a, m_a, a_codes = quantize_8bit(a, -1)
    dot = a_codes @ f["k_codes"].float().transpose(-1, -2)
    return s_a * dot + m_a * f["k_sum"].float()[:, :, None, :] + \
        q[None] @ f["k_min"][..., None]


def homomorphic_pv(p: torch.Tensor, f: dict) -> torch.Tensor:
    """Unnormalised probabilities ``p [N, H, M, Π]`` x sealed V -> ``[H, M, D]``."""
    N, H, M, P = p.shape
    G = f["v_scale"].shape[-1]
    b = p[..., None] * f["v_scale"][:, :, None]                       # [N, H, M, Π, G]
    s_b, m_b, b_codes = quantize_8bit(b, 3)                            # [N, H, M, 1, G]
    vc = f["v_codes"].float().reshape(N, H, P, G, V_GROUP)
    dot = torch.einsum("nhmtg,nhtgc->nhmgc", b_codes, vc)
    vsum = f["v_sum"].float().reshape(N, H, 1, G, V_GROUP)
    corr = torch.einsum("nhmt,nhtg->nhmg", p, f["v_min"])
    out = s_b[:, :, :, 0, :, None] * dot + m_b[:, :, :, 0, :, None] * vsum + corr[..., None]
    return out.sum(0).reshape(H, M, G * V_GROUP)


def _request(cache: HackCache, batch: HackBatch, i: int):
    """Sealed records ``[N, H, R]``, open 16-bit ``[H, n_open, 2D]``, sinks or None."""
    Pi, bs = cache.layout.partition, cache.block_size
    L = int(batch.seq_lens[i])
    ns, no = L // Pi, L % Pi
    tok = torch.arange(ns, device=cache.pages.device) * Pi
    blk = batch.block_table[i].long()[tok // bs]
    records = cache.pages[blk, :, (tok % bs) // Pi]
    slot = int(batch.stage_slot[i])
    open_kv = cache.stage[slot, :, :no] if no else cache.stage[:1, :, :0][0]
    sink = int(batch.sink_slot[i])
    sinks = cache.sinks[sink] if (sink >= 0 and ns) else None
    return records, open_kv.float(), None if sinks is None else sinks.float()


def _queries(q: torch.Tensor, H: int, scale: float) -> torch.Tensor:
    """``[n, Hq, D]`` -> ``[H, n * QG, D]``; row r is token r // QG (as in the kernel)."""
    n, Hq, D = q.shape
    return (q.float() * scale).reshape(n, H, Hq // H, D).transpose(0, 1).reshape(H, -1, D)


def _unqueries(o: torch.Tensor, n: int) -> torch.Tensor:
    H, M, D = o.shape
    return o.reshape(H, n, M // n, D).transpose(0, 1).reshape(n, -1, D)


def _softmax_parts(scores: list[torch.Tensor]):
    s = torch.cat(scores, -1)
    m = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m))
    return e.split([x.shape[-1] for x in scores], -1), e.sum(-1, keepdim=True)


def _causal(qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    return kpos[None, :] > qpos[:, None]                              # [M, L]: masked


def hack_attention_ref(q: torch.Tensor, cache: HackCache, batch: HackBatch, scale: float,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of ``q [T, Hq, D]`` on the quantized cache, homomorphic products."""
    H, D, Pi = cache.stage.shape[1], cache.layout.head_size, cache.layout.partition
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device) if out is None else out
    qsl = batch.query_start_loc.tolist()
    for i in range(len(qsl) - 1):
        n = qsl[i + 1] - qsl[i]
        if n == 0:
            continue
        L = int(batch.seq_lens[i])
        records, open_kv, sinks = _request(cache, batch, i)
        qh = _queries(q[qsl[i]:qsl[i + 1]], H, scale)
        qpos = (L - n + torch.arange(qh.shape[1], device=q.device) // (qh.shape[1] // n))
        ns = records.shape[0]
        f = decode_records(cache.layout, records)
        sealed = homomorphic_scores(qh, f).permute(1, 2, 0, 3).reshape(H, qh.shape[1], ns * Pi)
        masked = _causal(qpos, torch.arange(ns * Pi, device=q.device))
        if sinks is not None:
            masked[:, :SINK_TOKENS] = True
        parts = [sealed.masked_fill(masked, float("-inf"))]
        dense_kv = [open_kv] if sinks is None else [sinks, open_kv]
        dense_pos = [torch.arange(ns * Pi, L, device=q.device)]
        if sinks is not None:
            dense_pos.insert(0, torch.arange(SINK_TOKENS, device=q.device))
        for kv, pos in zip(dense_kv, dense_pos):
            parts.append((qh @ kv[..., :D].transpose(-1, -2)).masked_fill(
                _causal(qpos, pos), float("-inf")))
        probs, denom = _softmax_parts(parts)
        p_sealed = probs[0].reshape(H, qh.shape[1], ns, Pi).permute(2, 0, 1, 3)
        o = homomorphic_pv(p_sealed, f) if ns else torch.zeros_like(qh)
        for p, kv in zip(probs[1:], dense_kv):
            o = o + p @ kv[..., D:]
        out[qsl[i]:qsl[i + 1]] = _unqueries(o / denom, n).to(out.dtype)
    return out


def _attend(qh: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos, kpos) -> torch.Tensor:
    s = (qh @ k.transpose(-1, -2)).masked_fill(_causal(qpos, kpos), float("-inf"))
    return torch.softmax(s, -1) @ v


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Exact fp32 causal attention of one request: ``q [n, Hq, D]``, ``k, v [L, H, D]``; the
    queries are the last n positions."""
    n, L, H = q.shape[0], k.shape[0], k.shape[1]
    qh = _queries(q, H, scale)
    qpos = L - n + torch.arange(qh.shape[1], device=q.device) // (qh.shape[1] // n)
    o = _attend(qh, k.float().transpose(0, 1), v.float().transpose(0, 1), qpos,
                torch.arange(L, device=q.device))
    return _unqueries(o, n)


def cache_kv(cache: HackCache, batch: HackBatch, i: int):
    """Request i's cached K/V dequantized to fp32 ``[L, H, D]`` (sinks and open part 16-bit)."""
    D = cache.layout.head_size
    records, open_kv, sinks = _request(cache, batch, i)
    k, v = dequantize_records(cache.layout, records)                 # [N, H, Π, D]
    H = open_kv.shape[0]
    k = torch.cat([k.transpose(0, 1).reshape(H, -1, D), open_kv[..., :D]], 1)
    v = torch.cat([v.transpose(0, 1).reshape(H, -1, D), open_kv[..., D:]], 1)
    if sinks is not None:
        k[:, :SINK_TOKENS], v[:, :SINK_TOKENS] = sinks[..., :D], sinks[..., D:]
    return k.transpose(0, 1), v.transpose(0, 1)


def dequant_attention(q: torch.Tensor, cache: HackCache, batch: HackBatch, scale: float):
    """Baseline: dequantize the cache, then exact attention (same output layout as above)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    qsl = batch.query_start_loc.tolist()
    for i in range(len(qsl) - 1):
        if qsl[i + 1] > qsl[i]:
            k, v = cache_kv(cache, batch, i)
            out[qsl[i]:qsl[i + 1]] = dense_attention(q[qsl[i]:qsl[i + 1]], k, v, scale)
    return out
