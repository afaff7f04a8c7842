"""Byte-level tokenizer built locally with `tokenizers` (no hub download).

Every byte is one token (256 symbols), plus a few special and marker tokens, so any text
round-trips exactly. The chat template renders ``<|role|>content\\n`` turns and ends with
``<|assistant|>`` when a generation prompt is asked for.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
MARKER_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<call>", "</call>", "<result>", "</result>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Return the project's byte-level tokenizer (deterministic: same ids on every machine)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.add_tokens(MARKER_TOKENS, special_tokens=False)
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 2048
    return tok
