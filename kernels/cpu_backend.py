"""vLLM CPU attention backend for HACK: vLLM's ``CPU_ATTN`` with a packed quantized page.

Paper: HACK (arXiv 2502.03589). Rule: subclass of vLLM's ``CPUAttentionBackend`` that declares
the packed bytes per (head, token) cell (``customize_spec``), plans and applies the quantized
writes (``engine.py``), and attends with the fused C++ kernel (``cpu_kernel.py``, ``csrc/``): one
call per layer for all requests, homomorphic products on the packed codes in place. If the
kernel cannot be built it falls back to the torch reference (``reference.py``, the oracle);
``VLLM_EXT_HACK_CPU=ref`` selects the reference. Installed by ``select.py`` only for
``--ext-kv-bits`` 8/4/2.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from vllm_ext.kernels import cpu_kernel
from vllm_ext.kernels.engine import HackAttentionImpl, HackBackendMixin


class HackCPUAttentionImpl(HackAttentionImpl):
    attend = staticmethod(cpu_kernel.hack_attention_cpu)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not cpu_kernel.use_reference():
            cpu_kernel.load_extension()  # build (or log the fallback) at model init, not step 1


class HackCPUAttentionBackend(HackBackendMixin, CPUAttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.bfloat16, torch.float16]

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls():
        return HackCPUAttentionImpl

