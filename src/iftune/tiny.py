"""Models and tokenizers built from numbers, never downloaded: the tests' tiny Llama, the
benchmark's models (tiny or at a real architecture's shape) and their word-level tokenizers.

A word-level tokenizer maps each whitespace-separated word to one id, so text of n words is
exactly n tokens; the special tokens come first (`<pad>` 0, `<s>` 1, `</s>` 2, `<unk>` 3).
"""

from __future__ import annotations

from collections.abc import Sequence

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>", "<system>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# Llama's tiny defaults (the tests'): two layers, grouped-query attention, untied head.
TINY_LLAMA = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


# A tiny mixture of experts (Qwen3-MoE or Mixtral): 4 experts, 2 per token, on `TINY_LLAMA`'s
# shapes; each family reads its own name of the expert count.
TINY_MOE = dict(
    TINY_LLAMA,
    head_dim=8,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
)


def word_tokenizer(words: Sequence[str], chat_template: str | None = None):
    """A `PreTrainedTokenizerFast` over `SPECIALS` then `words` (ids in that order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def numbered_words(vocab_size: int) -> list[str]:
    """The words `t<id>` for every id after the special tokens, up to `vocab_size`."""
    return [f"t{i}" for i in range(len(SPECIALS), vocab_size)]


def numbered_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` ids whose words are `t<id>`."""
    if vocab_size <= len(SPECIALS):
        raise ValueError(f"vocab_size={vocab_size} leaves no word after the {len(SPECIALS)} special tokens")
    return word_tokenizer(numbered_words(vocab_size))


def llama(vocab_size: int, seed: int = 0, **overrides):
    """A `LlamaForCausalLM` with random weights (seeded): `TINY_LLAMA` unless overridden."""
    return causal_lm("llama", vocab_size, seed, **{**TINY_LLAMA, **overrides})


def moe(architecture: str, vocab_size: int, seed: int = 0, **overrides):
    """A tiny mixture-of-experts LM ("qwen3_moe" or "mixtral"): `TINY_MOE` unless overridden."""
    return causal_lm(architecture, vocab_size, seed, **{**TINY_MOE, **overrides})


def causal_lm(architecture: str, vocab_size: int, seed: int = 0, **config):
    """A causal LM of `architecture` ("llama", "qwen2", "qwen3_moe" or "mixtral") with random
    weights (seeded), float32. `config`: the architecture's config fields; the special-token ids
    default to `SPECIALS`'."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
        "mixtral": (MixtralConfig, MixtralForCausalLM),
    }
    if architecture not in classes:
        raise ValueError(f"architecture={architecture!r}; expected one of {', '.join(classes)}")
    config_cls, model_cls = classes[architecture]
    torch.manual_seed(seed)
    ids = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    cfg = config_cls(vocab_size=vocab_size, **{**ids, **config})
    return model_cls(cfg).to(torch.float32)


__all__ = [
    "EOS_ID",
    "PAD_ID",
    "SPECIALS",
    "TINY_LLAMA",
    "TINY_MOE",
    "causal_lm",
    "llama",
    "moe",
    "numbered_tokenizer",
    "numbered_words",
    "word_tokenizer",
]
