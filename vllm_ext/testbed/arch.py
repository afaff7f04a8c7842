"""Architectures of the embedded testbed models (used by scripts/train_reasoner.py and tests).

* ``mixtral``: the default reasoner, 8 coarse experts, top-2 (``model.tiny_mixtral_config``).
* ``qwen2_moe``: the fine-grained one, Qwen1.5-MoE / Qwen2-MoE style: 32 routed experts of
  width 64, top-4, no renormalisation of the top-k weights (``norm_topk_prob=False``, as in
  Qwen1.5-MoE-A2.7B) and one shared expert (4x a routed expert's width) behind a sigmoid gate.
  Its family's recipe: router aux loss coefficient 0.001 (the Qwen2-MoE config default).

Dims are multiples of 32 (vLLM's CPU MoE kernel) and the head size is 32 (CPU attention).
"""
from __future__ import annotations

ARCHS = ("mixtral", "qwen2_moe")
FINEGRAINED_NAME = "tiny-moe-finegrained"


def tiny_qwen2_moe_config(vocab_size: int, **overrides):
    from transformers import Qwen2MoeConfig

    params = dict(
        vocab_size=((vocab_size + 31) // 32) * 32,
        hidden_size=128,
        intermediate_size=256,  # dense MLP width (unused: every layer is sparse)
        moe_intermediate_size=64,
        shared_expert_intermediate_size=256,
        num_experts=32,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        use_sliding_window=False,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.001,
        torch_dtype="bfloat16",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    params.update(overrides)
    return Qwen2MoeConfig(**params)


def model_class(arch: str):
    if arch == "mixtral":
        from transformers import MixtralForCausalLM
        return MixtralForCausalLM
    if arch == "qwen2_moe":
        from transformers import Qwen2MoeForCausalLM
        return Qwen2MoeForCausalLM
    raise ValueError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHS)})")


def tiny_config(arch: str, vocab_size: int, aux_coef: float | None = None, router_jitter: float = 0.0,
                **overrides):
    """The testbed config of ``arch``; ``aux_coef=None`` keeps the family's default coefficient."""
    if aux_coef is not None:
        overrides["router_aux_loss_coef"] = aux_coef
    if arch == "mixtral":
        from vllm_ext.testbed.model import tiny_mixtral_config
        overrides.setdefault("router_aux_loss_coef", 0.001)
        return tiny_mixtral_config(vocab_size, router_jitter_noise=router_jitter, **overrides)
    if router_jitter:
        raise ValueError(f"--router-jitter is a Mixtral option; {arch} has no router jitter")
    if arch == "qwen2_moe":
        return tiny_qwen2_moe_config(vocab_size, **overrides)
    raise ValueError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHS)})")


def arch_of(config) -> str:
    mt = getattr(config, "model_type", "")
    if mt in ARCHS:
        return mt
    raise ValueError(f"model type {mt!r} is not a testbed architecture")


def build_random(arch: str, out_dir, seed: int = 0, **overrides):
    """Write a random-initialised tiny model of ``arch`` + the byte tokenizer (bf16) to ``out_dir``."""
    import torch

    from vllm_ext.testbed.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = model_class(arch)(tiny_config(arch, len(tok), **overrides)).to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
