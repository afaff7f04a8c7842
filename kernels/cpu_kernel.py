"""HACK (arXiv 2502.03589) on CPU: the fused C++ kernel (``csrc/``), JIT-built on first use.

Rule: one extension call per layer attends all requests on the packed records in place (same
arithmetic as ``reference.hack_attention_ref``, which stays the oracle). The extension is built
with ``torch.utils.cpp_extension.load`` into ``$VLLM_EXT_KERNEL_CACHE`` (default
``~/.cache/vllm_ext/torch_extensions``), keyed by a hash of the sources, flags, torch version and
this CPU's ISA flags. If it cannot build (no compiler, no ninja, ...) one warning line is logged
and ``hack_attention_cpu`` runs the torch reference instead.

Attention is a pybind11 call (``csrc/hack_bind.cpp``) on two handles checked once, one per
``HackCache`` and one per ``HackBatch`` (cached by ``id()``, reused while the object holds the
same tensors), so a call costs ~2 us of Python. The writes are a pybind call too
(``write_h``) on the cache handle and a plan handle built once per step (the plan is shared by
the layers); the ``torch.ops`` ``write`` op stays (``write_kernel_op``).

The same extension applies the step's KV writes in place (``write_cpu``, used by
``kv_store.apply_writes`` on CPU tensors; the torch ``apply_writes_ref`` stays the oracle).
``VLLM_EXT_HACK_CPU=ref`` selects the torch reference for both (tests, A/B runs).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import operator
import os
import platform
import threading
import weakref
from pathlib import Path

import torch

from vllm_ext.kernels.kv_store import HackBatch, HackCache
from vllm_ext.kernels.quant import HackLayout
from vllm_ext.kernels.reference import hack_attention_ref

logger = logging.getLogger("vllm_ext")
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("hack_attn.cpp", "hack_write.cpp", "hack_bind.cpp")
HEADERS = ("hack_attn.h", "hack_simd.h", "hack_rowops.h", "hack_lowbit.h", "hack_vnni.h",
           "hack_part.h")
LDFLAGS = ["-fopenmp"]


def cflags() -> list[str]:
    """``-march`` from ``VLLM_EXT_HACK_CPU_MARCH`` (default native; e.g. x86-64 builds the scalar
    path). FP contraction off: the on-the-fly quantization must round as the reference does."""
    march = os.environ.get("VLLM_EXT_HACK_CPU_MARCH", "native")
    return ["-O3", f"-march={march}", "-ffp-contract=off", "-fopenmp", "-std=c++17"]
MAX_SPLITS = 16

_lock = threading.Lock()
_state: dict = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_key() -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(cflags() + LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(_cpu_flags().encode())
    return h.hexdigest()[:12]


def cache_dir() -> Path:
    root = os.environ.get("VLLM_EXT_KERNEL_CACHE") or \
        os.path.join(os.path.expanduser("~"), ".cache", "vllm_ext", "torch_extensions")
    return Path(root)


def _build():
    from torch.utils.cpp_extension import load

    name = f"hack_cpu_{_build_key()}"
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    mod = load(name=name, sources=[str(CSRC / s) for s in SOURCES],
         extra_cflags=cflags() + [f"-DHACK_OPS_NS={name}"], extra_ldflags=LDFLAGS,
         extra_include_paths=[str(CSRC)], build_directory=str(build_dir),
         is_python_module=True, verbose=False)
    mod.write = getattr(torch.ops, name).write  # registered by the same library
    return mod


def load_extension():
    """The compiled module, or None (logged once) if it cannot be built here."""
    with _lock:
        if "ext" not in _state:
            try:
                _state["ext"] = _build()
                logger.info("vllm-ext: HACK CPU kernel loaded (code products: %s)",
                            _state["ext"].isa())
            except Exception as e:  # noqa: BLE001 - any build failure means: use the reference
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                logger.warning("vllm-ext: HACK CPU kernel unavailable (%s: %s); using the torch "
                               "reference (slow)", type(e).__name__, first[:200])
                _state["ext"] = None
        return _state["ext"]


def use_reference() -> bool:
    return os.environ.get("VLLM_EXT_HACK_CPU", "kernel").lower() in ("ref", "reference")


_FIELDS = ("k_codes", "v_codes", "k_scale", "k_min", "v_scale", "v_min", "k_sum", "v_sum")


@functools.lru_cache(maxsize=64)
def _layout_args(layout: HackLayout, block_size: int) -> tuple[list[int], list[int]]:
    o = [layout.offsets[k] for k in _FIELDS]
    base = [layout.bits, layout.head_size, layout.partition, layout.record_bytes]
    return base + [block_size, layout.row_bytes] + o, base + [layout.row_bytes] + o


def layout_args(cache: HackCache) -> list[int]:
    return _layout_args(cache.layout, cache.block_size)[0]


def _i32(t: torch.Tensor) -> torch.Tensor:
    t = t if t.dtype == torch.int32 else t.to(torch.int32)
    return t if t.stride(-1) == 1 else t.contiguous()


def _attn_io(x: torch.Tensor) -> torch.Tensor:
    ok = x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.stride(-1) == 1
    return x if ok else x.float().contiguous()


# Handles (checked once in C++, hack_bind.cpp) per HackCache (one per layer) and per HackBatch
# (one per step), keyed by id() and dropped with their object; valid while the object still
# holds the same tensors (checked by identity on every call).
_CACHE_H: dict[int, tuple] = {}
_BATCH_H: dict[int, tuple] = {}


def _forget(table: dict, key: int):
    return lambda _ref: table.pop(key, None)


def _cache_handle(ext, c: HackCache):
    h = _CACHE_H.get(id(c))
    if h is not None and h[0]() is c and h[1] is ext and h[2] is c.pages and h[3] is c.stage \
            and h[4] is c.sinks and h[5] is c.layout and h[6] == c.block_size:
        return h[7]
    k = id(c)
    handle = ext.CacheH(c.pages, c.stage, c.sinks, layout_args(c))
    _CACHE_H[k] = (weakref.ref(c, _forget(_CACHE_H, k)), ext, c.pages, c.stage, c.sinks,
                   c.layout, c.block_size, handle)
    return handle


def _batch_handle(ext, b: HackBatch):
    h = _BATCH_H.get(id(b))
    if h is not None and h[0]() is b and h[1] is ext and h[2] is b.block_table \
            and h[3] is b.seq_lens and h[4] is b.query_start_loc and h[5] is b.stage_slot \
            and h[6] is b.sink_slot:
        return h[7]
    meta = (b.block_table, b.seq_lens, b.query_start_loc, b.stage_slot, b.sink_slot)
    if not all(t.dtype == torch.int32 and t.stride(-1) == 1 for t in meta):
        return ext.BatchH(*(_i32(t) for t in meta))  # HackBatch promises int32; be lenient
    k = id(b)
    handle = ext.BatchH(*meta)
    _BATCH_H[k] = (weakref.ref(b, _forget(_BATCH_H, k)), ext, *meta, handle)
    return handle


def hack_attention_kernel(ext, q: torch.Tensor, cache: HackCache, batch: HackBatch, scale: float,
                          out: torch.Tensor | None = None,
                          max_splits: int = MAX_SPLITS) -> torch.Tensor:
    """The extension's attention; ``out`` (fp32/bf16/fp16, any row strides) is written in place
    (the kernel reads q and writes out in their own dtypes) and returned."""
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    ch, bh = _cache_handle(ext, cache), _batch_handle(ext, batch)
    if ext.attention(q, out, ch, bh, scale, max_splits):
        return out
    o = _attn_io(out)  # an odd dtype or layout: convert, then copy back
    if not ext.attention(_attn_io(q), o, ch, bh, scale, max_splits):
        raise RuntimeError("hack_cpu.attention: q/out must be [T, Hq, D] CPU tensors")
    if o is not out:
        out.copy_(o)
    return out


# The last step's plan handle (a step's plan is shared by all layers): (plan, ext, its field
# tensors, handle, token count). Reused while it is the same plan holding the same tensors.
_PLAN_H: list = [None] * 5


def _plan_handle(ext, plan):
    """(PlanH, token count) for ``plan``, built once per step."""
    c = _PLAN_H
    fields = tuple(plan.__dict__.values())  # int64 views of one tensor (kv_plan / _plan_tensors)
    if c[0] is plan and c[1] is ext and all(map(operator.is_, fields, c[2])):
        return c[3], c[4]
    try:
        handle = ext.PlanH(list(fields))
    except RuntimeError as e:  # a plan built elsewhere (bool / non-contiguous fields)
        if "int64 plan tensors" not in str(e):
            raise
        handle = ext.PlanH([t.long().contiguous() for t in fields])
    c[:] = plan, ext, fields, handle, plan.tok_touch.numel()
    return handle, c[4]


def write_kernel(ext, cache: HackCache, plan, key: torch.Tensor, value: torch.Tensor) -> None:
    """The extension's ``apply_writes``: same bytes in pages / staging / sinks, in place. One
    pybind call on the layer's cache handle and the step's plan handle (key / value rows past
    the plan's tokens are not read, so they are not sliced off)."""
    ph, n = _plan_handle(ext, plan)
    dt = cache.stage.dtype
    if key.dtype != dt or value.dtype != dt or key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = (x[:n].to(dt).contiguous() for x in (key, value))
    ext.write_h(_cache_handle(ext, cache), ph, key, value)


def write_kernel_op(ext, cache: HackCache, plan, key: torch.Tensor, value: torch.Tensor) -> None:
    """The same write through the ``torch.ops`` op (17 tensors + 13 ints parsed per call); kept
    for A/B timing and as a second route in the tests."""
    n = plan.tok_touch.numel()
    key, value = (x if x.shape[0] == n else x[:n] for x in (key, value))
    if key.dtype != cache.stage.dtype or value.dtype != cache.stage.dtype:
        key, value = key.to(cache.stage.dtype), value.to(cache.stage.dtype)
    key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (key, value))
    tensors = list(plan.__dict__.values())  # int64 views of one tensor (_plan_tensors)
    args = _layout_args(cache.layout, cache.block_size)[1]
    try:
        ext.write(cache.pages, cache.stage, cache.sinks, key, value, tensors, args)
    except RuntimeError as e:  # a plan built elsewhere (bool / non-contiguous fields)
        if "int64 plan tensors" not in str(e):
            raise
        tensors = [t.long().contiguous() for t in tensors]
        ext.write(cache.pages, cache.stage, cache.sinks, key, value, tensors, args)


def write_cpu(cache: HackCache, plan, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Apply the step's writes with the extension; False if it is off or unavailable."""
    if cache.pages.device.type != "cpu" or use_reference():
        return False
    ext = _state.get("ext") or load_extension()  # no lock once built
    if ext is None:
        return False
    write_kernel(ext, cache, plan, key, value)
    return True


def hack_attention_cpu(q: torch.Tensor, cache: HackCache, batch: HackBatch, scale: float,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """HACK attention on CPU: the fused kernel, else (no compiler / ``ref``) the torch reference."""
    ext = None if use_reference() else (_state.get("ext") or load_extension())
    if ext is None:
        return hack_attention_ref(q, cache, batch, scale, out)
    return hack_attention_kernel(ext, q, cache, batch, scale, out)
