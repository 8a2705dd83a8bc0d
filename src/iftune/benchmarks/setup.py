"""What `iftune bench` runs: the sizes and presets, the model, the data and each method's trainer."""

from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass, replace
from typing import Any

from iftune.data import PREFERENCE_METHODS
from iftune.errors import UserError
from iftune.tiny import SPECIALS, causal_lm, numbered_tokenizer

# Each benchmark method and the `iftune <method>` trainer it runs (`iftune.train.METHODS`).
TRAINER_OF = {
    "trl_sft": "sft",
    "sft": "ift",
    "ift": "ift",
    "ift_trl_head": "ift",
    "naive_ift": "ift",
    "dpo": "dpo",
    "orpo": "orpo",
}
METHODS = tuple(TRAINER_OF)
PRECISIONS = ("fp32", "bf16", "bf16-weights")
# The sizes a flag can set (each an integer >= 1).
INT_SIZES = ("vocab", "hidden", "layers", "heads", "intermediate", "batch", "seq", "prompt")


@dataclass(frozen=True)
class Sizes:
    """Model and batch sizes. Defaults: Mistral's vocabulary on a small Llama body, where the LM head dominates.

    `kv_heads` 0 means as many as `heads`; `full_layers` 0 means `layers` is the whole model
    (a preset cut to fewer layers keeps its real depth there, for the table's label).
    """

    vocab: int = 32000
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 896  # Mistral's 3.5 x hidden
    batch: int = 4
    seq: int = 512
    prompt: int = 128
    kv_heads: int = 0
    arch: str = "llama"
    tied: bool = False
    full_layers: int = 0
    name: str = ""
    rope_theta: float = 10000.0

    def check(self) -> None:
        for name in INT_SIZES:
            if getattr(self, name) < 1:
                raise UserError(f"--{name}={getattr(self, name)} is not valid; expected an integer >= 1")
        if self.vocab <= len(SPECIALS):
            raise UserError(f"--vocab={self.vocab} is not valid; expected an integer > {len(SPECIALS)}")
        if self.hidden % self.heads:
            raise UserError(f"--hidden={self.hidden} is not a multiple of --heads={self.heads}")
        if self.heads % (self.kv_heads or self.heads):
            raise UserError(f"--heads={self.heads} is not a multiple of the preset's {self.kv_heads} KV heads")
        if self.prompt >= self.seq - 1:
            raise UserError(f"--prompt={self.prompt} leaves no completion; expected --prompt < --seq - 1")

    def label(self) -> str:
        """e.g. "Qwen2.5-0.5B shape, 2 of 24 layers" or "4 layers"."""
        depth = f"{self.layers} of {self.full_layers} layers" if self.full_layers else f"{self.layers} layers"
        return f"{self.name} shape, {depth}" if self.name else depth


# Real configurations (random weights, no download); the layers are cut so that every method
# fits ~8 GiB and a whole run ~15 minutes on 2 shared CPU cores. The prompt is a quarter.
PRESETS = {
    "qwen2.5-0.5b": Sizes(
        name="Qwen2.5-0.5B",
        arch="qwen2",
        vocab=151936,
        hidden=896,
        heads=14,
        kv_heads=2,
        intermediate=4864,
        tied=True,
        layers=2,
        full_layers=24,
        rope_theta=1e6,
        batch=1,
        seq=1024,
        prompt=256,
    ),
    "llama-3.2-1b": Sizes(
        name="Llama-3.2-1B",
        arch="llama",
        vocab=128256,
        hidden=2048,
        heads=32,
        kv_heads=8,
        intermediate=8192,
        tied=True,
        layers=1,
        full_layers=16,
        rope_theta=5e5,
        batch=1,
        seq=1024,
        prompt=256,
    ),
    # The test suite's preset: the same code path in seconds.
    "tiny": Sizes(
        name="tiny",
        arch="qwen2",
        vocab=256,
        hidden=32,
        heads=4,
        kv_heads=2,
        intermediate=64,
        tied=True,
        layers=1,
        full_layers=2,
        batch=2,
        seq=48,
        prompt=12,
    ),
}
QUICK = Sizes(vocab=256, hidden=32, layers=2, heads=2, intermediate=64, batch=2, seq=48, prompt=12)


@dataclass(frozen=True)
class Options:
    """How the trainers run: seed, device, precision, and activation checkpointing (off by default).

    `precision`: "fp32"; "bf16" (mixed precision: float32 weights, autocast to bf16, the
    `bf16=True` training argument); "bf16-weights" (the same with the weights cast to bf16).
    `attn`: the models' attention implementation (None: transformers' default, sdpa);
    `padding_free`: the trainers' padding-free collation (flash-attention's varlen path).
    """

    seed: int = 0
    cuda: bool = False
    checkpointing: bool = False
    precision: str = "fp32"
    attn: str | None = None
    padding_free: bool = False


def make_model(sizes: Sizes, seed: int, max_positions: int, precision: str = "fp32", attn: str | None = None):
    """A causal LM of `sizes` with random weights (seeded); float32 unless "bf16-weights";
    `attn`: its attention implementation (None: transformers' default)."""
    import torch

    extra = {"attn_implementation": attn} if attn else {}

    model = causal_lm(
        sizes.arch,
        sizes.vocab,
        seed,
        hidden_size=sizes.hidden,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads or sizes.heads,
        intermediate_size=sizes.intermediate,
        max_position_embeddings=max_positions,
        tie_word_embeddings=sizes.tied,
        rope_theta=sizes.rope_theta,
        **extra,
    )
    return model.to(torch.bfloat16) if precision == "bf16-weights" else model


def is_preference(method: str) -> bool:
    """Whether `method` trains on prompt/chosen/rejected rows."""
    return TRAINER_OF[method] in PREFERENCE_METHODS


def _words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"t{rng.randrange(len(SPECIALS), vocab)}" for _ in range(n))


def make_dataset(method: str, sizes: Sizes, rows: int, seed: int):
    """Rows of text that tokenize to `seq` tokens with a `prompt`-token prompt (EOS included).

    SFT-style methods get prompt/completion; DPO and ORPO get prompt/chosen/rejected with
    chosen and rejected of the same length, so each of their sequences is as long as SFT's.
    """
    from datasets import Dataset

    rng = random.Random(seed)
    completion = sizes.seq - sizes.prompt - 1  # the trainers append EOS
    answers = ("chosen", "rejected") if is_preference(method) else ("completion",)
    data: dict[str, list[str]] = {key: [] for key in ("prompt", *answers)}
    for _ in range(rows):
        data["prompt"].append(_words(rng, sizes.prompt, sizes.vocab))
        for key in answers:
            data[key].append(" " + _words(rng, completion, sizes.vocab))
    return Dataset.from_dict(data)


def _common_args(sizes: Sizes, steps: int, opt: Options, out_dir: str) -> dict[str, Any]:
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=sizes.batch,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        seed=opt.seed,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not opt.cuda,
        bf16=opt.precision != "fp32",
        fp16=False,
        dataloader_num_workers=0,
        max_length=sizes.seq,
        # TRL's configs turn it on by default, the ORPO one does not: one setting for all.
        activation_checkpointing=opt.checkpointing,
        **({"padding_free": True} if opt.padding_free else {}),
    )


def build_trainer(method: str, sizes: Sizes, model, steps: int, opt: Options, out_dir: str):
    """The real trainer of `method` on `model` (trained in place) and its own dataset."""
    from transformers import PrinterCallback

    from iftune.benchmarks.baselines import NaiveIFTTrainer, PathSFTTrainer
    from iftune.train import trainer_classes

    if method not in TRAINER_OF:
        raise UserError(f"unknown method '{method}'; expected one of {', '.join(METHODS)}")
    common = _common_args(sizes, steps, opt, out_dir)
    config_cls, trainer_cls = trainer_classes(TRAINER_OF[method])
    trainer_cls = {"sft": PathSFTTrainer, "naive_ift": NaiveIFTTrainer}.get(method, trainer_cls)
    kwargs: dict[str, Any] = {}
    if method in ("ift", "ift_trl_head"):  # pinned: the default head depends on the device
        common["lm_head"] = "trl" if method == "ift_trl_head" else "iftune"
    elif method == "dpo":
        kwargs["ref_model"] = copy.deepcopy(model)  # an in-memory model has no path to reload it from
    elif method == "orpo":
        common["remove_unused_columns"] = False  # its collator needs every column (it says so otherwise)
    trainer = trainer_cls(
        model=model,
        args=config_cls(**common),
        processing_class=numbered_tokenizer(sizes.vocab),
        train_dataset=make_dataset(method, sizes, sizes.batch * steps, opt.seed),
        **kwargs,
    )
    trainer.remove_callback(PrinterCallback)  # no log lines in the benchmark's output
    return trainer


def tokens_per_step(trainer) -> int:
    """Tokens of one batch that the policy model runs on (chosen + rejected for DPO/ORPO)."""
    batch = next(iter(trainer.get_train_dataloader()))
    masks = [v for k, v in batch.items() if k.endswith("attention_mask") and not k.startswith("prompt")]
    return int(sum(int(m.sum()) for m in masks))


def shared_copies(model, n: int) -> list:
    """`n` copies of `model` whose modules (and buffers) are their own but whose parameters are
    `model`'s: every trainer then trains the same weights with one optimizer state."""
    return [copy.deepcopy(model, memo={id(p): p for p in model.parameters()}) for _ in range(n)]


def shared_trainers(methods: list[str], sizes: Sizes, steps: int, opt: Options, out: str) -> dict[str, Any]:
    """The trainer of each method (`steps` steps), sharing one set of weights and one AdamW
    state (created as the first trainer creates it): N trainers hold one model's training state."""
    base = make_model(sizes, opt.seed, sizes.seq, opt.precision, opt.attn)
    trainers = {
        m: build_trainer(m, sizes, model, steps, opt, os.path.join(out, m))
        for m, model in zip(methods, shared_copies(base, len(methods)))
    }
    first = trainers[methods[0]]
    first.create_optimizer()
    for trainer in trainers.values():
        trainer.optimizer = first.optimizer
    return trainers


def with_sizes(base: Sizes, **changes: Any) -> Sizes:
    """`base` with the non-None `changes`, checked."""
    sizes = replace(base, **{k: v for k, v in changes.items() if v is not None})
    sizes.check()
    return sizes


__all__ = [
    "INT_SIZES",
    "METHODS",
    "PRECISIONS",
    "PRESETS",
    "QUICK",
    "TRAINER_OF",
    "Options",
    "Sizes",
    "build_trainer",
    "is_preference",
    "make_dataset",
    "make_model",
    "shared_copies",
    "shared_trainers",
    "tokens_per_step",
    "with_sizes",
]
