"""vLLM glue shared by the CPU and GPU HACK backends: page spec, metadata builder, impl.

Paper: HACK (arXiv 2502.03589). Rule: vLLM keeps allocating and scheduling pages as usual; a page
of ``block_size`` tokens holds ``block_size / Π`` sealed partition records per KV head, so a token
costs ``HackLayout.token_bytes`` per head instead of ``4 * head_size`` (declared to vLLM through
``customize_spec``, hence the larger KV capacity in tokens). The impl views the page as uint8.

Per step: the builder (host, once per attention group) plans the writes with ``HackPlanner``;
each layer's impl applies them to its own cache (``apply_writes``), then attends with the
backend's ``attend`` function (torch reference on CPU, Triton kernel on GPU). The 16-bit staging
and sink pools live beside vLLM's pages (sized from ``max_num_seqs``, not counted in vLLM's KV
budget).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionImpl, AttentionMetadataBuilder, AttentionType

from vllm_ext.config import ExtConfig, ExtConfigError
from vllm_ext.kernels.kv_store import HackBatch, HackCache, HackPlanner, WritePlan, apply_writes
from vllm_ext.kernels.quant import SINK_TOKENS, SUPPORTED_HEAD_SIZES, HackLayout


def active_ext_config() -> ExtConfig:
    """The engine's ExtConfig (from the current vLLM config, else the one seen at selection)."""
    from vllm_ext.kernels import select

    return select.active_ext_config()


def hack_layout(ext: ExtConfig, head_size: int) -> HackLayout:
    """The layout for this engine, or a start-up error naming the flag."""
    if ext.kv_bits == 16:
        raise ExtConfigError("--ext-kv-bits: the HACK backend needs 8, 4 or 2 bits, got 16")
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise ExtConfigError(
            f"--ext-kv-bits {ext.kv_bits}: HACK attention supports head sizes "
            f"{', '.join(map(str, SUPPORTED_HEAD_SIZES))}; this model has {head_size}")
    return HackLayout(ext.kv_bits, head_size, ext.kv_partition)


def hack_customize_spec(spec):
    """Declare the packed bytes per (head, token) cell of vLLM's page."""
    layout = hack_layout(active_ext_config(), spec.head_size)
    return replace(spec, state_content_bytes=layout.token_bytes)


class HackBackendMixin:
    """What the CPU and the Triton HACK backends declare alike (put before vLLM's base)."""

    forward_includes_kv_cache_update: bool = True
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def customize_spec(cls, spec):
        return hack_customize_spec(spec)

    @staticmethod
    def get_builder_cls():
        return HackMetadataBuilder


@dataclass
class HackMetadata:
    num_actual_tokens: int
    batch: HackBatch
    plan: WritePlan
    stage_slots: int
    sink_slots: int


class HackMetadataBuilder(AttentionMetadataBuilder[HackMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        ext = ExtConfig.from_vllm_config(vllm_config)
        self.layout = hack_layout(ext, kv_cache_spec.head_size)
        bs = kv_cache_spec.block_size
        if bs % ext.kv_partition:
            raise ExtConfigError(f"--ext-kv-partition {ext.kv_partition} must divide the KV "
                                 f"block size ({bs}; set --block-size)")
        n = vllm_config.scheduler_config.max_num_seqs
        self.stage_slots, self.sink_slots = n + 8, 2 * n + 16
        self.planner = HackPlanner(self.layout, bs, self.stage_slots, self.sink_slots)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cm, dev = common_attn_metadata, self.device
        R = cm.num_reqs
        qsl = cm.query_start_loc_cpu[:R + 1]
        seq_lens = cm.seq_lens[:R].cpu()
        block_table = cm.block_table_tensor[:R]
        plan, stage, sink = self.planner.plan(qsl.tolist(), seq_lens.tolist(),
                                              block_table.cpu())
        batch = HackBatch(
            query_start_loc=qsl.to(dev, torch.int32), seq_lens=seq_lens.to(dev, torch.int32),
            block_table=block_table.to(torch.int32),
            stage_slot=torch.tensor(stage, dtype=torch.int32, device=dev),
            sink_slot=torch.tensor(sink, dtype=torch.int32, device=dev),
            max_query_len=cm.max_query_len)
        return HackMetadata(cm.num_actual_tokens, batch, plan, self.stage_slots, self.sink_slots)


class HackAttentionImpl(AttentionImpl):
    """Writes the step's K/V into the HACK cache, then ``attend`` (set by the backend)."""

    attend = None  # (q, cache, batch, scale, out) -> out

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes=None,
                 sliding_window=None, kv_cache_dtype="auto", logits_soft_cap=None,
                 attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None, **kwargs):
        ext = active_ext_config()
        self.layout = hack_layout(ext, head_size)
        unsupported = {
            "sliding window": sliding_window is not None, "ALiBi": alibi_slopes is not None,
            "logits soft cap": bool(logits_soft_cap), "attention sinks": sinks is not None,
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
            "KV sharing": kv_sharing_target_layer_name is not None,
            f"--kv-cache-dtype {kv_cache_dtype}": kv_cache_dtype != "auto",
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ExtConfigError(f"--ext-kv-bits {ext.kv_bits}: HACK attention does not "
                                 f"support {', '.join(bad)}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads, self.kv_cache_dtype = num_kv_heads, kv_cache_dtype
        self.attn_type, self.sliding_window = attn_type, -1
        self.kv_sharing_target_layer_name = None
        self._cache: HackCache | None = None

    def _hack_cache(self, kv_cache: torch.Tensor, md: HackMetadata, dtype) -> HackCache:
        c = self._cache
        bs = kv_cache.shape[2]
        if c is None or c.pages.data_ptr() != kv_cache.data_ptr():
            pages = HackCache.page_view(kv_cache, self.layout, bs)
            H, P, D = self.num_kv_heads, self.layout.partition, self.head_size
            if c is None:
                stage = torch.zeros(md.stage_slots, H, P, 2 * D, dtype=dtype, device=pages.device)
                sinks = torch.zeros(md.sink_slots, H, SINK_TOKENS, 2 * D, dtype=dtype,
                                    device=pages.device)
            else:
                stage, sinks = c.stage, c.sinks
            self._cache = c = HackCache(self.layout, bs, pages, stage, sinks)
        return c

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None,
                output_scale=None, output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by HACK")
        if attn_metadata is None or kv_cache.numel() == 0:
            return output
        md: HackMetadata = attn_metadata
        cache = self._hack_cache(kv_cache, md, key.dtype)
        apply_writes(cache, md.plan, key, value)
        n = md.num_actual_tokens
        type(self).attend(query[:n], cache, md.batch, self.scale, output[:n])
        return output
