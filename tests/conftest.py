"""Shared fixtures: a tiny Llama and a word-level tokenizer with a chat template, on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iftune.tiny import llama, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# `accelerate launch` of two CPU processes over gloo (DDP); the program and its arguments follow.
ACCELERATE_TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--dynamo_backend", "no"]  # fmt: skip


def run_offline(args: list[str], env_extra: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`args` as a subprocess with this checkout's `src` on the path, one thread each, offline;
    with `check`, a non-zero exit fails the test with the end of its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", **(env_extra or {})}  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=400)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[:4]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a is of and to in what how many two three four five plus minus equals yes no "
    "cat dog sky blue red green answer question one six seven eight nine ten"
).split()

# Assistant content and its end-of-turn token inside {% generation %}: TRL's assistant masks.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<assistant> {% generation %}{{ m['content'] }} </s>{% endgeneration %} "
    "{% else %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)


def build_tokenizer():
    """The tests' word-level tokenizer over `WORDS`, with the chat template."""
    return word_tokenizer(WORDS, CHAT_TEMPLATE)


def build_model(vocab_size: int, seed: int = 0, **overrides):
    """The tests' tiny Llama (`iftune.tiny.TINY_LLAMA` unless overridden)."""
    return llama(vocab_size, seed, **overrides)


# IFTConfig settings of an in-process test run on the CPU (the tests override what they vary).
CPU = dict(
    use_cpu=True,
    bf16=False,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
    dataloader_num_workers=0,
    logging_steps=1,
)


def make_trainer(tmp_path, model=None, rows=None, **overrides):
    """An `IFTTrainer` of the tiny Llama (or `model`) on `rows` (default: 8 conversations), one
    step, `CPU` settings unless overridden."""
    from datasets import Dataset

    from iftune.trainer import IFTConfig, IFTTrainer

    tok = build_tokenizer()
    model = model if model is not None else build_model(len(tok))
    cfg = {**CPU, "output_dir": str(tmp_path / "out"), "max_steps": 1, **overrides}
    return IFTTrainer(
        model=model,
        args=IFTConfig(**cfg),
        processing_class=tok,
        train_dataset=Dataset.from_list(rows or conversations(8)),
    )


def first_batch(trainer) -> dict:
    """The trainer's first training micro-batch, prepared as `compute_loss` receives it."""
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer, loadable with from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer()
    build_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _sentence(g: torch.Generator, low: int, high: int) -> str:
    """low to high-1 random words of `WORDS`."""
    n = int(torch.randint(low, high, (1,), generator=g))
    return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=g))


def conversations(n: int, seed: int = 0) -> list[dict]:
    """`n` one-turn chats (`messages`) of random words."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        q, a = _sentence(g, 2, 6), _sentence(g, 2, 8)
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
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
    for r in conversations(16, seed=1):
        prompt, chosen = r["messages"]
        rejected = {"role": "assistant", "content": " ".join(reversed(chosen["content"].split()))}
        rows.append({"prompt": [prompt], "chosen": [chosen], "rejected": [rejected]})
    return write_jsonl(tmp_path / "prefs.jsonl", rows)
