"""Shared fixtures: a tiny Llama and a word-level tokenizer with a chat template, on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the a is of and to in what how many two three four five plus minus equals yes no "
         "cat dog sky blue red green answer question one six seven eight nine ten").split()

# Assistant content and its end-of-turn token inside {% generation %}: TRL's assistant masks.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<assistant> {% generation %}{{ m['content'] }} </s>{% endgeneration %} "
    "{% else %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>", "<system>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
               tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer, loadable with from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer()
    build_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def conversations(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        q = [WORDS[int(i)] for i in torch.randint(len(WORDS), (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)]
        a = [WORDS[int(i)] for i in torch.randint(len(WORDS), (int(torch.randint(2, 8, (1,), generator=g)),), generator=g)]
        rows.append({"messages": [{"role": "user", "content": " ".join(q)},
                                  {"role": "assistant", "content": " ".join(a)}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", conversations(16))


@pytest.fixture
def preference_file(tmp_path) -> Path:
    rows = []
    for i, r in enumerate(conversations(16, seed=1)):
        prompt, chosen = r["messages"]
        rejected = {"role": "assistant", "content": " ".join(reversed(chosen["content"].split()))}
        rows.append({"prompt": [prompt], "chosen": [chosen], "rejected": [rejected]})
    return write_jsonl(tmp_path / "prefs.jsonl", rows)
