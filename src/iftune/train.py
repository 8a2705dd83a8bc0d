"""`iftune sft|ift|dpo|orpo`: one command, four trainers, the same data and model loading.

Arguments are parsed the way TRL's own command parses them (`TrlParser`: a YAML `--config`
plus flags, flags win), one parser per method since their configs differ. SFT, DPO and ORPO
are TRL's trainers as they are; IFT is `IFTTrainer`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iftune.checks import check_prepared_data, check_run
from iftune.cli import check_config, describe, usage_error
from iftune.errors import UserError

logger = logging.getLogger("iftune")

METHODS = ("sft", "ift", "dpo", "orpo")


@dataclass
class DataArguments:
    """Where the training data comes from (the model is `ModelConfig.model_name_or_path`)."""

    dataset_name: list[str] = field(
        default_factory=list,
        metadata={"help": "Hub id(s) or local .jsonl/.json/.parquet file(s) or folder(s); several make a mixture."})
    dataset_num_samples: list[int] = field(
        default_factory=list,
        metadata={"help": "Rows to draw from each dataset_name, in order (-1 = all), e.g. -1 60000."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: list[str] = field(
        default_factory=lambda: ["train"],
        metadata={"help": "Split to train on: one for all datasets, or one per dataset_name."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a non-empty output_dir (its files may be replaced)."})


def trainer_classes(method: str) -> tuple[type, type]:
    """(config class, trainer class) of `method`, one of `METHODS`; imported lazily (TRL is slow
    to import). SFT is TRL's SFTTrainer with the dropped-row count logged."""
    if method == "ift":
        from iftune.trainer import IFTConfig, IFTTrainer

        return IFTConfig, IFTTrainer
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        from iftune.trainer import DropCountMixin

        return SFTConfig, type("SFTTrainer", (DropCountMixin, SFTTrainer), {})
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer
    raise UserError(f"unknown method '{method}'; expected one of {', '.join(METHODS)}")


def make_parser(method: str):
    from trl import ModelConfig, TrlParser

    from iftune.trainer import default_bf16

    config_cls, _ = trainer_classes(method)
    parser = TrlParser((DataArguments, config_cls, ModelConfig), prog=f"iftune {method}")
    defaults: dict[str, Any] = {"bf16": default_bf16(), "output_dir": f"outputs/{method}"}
    if method in ("sft", "ift"):
        defaults["assistant_only_loss"] = True  # turned off for data without `messages`
    parser.set_defaults(**defaults)
    describe(parser, method)
    return parser


def parse(method: str, argv: list[str]) -> tuple[DataArguments, Any, Any]:
    """(script_args, training_args, model_args) from a YAML `--config` plus flags, exactly as
    `iftune <method>` parses them; a bad value raises `UserError`."""
    parser = make_parser(method)
    parser.error = usage_error(method)  # argparse would print the whole 160-line usage, then exit
    check_config(argv)
    try:
        return parser.parse_args_and_config(args=list(argv))
    except ValueError as err:
        raise UserError(str(err).strip().splitlines()[0]) from None


def load_tokenizer(model_args, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    name = model_args.model_name_or_path
    if not name:
        raise UserError("--model_name_or_path is required (a hub id or a local directory)")
    try:
        return AutoTokenizer.from_pretrained(name, revision=model_args.model_revision,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        where = "no such local directory, and" if not Path(name).exists() else "the directory is not a model:"
        raise UserError(f"model '{name}' could not be loaded ({where} {str(err).splitlines()[0]})") from None


def model_init_kwargs(model_args, training_args) -> dict[str, Any]:
    kwargs = dict(training_args.model_init_kwargs or {})
    kwargs.setdefault("revision", model_args.model_revision)
    kwargs.setdefault("trust_remote_code", getattr(training_args, "trust_remote_code", False))
    if model_args.attn_implementation:
        kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    if model_args.dtype not in (None, "auto"):
        kwargs.setdefault("dtype", model_args.dtype)
    return kwargs


def build_trainer(method: str, data_args: DataArguments, training_args, model_args):
    """The trainer for `method`, with its model, tokenizer and data loaded and checked."""
    from trl import get_peft_config

    from iftune.data import load_training_data

    if not data_args.dataset_name:
        raise UserError("--dataset_name is required (a hub id or a local .jsonl/.json/.parquet file)")
    tokenizer = load_tokenizer(model_args, getattr(training_args, "trust_remote_code", False))
    dataset = load_training_data(data_args.dataset_name, method, data_args.dataset_num_samples,
                                 data_args.dataset_train_split, data_args.dataset_config, training_args.seed)
    if method in ("sft", "ift") and "messages" not in dataset.column_names:
        training_args.assistant_only_loss = False
    if method in ("sft", "ift") and "messages" in dataset.column_names and not tokenizer.chat_template:
        raise UserError(f"model '{model_args.model_name_or_path}': the tokenizer has no chat template, "
                        f"which conversational data needs")
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    _, trainer_cls = trainer_classes(method)
    return trainer_cls(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )


def train(method: str, script_args: DataArguments, training_args, model_args):
    """Build the trainer of `method`, train, save the model (or adapter), tokenizer and
    `trainer_state.json` to `training_args.output_dir`, and return the trainer.

    The library call behind `iftune <method>`: it sets up no logging and changes no
    environment variable; bad input raises `UserError`.
    """
    from iftune.callbacks import FiniteGuard

    checkpoint = check_run(method, script_args, training_args, model_args)
    trainer = build_trainer(method, script_args, training_args, model_args)
    check_prepared_data(trainer, getattr(training_args, "max_length", None))
    trainer.add_callback(FiniteGuard())  # a NaN run stops with one line, and saves nothing
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json (the log history) beside the model, even with save_strategy=no
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(training_args.output_dir)
        logger.info("saved %s model to %s", method, training_args.output_dir)
    return trainer


def run(method: str, argv: list[str]) -> int:
    """`iftune <method> ...`: logging to the console, then `train(method, *parse(method, argv))`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(method, *parse(method, argv))
    return 0


def main_ift(argv: list[str]) -> int:
    return run("ift", argv)


def main_sft(argv: list[str]) -> int:
    return run("sft", argv)


def main_dpo(argv: list[str]) -> int:
    return run("dpo", argv)


def main_orpo(argv: list[str]) -> int:
    return run("orpo", argv)


__all__ = ["DataArguments", "METHODS", "build_trainer", "make_parser", "parse", "run", "train", "trainer_classes"]
