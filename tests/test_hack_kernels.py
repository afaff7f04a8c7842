"""HACK attention on quantized KV: Triton kernel (interpreter) vs torch reference vs dense fp32.

Caches are filled through the production write path (``HackPlanner`` + ``apply_writes``) with
ragged lengths, chunked prefill, partial blocks, sink tokens and an open partition.
Tolerances (relative = ||o - dense|| / ||dense||, on K with outlier channels and normal V):

* kernel vs torch reference: max abs <= 1e-5, measured <= 2.2e-6 (same arithmetic, fp32 dots
  in the interpreter); without triton installed only this comparison is skipped;
* reference vs dequantize-then-attend (the error of 8-bit Q and P alone): relative <= 4%;
* reference vs dense: relative <= 4% (8 bits), 16% (4 bits), 50% (2 bits); max abs <= 0.2,
  0.8, 3.0 (outputs are O(1)). Measured on the decode cases: relative 1.9-2.5% / 6.7-8.9% /
  35-43%, of which the 8-bit Q and P contribute 1.6-2.4% (``scripts/bench_hack.py`` for more).
"""
import contextlib
import os
import subprocess
import sys
import tempfile

import pytest
import torch

# Triton decides at @jit time (module import) whether to interpret, so the variable is set
# only around importing the kernel, then restored: engine subprocesses started by later tests
# must not inherit it (the fresh-process path in `kernel` passes it explicitly).
@contextlib.contextmanager
def _interpreting():
    """TRITON_INTERPRET=1 only inside: triton reads it at @jit time and again at launch."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


with _interpreting():
    try:
        from vllm_ext.kernels.hack_attention import hack_attention
        HAS_TRITON = True
    except ImportError:  # no triton: the format and reference tests still run
        HAS_TRITON = False

from vllm_ext.config import ExtConfig, ExtConfigError  # noqa: E402
from vllm_ext.kernels import reference as ref  # noqa: E402
from vllm_ext.kernels.kv_store import HackBatch, HackCache, HackPlanner, apply_writes  # noqa: E402
from vllm_ext.kernels.quant import (HackLayout, dequantize_records, encode_records,  # noqa: E402
                                    pack_codes, unpack_codes)

REL_TOL = {8: 0.04, 4: 0.16, 2: 0.5}
ABS_TOL = {8: 0.2, 4: 0.8, 2: 3.0}
LENS = [1, 3, 60, 64, 65, 131, 200]


def _kv(n, H, D, g):
    scale = 1 + 4 * (torch.arange(D) % 7 == 0)            # outlier channels, as real K have
    k = torch.randn(n, H, D, generator=g) * scale + torch.randn(D, generator=g)
    return k, torch.randn(n, H, D, generator=g)


class Sim:
    """A toy scheduler: steps of (request, tokens) through the planner into a HackCache."""

    def __init__(self, bits, D, H, n_req, bs=128, Pi=64, stage_slots=32, seed=0, max_len=256):
        self.g = torch.Generator().manual_seed(seed)
        self.layout = HackLayout(bits, D, Pi)
        nb = n_req * (max_len // bs + 1) + 1
        self.cache = HackCache.allocate(self.layout, nb + 1, H, bs, stage_slots, 64)
        self.planner = HackPlanner(self.layout, bs, stage_slots, 64)
        perm = torch.randperm(nb, generator=self.g)[:nb - 1] + 1
        self.block_table = perm[:n_req * (max_len // bs + 1)].reshape(n_req, -1).int()
        self.k, self.v = zip(*[_kv(max_len, H, D, self.g) for _ in range(n_req)])
        self.pos = [0] * n_req

    def step(self, sched: dict[int, int]) -> HackBatch:
        reqs = sorted(sched)
        qsl, lens, ks, vs = [0], [], [], []
        for i in reqs:
            a, b = self.pos[i], self.pos[i] + sched[i]
            ks.append(self.k[i][a:b])
            vs.append(self.v[i][a:b])
            self.pos[i] = b
            qsl.append(qsl[-1] + b - a)
            lens.append(b)
        bt = self.block_table[reqs]
        plan, stage, sink = self.planner.plan(qsl, lens, bt)
        apply_writes(self.cache, plan, torch.cat(ks).bfloat16(), torch.cat(vs).bfloat16())
        self.last_plan = plan
        i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
        return HackBatch(i32(qsl), i32(lens), bt, i32(stage), i32(sink), max(sched.values()))

    def dense(self, q, batch, reqs, scale):
        out, qsl = torch.empty(q.shape), batch.query_start_loc.tolist()
        for j, i in enumerate(reqs):
            L = int(batch.seq_lens[j])
            k, v = self.k[i][:L].bfloat16().float(), self.v[i][:L].bfloat16().float()
            out[qsl[j]:qsl[j + 1]] = ref.dense_attention(q[qsl[j]:qsl[j + 1]], k, v, scale)
        return out


_RUNNER = ("import sys, torch; from vllm_ext.kernels.hack_attention import hack_attention; "
           "torch.save(hack_attention(*torch.load(sys.argv[1], weights_only=False)), sys.argv[2])")


def kernel(q, cache, batch, scale, out=None):
    """The Triton kernel, interpreted. If triton was imported earlier in this process without
    the interpreter (e.g. through vllm by another test module), its own @jit helpers cannot be
    interpreted and triton cannot be re-imported: run the kernel in a fresh process instead."""
    import triton.language as tl
    if type(tl.zeros).__name__ == "InterpretedFunction":
        with _interpreting():
            return hack_attention(q, cache, batch, scale, out)
    with tempfile.TemporaryDirectory() as tmp:
        inp, res = os.path.join(tmp, "in.pt"), os.path.join(tmp, "out.pt")
        torch.save((q, cache, batch, scale), inp)
        subprocess.run([sys.executable, "-c", _RUNNER, inp, res], check=True, timeout=300,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
        o = torch.load(res)
    return o if out is None else out.copy_(o)


def _fill(bits, D, H, lens, chunk=None, decode=1, **kw):
    sim = Sim(bits, D, H, len(lens), **kw)
    left = {i: L for i, L in enumerate(lens)}
    while any(left.values()):
        sched = {i: min(n, chunk or n) for i, n in left.items() if n}
        batch = sim.step(sched)
        left = {i: n - sched.get(i, 0) for i, n in left.items()}
    for _ in range(decode):
        batch = sim.step({i: 1 for i in range(len(lens))})
    return sim, batch


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _check(sim, batch, bits, Hq, reqs=None):
    reqs = reqs if reqs is not None else list(range(batch.seq_lens.numel()))
    D = sim.layout.head_size
    q = torch.randn(int(batch.query_start_loc[-1]), Hq, D, generator=sim.g)
    scale = D ** -0.5
    out_ref = ref.hack_attention_ref(q, sim.cache, batch, scale)
    if HAS_TRITON:  # measured <= 2.2e-6 (same arithmetic, fp32 dots in the interpreter)
        out_k = kernel(q, sim.cache, batch, scale)
        assert (out_k - out_ref).abs().max().item() <= 1e-5
    out_dq = ref.dequant_attention(q, sim.cache, batch, scale)
    dense = sim.dense(q, batch, reqs, scale)
    assert _rel(out_ref, out_dq) <= 0.04
    assert _rel(out_ref, dense) <= REL_TOL[bits]
    assert (out_ref - dense).abs().max().item() <= ABS_TOL[bits]
    return out_ref, dense


# ---- format ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_roundtrip(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits), codes)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_records_roundtrip_within_half_a_step(bits):
    lay = HackLayout(bits, 64, 64)
    k, v = _kv(64 * 3, 2, 64, torch.Generator().manual_seed(1))
    k, v = k.reshape(3, 64, 2, 64).transpose(1, 2), v.reshape(3, 64, 2, 64).transpose(1, 2)
    kd, vd = dequantize_records(lay, encode_records(lay, k, v))
    k_step = (k.amax(2) - k.amin(2)) / lay.qmax                     # per (partition, head, ch)
    assert ((kd - k).abs() <= k_step[:, :, None] * 0.51 + 1e-2).all()
    v_step = (v.amax(-1) - v.amin(-1)) / lay.qmax                   # one group of 32 per token
    assert ((vd - v).abs().amax(-1) <= v_step * 0.6 + 1e-2).all()


def test_token_bytes_and_capacity_vs_bf16():
    # bytes per (head, token) cell; bf16 K+V costs 4 * head_size
    assert HackLayout(4, 32, 64).token_bytes == 42           # 3.05x less than 128
    assert HackLayout(2, 128, 64).token_bytes == 94          # 18.4% of bf16 (paper: 17.5-20.9%)
    assert HackLayout(8, 32, 64).compression_vs_16bit() > 1.7


def test_homomorphic_identity_is_exact(monkeypatch):
    """Without the 8-bit quantization of Q and P, the code products equal dequantize+attend."""
    def no_q8(x, dim):
        one = torch.ones_like(x.amin(dim, keepdim=True))
        return one, torch.zeros_like(one), x
    monkeypatch.setattr(ref, "quantize_8bit", no_q8)
    sim, batch = _fill(4, 64, 2, LENS)
    q = torch.randn(len(LENS), 4, 64)
    a = ref.hack_attention_ref(q, sim.cache, batch, 0.125)
    b = ref.dequant_attention(q, sim.cache, batch, 0.125)
    assert (a - b).abs().max().item() < 1e-4


# ---- decode and prefill: kernel vs reference vs dense ----------------------------------------
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_decode(bits, D):
    sim, batch = _fill(bits, D, 2, LENS)
    _check(sim, batch, bits, Hq=4)


@pytest.mark.parametrize("qg", [1, 8])
def test_decode_gqa(qg):
    sim, batch = _fill(4, 64, 2, [5, 70, 190])
    _check(sim, batch, 4, Hq=2 * qg)


@pytest.mark.parametrize("D", [32, 128])
def test_chunked_prefill(D):
    """Last step is a prefill chunk (q_len > 1), not aligned to partitions or blocks."""
    sim, batch = _fill(4, D, 2, [150, 90, 7], chunk=48, decode=0, Pi=32, bs=64)
    assert batch.max_query_len > 1
    _check(sim, batch, 4, Hq=4)


def test_full_prefill_with_sinks_in_sealed_partition():
    sim, batch = _fill(8, 64, 1, [130], decode=0)
    assert int(batch.sink_slot[0]) >= 0
    out, dense = _check(sim, batch, 8, Hq=2)
    # the first query sees only token 0, kept in 16-bit: exact up to bf16
    assert (out[0] - dense[0]).abs().max().item() < 1e-2


# ---- the write path under pressure -------------------------------------------------------------
def test_stage_pool_eviction_seals_early_and_restores():
    """2 staging slots for 5 sequences: the idle open partitions are sealed early and restored
    from their records when their sequence writes again (one extra quantization round)."""
    lens = [20, 40, 70, 100, 130]
    sim = Sim(4, 64, 2, len(lens), stage_slots=2)
    evicted = 0
    for i, n in enumerate(lens):                 # one prefill per step
        sim.step({i: n})
        evicted += sim.last_plan.evict_slot.numel()
    assert evicted == 3
    sim.step({0: 1, 3: 1})                       # 0 is restored from its early seal
    assert sim.last_plan.touch_reopen.tolist() == [20, 0]
    batch = sim.step({0: 1, 2: 1})               # so is 2; 0 continues
    _check(sim, batch, 4, Hq=4, reqs=[0, 2])


def test_reused_block_starts_afresh():
    """Request 1 finishes mid-partition; request 2 gets the same blocks and writes fresh."""
    sim, _ = _fill(4, 32, 2, [100, 1], decode=1)
    sim.block_table[1] = sim.block_table[0]
    sim.k[1].copy_(sim.k[1] * 2 + 1)
    sim.pos[1] = 0
    sim.step({1: 90})
    batch = sim.step({1: 1})
    _check(sim, batch, 4, Hq=2, reqs=[1])


# ---- engine glue (no engine) ----------------------------------------------------------------
def test_backend_selection_is_lazy_and_stock_for_16_bits(monkeypatch):
    import vllm.config

    from vllm_ext.kernels import select

    class Fake:
        additional_config = {"vllm_ext": {"kv_bits": 16}}
    monkeypatch.setattr(vllm.config, "get_current_vllm_config_or_none", lambda: Fake)
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    assert select.CPU_ATTN is CPUAttentionBackend
    with pytest.raises(ExtConfigError, match="--ext-kv-bits"):
        select.CUSTOM  # noqa: B018
    Fake.additional_config = {"vllm_ext": {"kv_bits": 4}}
    from vllm_ext.kernels.cpu_backend import HackCPUAttentionBackend
    assert select.CPU_ATTN is HackCPUAttentionBackend
    Fake.additional_config = {"vllm_ext": {"kv_bits": 3}}
    with pytest.raises(ExtConfigError, match="--ext-kv-bits"):
        select.CPU_ATTN  # noqa: B018


def test_spec_and_errors_name_the_flag(monkeypatch):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_ext.kernels import engine
    monkeypatch.setattr(engine, "active_ext_config", lambda: ExtConfig(kv_bits=4))
    spec = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
    assert engine.hack_customize_spec(spec).page_size_bytes * 3 <= spec.page_size_bytes
    with pytest.raises(ExtConfigError, match="--ext-kv-bits 4: .*head sizes"):
        engine.hack_layout(ExtConfig(kv_bits=4), 80)
    with pytest.raises(ExtConfigError, match="--ext-kv-partition"):
        ExtConfig(kv_bits=4, kv_partition=48)


def test_backend_impls_serve_steps_through_the_vllm_interfaces(monkeypatch):
    """Builder + impl.forward as vLLM calls them, for the CPU impl (torch reference) and the
    GPU impl (Triton kernel, interpreted), each on its own page tensor, against dense."""
    from types import SimpleNamespace

    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_ext.kernels import engine
    from vllm_ext.kernels.cpu_backend import HackCPUAttentionImpl
    from vllm_ext.kernels.gpu_backend import HackTritonAttentionImpl
    ext = ExtConfig(kv_bits=4)
    monkeypatch.setattr(engine, "active_ext_config", lambda: ext)
    monkeypatch.setattr(HackTritonAttentionImpl, "attend", staticmethod(kernel))
    H, Hq, D, bs = 2, 4, 32, 128
    spec = engine.hack_customize_spec(FullAttentionSpec(block_size=bs, num_kv_heads=H,
                                                        head_size=D, dtype=torch.bfloat16))
    cfg = SimpleNamespace(additional_config={"vllm_ext": ext.to_dict()},
                          scheduler_config=SimpleNamespace(max_num_seqs=4))
    builder = engine.HackMetadataBuilder(spec, ["l0"], cfg, torch.device("cpu"))
    impls = [cls(Hq, D, D ** -0.5, H) for cls in (HackCPUAttentionImpl, HackTritonAttentionImpl)]
    caches = [torch.zeros(8, H, bs, spec.state_content_bytes // 2, dtype=torch.bfloat16)
              for _ in impls]
    g = torch.Generator().manual_seed(3)
    ks, vs = _kv(200, H, D, g)
    table = torch.tensor([[1, 2], [5, 6]], dtype=torch.int32)
    for lens, new in (([130, 5], [130, 5]), ([131, 6], [1, 1])):
        qsl = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
        md = builder.build(0, SimpleNamespace(
            num_reqs=2, query_start_loc_cpu=qsl, seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_table_tensor=table, max_query_len=max(new), num_actual_tokens=sum(new)))
        pos = [range(L - n, L) for L, n in zip(lens, new)]
        k = torch.cat([ks[list(p)] * (1 + i) for i, p in enumerate(pos)]).bfloat16()
        v = torch.cat([vs[list(p)] for p in pos]).bfloat16()
        q = torch.randn(sum(new), Hq, D, generator=g).bfloat16()
        outs = [impl.forward(None, q, k, v, c, md, torch.empty_like(q))
                for impl, c in zip(impls, caches)]
    assert (outs[0].float() - outs[1].float()).abs().max().item() < 2e-2
    for i, L in enumerate(lens):
        dense = ref.dense_attention(q[i:i + 1].float(), (ks[:L] * (1 + i)).bfloat16().float(),
                                    vs[:L].bfloat16().float(), D ** -0.5)
        assert _rel(outs[0][i:i + 1].float(), dense) <= REL_TOL[4]
