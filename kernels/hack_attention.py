"""Triton kernel: paged causal attention computed on HACK's quantized KV (decode and prefill).

Paper: HACK (arXiv 2502.03589). Same rule and same arithmetic as ``reference.py`` (read its
docstring first): per sealed partition, ``a = q * k_scale`` and ``b = p * v_scale`` are quantized
to 8 bits on the fly, the products run on integer codes (``tl.dot`` on int8 with int32
accumulation), and the result is corrected with the cached code sums; sink tokens and the open
partition are attended in 16-bit; an online softmax joins the three.

Codes are made signed for the int8 dot: ``a_hat = a' - 128``, ``b_hat = b' - Z`` (``Z = 128`` for
8-bit KV codes, else 0, as ``2^b - 1 <= 127``), and ``sum a'b' = dot(a_hat, b_hat) +
Z * sum(a_hat) + 128 * sum(b')`` where ``sum(b')`` is the cached code sum.

One program = one request x one KV head x ``BLOCK_M`` query rows (row r is query token r // QG
of the head group). ``DOT_FP32`` (constexpr) runs the same dots in fp32 with ieee precision:
exact on integer-valued operands, and what ``TRITON_INTERPRET=1`` needs (the interpreter
mishandles bf16 ``tl.dot``). It is chosen from the device, never from the interpreter itself.

Known inefficiency: the P x V product of each V channel group uses a full-width ``[Π, D]``
operand with the other groups zeroed (``G = D / 32`` dots per partition instead of one batched).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_ext.kernels.kv_store import HackBatch, HackCache
from vllm_ext.kernels.quant import SINK_TOKENS, V_GROUP


@triton.jit
def _codes(ptr, tok, ch, ROW: tl.constexpr, BITS: tl.constexpr):
    """Unpacked codes at broadcast index tensors (token, channel), as int32."""
    F: tl.constexpr = 8 // BITS
    byte = tl.load(ptr + tok * ROW + ch // F).to(tl.int32)
    return (byte >> ((ch % F) * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _q8(x):
    """8-bit asymmetric quantization of each row of ``x [M, K]``: scale, min, codes - 128."""
    lo = tl.min(x, 1)
    s = (tl.max(x, 1) - lo) / 255.0
    safe = tl.where(s > 0, s, 1.0)
    c = tl.minimum(tl.maximum(tl.floor((x - lo[:, None]) / safe[:, None] + 0.5), 0.0), 255.0)
    return s, lo, c - 128.0


@triton.jit
def _code_dot(a_hat, b_hat, DOT_FP32: tl.constexpr):
    """Exact integer product of signed codes ``[M, K] x [K, N]`` as fp32."""
    if DOT_FP32:
        return tl.dot(a_hat, b_hat.to(tl.float32), input_precision="ieee")
    return tl.dot(a_hat.to(tl.int8), b_hat.to(tl.int8)).to(tl.float32)


@triton.jit
def _dense_dot(a, b, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _online(m_i, l_i, acc, s):
    """Online-softmax step: new max, sum, rescaled accumulator and this tile's numerators."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None], p


@triton.jit
def _hack_attn_kernel(
    q_ptr, o_ptr, u8_ptr, f16_ptr, i16_ptr, stage_ptr, sink_ptr,
    bt_ptr, seq_ptr, qsl_ptr, sslot_ptr, kslot_ptr, sm_scale,
    s_qt, s_qh, s_ot, s_oh, s_bt, s_pb, s_ph, s_ss, s_sh, s_ks, s_kh,
    QG: tl.constexpr, D: tl.constexpr, PI: tl.constexpr, BITS: tl.constexpr,
    BS: tl.constexpr, RB: tl.constexpr, ROW: tl.constexpr, G: tl.constexpr,
    VG: tl.constexpr, SINK: tl.constexpr, BLOCK_M: tl.constexpr,
    OFF_KC: tl.constexpr, OFF_VC: tl.constexpr, OFF_KS: tl.constexpr, OFF_KM: tl.constexpr,
    OFF_VS: tl.constexpr, OFF_VM: tl.constexpr, OFF_KSUM: tl.constexpr,
    OFF_VSUM: tl.constexpr, DOT_FP32: tl.constexpr,
):
    req, h, mt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q0 = tl.load(qsl_ptr + req)
    n = tl.load(qsl_ptr + req + 1) - q0
    if mt * BLOCK_M >= n * QG:
        return
    L = tl.load(seq_ptr + req)
    ZB: tl.constexpr = 128 if BITS == 8 else 0
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    rvalid = rows < n * QG
    tok = tl.where(rvalid, rows // QG, 0)
    qpos = L - n + tok
    d = tl.arange(0, D)
    t = tl.arange(0, PI)
    q = tl.load(q_ptr + (q0 + tok)[:, None] * s_qt + (h * QG + rows % QG)[:, None] * s_qh
                + d[None, :], mask=rvalid[:, None], other=0.0).to(tl.float32) * sm_scale
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    ns = L // PI
    sink = tl.load(kslot_ptr + req)
    use_sinks = (sink >= 0) & (ns > 0)

    # 1. sink tokens, 16-bit
    if use_sinks:
        t4 = tl.arange(0, SINK)
        base = sink_ptr + sink.to(tl.int64) * s_ks + h * s_kh
        ks = tl.load(base + t4[:, None] * (2 * D) + d[None, :]).to(tl.float32)
        vs = tl.load(base + t4[:, None] * (2 * D) + D + d[None, :]).to(tl.float32)
        s = tl.sum(q[:, None, :] * ks[None, :, :], 2)
        s = tl.where(rvalid[:, None] & (t4[None, :] <= qpos[:, None]), s, float("-inf"))
        m_i, l_i, acc, p = _online(m_i, l_i, acc, s)
        acc += tl.sum(p[:, :, None] * vs[None, :, :], 1)

    # 2. sealed partitions: homomorphic products on codes
    n_loop = tl.minimum(ns, tl.max(tl.where(rvalid, qpos, 0)) // PI + 1)
    for part in range(0, n_loop):
        blk = tl.load(bt_ptr + req * s_bt + (part * PI) // BS).to(tl.int64)
        rec = blk * s_pb + h * s_ph + ((part * PI) % BS) // PI * RB
        k_hat = _codes(u8_ptr + rec + OFF_KC, t[None, :], d[:, None], ROW, BITS) - ZB  # [D, Π]
        k_scale = tl.load(f16_ptr + (rec + OFF_KS) // 2 + d).to(tl.float32)
        k_min = tl.load(f16_ptr + (rec + OFF_KM) // 2 + d).to(tl.float32)
        k_sum = tl.load(i16_ptr + (rec + OFF_KSUM) // 2 + t).to(tl.float32)
        s_a, m_a, a_hat = _q8(q * k_scale[None, :])
        ak = _code_dot(a_hat, k_hat, DOT_FP32) + ZB * tl.sum(a_hat, 1)[:, None] \
            + 128.0 * k_sum[None, :]
        s = s_a[:, None] * ak + m_a[:, None] * k_sum[None, :] \
            + tl.sum(q * k_min[None, :], 1)[:, None]
        kpos = part * PI + t
        ok = rvalid[:, None] & (kpos[None, :] <= qpos[:, None])
        ok = ok & ~(use_sinks & (kpos[None, :] < SINK))
        m_i, l_i, acc, p = _online(m_i, l_i, acc, tl.where(ok, s, float("-inf")))
        v_sum = tl.load(i16_ptr + (rec + OFF_VSUM) // 2 + d).to(tl.float32)
        for g in tl.static_range(G):
            in_g = (d // VG) == g
            v_scale = tl.load(f16_ptr + (rec + OFF_VS) // 2 + t * G + g).to(tl.float32)
            v_min = tl.load(f16_ptr + (rec + OFF_VM) // 2 + t * G + g).to(tl.float32)
            s_b, m_b, b_hat = _q8(p * v_scale[None, :])
            v_hat = _codes(u8_ptr + rec + OFF_VC, t[:, None], d[None, :], ROW, BITS) - ZB
            v_hat = tl.where(in_g[None, :], v_hat, 0)                                  # [Π, D]
            bv = _code_dot(b_hat, v_hat, DOT_FP32) + ZB * tl.sum(b_hat, 1)[:, None] \
                + 128.0 * v_sum[None, :]
            o = s_b[:, None] * bv + m_b[:, None] * v_sum[None, :] \
                + tl.sum(p * v_min[None, :], 1)[:, None]
            acc += tl.where(in_g[None, :], o, 0.0)

    # 3. the open partition, 16-bit
    slot = tl.load(sslot_ptr + req)
    n_open = L - ns * PI
    if (slot >= 0) & (n_open > 0):
        base = stage_ptr + slot.to(tl.int64) * s_ss + h * s_sh
        live = t < n_open
        k = tl.load(base + t[None, :] * (2 * D) + d[:, None], mask=live[None, :], other=0.0)
        v = tl.load(base + t[:, None] * (2 * D) + D + d[None, :], mask=live[:, None], other=0.0)
        s = _dense_dot(q, k, DOT_FP32)
        ok = rvalid[:, None] & live[None, :] & ((ns * PI + t)[None, :] <= qpos[:, None])
        m_i, l_i, acc, p = _online(m_i, l_i, acc, tl.where(ok, s, float("-inf")))
        acc += _dense_dot(p, v, DOT_FP32)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + (q0 + tok)[:, None] * s_ot + (h * QG + rows % QG)[:, None] * s_oh
             + d[None, :], out.to(o_ptr.dtype.element_ty), mask=rvalid[:, None])


def hack_attention(q: torch.Tensor, cache: HackCache, batch: HackBatch, scale: float,
                   out: torch.Tensor | None = None, dot_fp32: bool | None = None,
                   block_m: int = 16) -> torch.Tensor:
    """Causal attention of ``q [T, Hq, D]`` on the HACK cache; returns ``[T, Hq, D]``.

    ``dot_fp32`` defaults to True off CUDA (the Triton interpreter) and False on GPUs.
    """
    lay = cache.layout
    T, Hq, D = q.shape
    H = cache.pages.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if dot_fp32 is None:
        dot_fp32 = q.device.type != "cuda"
    pages = cache.pages
    assert pages.is_contiguous() and pages.stride(2) == lay.record_bytes
    o = lay.offsets
    qg = Hq // H
    grid = (batch.seq_lens.shape[0], H, triton.cdiv(batch.max_query_len * qg, block_m))
    _hack_attn_kernel[grid](
        q, out, pages, pages.view(torch.float16), pages.view(torch.int16), cache.stage,
        cache.sinks, batch.block_table, batch.seq_lens, batch.query_start_loc,
        batch.stage_slot, batch.sink_slot, float(scale),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), batch.block_table.stride(0),
        pages.stride(0), pages.stride(1), cache.stage.stride(0), cache.stage.stride(1),
        cache.sinks.stride(0), cache.sinks.stride(1),
        QG=qg, D=D, PI=lay.partition, BITS=lay.bits, BS=cache.block_size,
        RB=lay.record_bytes, ROW=lay.row_bytes, G=lay.groups, VG=V_GROUP, SINK=SINK_TOKENS,
        BLOCK_M=block_m, OFF_KC=o["k_codes"], OFF_VC=o["v_codes"], OFF_KS=o["k_scale"],
        OFF_KM=o["k_min"], OFF_VS=o["v_scale"], OFF_VM=o["v_min"], OFF_KSUM=o["k_sum"],
        OFF_VSUM=o["v_sum"], DOT_FP32=dot_fp32,
    )
    return out
