"""vLLM CPU attention backend for HACK: vLLM's ``CPU_ATTN`` with a packed quantized page.

Paper: HACK (arXiv 2502.03589). Rule: subclass of vLLM's ``CPUAttentionBackend`` that declares
the packed bytes per (head, token) cell (``customize_spec``), plans and applies the quantized
writes (``engine.py``), and attends with the torch reference (``reference.py``), which computes
the homomorphic products on codes. Installed by ``select.py`` only for ``--ext-kv-bits`` 8/4/2.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

from vllm_ext.kernels.engine import HackAttentionImpl, HackBackendMixin
from vllm_ext.kernels.reference import hack_attention_ref


class HackCPUAttentionImpl(HackAttentionImpl):
    attend = staticmethod(hack_attention_ref)


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

