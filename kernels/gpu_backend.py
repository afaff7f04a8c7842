"""vLLM GPU attention backend for HACK: the Triton kernel on the packed quantized page.

Paper: HACK (arXiv 2502.03589). Rule: same page layout, planner and write path as the CPU
backend (``engine.py``); attention runs ``hack_attention.hack_attention`` (int8 ``tl.dot`` on
codes). Selected with ``--attention-backend CUSTOM`` plus ``--ext-kv-bits`` 8/4/2 (``vllm-ext
serve`` adds the former on GPUs). Eager only (the host-side planner runs every step): CUDA graphs
are not supported. Not testable on this project's CPU machines.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, MultipleOf
from vllm.v1.kv_cache_layout import KVCacheLayout

from vllm_ext.kernels.engine import HackAttentionImpl, HackBackendMixin, active_ext_config
from vllm_ext.kernels.hack_attention import hack_attention


class HackTritonAttentionImpl(HackAttentionImpl):
    attend = staticmethod(hack_attention)


class HackTritonAttentionBackend(HackBackendMixin, AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(active_ext_config().kv_partition)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple:
        return (KVCacheLayout.LBHNC,)  # a block's [H, N, C] bytes contiguous: records per head

    @staticmethod
    def get_impl_cls():
        return HackTritonAttentionImpl

