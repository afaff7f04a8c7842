"""The embedded default model: a tiny Mixtral-architecture MoE (8 experts, top-2).

vLLM's CPU MoE kernel needs bf16 and dims divisible by 32, and CPU attention supports head
size 32. Until the trained reasoner is shipped in ``vllm_ext/assets/tiny-moe-reasoner``, the
default model is a random-initialised copy of the same architecture, built at first use into
a cache folder (never committed).
"""
from __future__ import annotations

import os
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-moe-reasoner"
# embedded models selectable by name (`vllm-ext serve tiny-moe-finegrained`): name -> folder
MODEL_NAMES = {
    "tiny-moe-reasoner": ASSET_DIR,
    "tiny-moe-finegrained": ASSET_DIR.parent / "tiny-moe-finegrained",  # Qwen2-MoE, 32 experts top-4
    "tiny-moe-reasoner-balanced": ASSET_DIR.parent / "tiny-moe-reasoner-balanced",
}


def tiny_mixtral_config(vocab_size: int, **overrides):
    from transformers import MixtralConfig

    params = dict(
        vocab_size=((vocab_size + 31) // 32) * 32,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    params.update(overrides)
    return MixtralConfig(**params)


def build_random_model(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a random-initialised tiny Mixtral + tokenizer to ``out_dir`` (bf16 safetensors)."""
    import torch
    from transformers import MixtralForCausalLM

    from vllm_ext.testbed.tokenizer import build_tokenizer

    out = Path(out_dir)
    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = MixtralForCausalLM(tiny_mixtral_config(len(tok))).to(torch.bfloat16)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, out) if not out.exists() else None
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("VLLM_EXT_CACHE", Path.home() / ".cache" / "vllm-ext"))


def default_model_path() -> str:
    """The trained reasoner when shipped, else a random tiny MoE built once into the cache."""
    if (ASSET_DIR / "config.json").exists():
        return str(ASSET_DIR)
    path = cache_dir() / "tiny-moe-random"
    if not (path / "config.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_random_model(path)
    return str(path)


def resolve_model(name_or_path: str | None) -> str:
    """An embedded model's folder for its name (``tiny-moe-finegrained``...), the default model
    for None/empty, anything else unchanged (a path or a hub id, for vLLM to resolve)."""
    if not name_or_path:
        return default_model_path()
    if name_or_path == "tiny-moe-reasoner":
        return default_model_path()
    folder = MODEL_NAMES.get(name_or_path)
    if folder is not None and not Path(name_or_path).exists():
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"embedded model {name_or_path!r} is not shipped ({folder})")
        return str(folder)
    return name_or_path
