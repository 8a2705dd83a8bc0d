"""The training commands' parser, made friendlier: a checked `--config` YAML, and a short
summary of the flags most runs need at the top of `iftune <method> --help`."""

from __future__ import annotations

import argparse
from pathlib import Path

from iftune.errors import UserError

# One line per training method, for `iftune --help` and the top of `iftune <method> --help`.
METHOD_HELP = {
    "ift": "train with Intuitive Fine-Tuning (IFTTrainer)",
    "sft": "train with TRL's SFTTrainer",
    "dpo": "train with TRL's DPOTrainer",
    "orpo": "train with TRL's ORPO trainer",
}


def check_config(argv: list[str]) -> None:
    """The `--config` YAML in `argv`, if any, exists and is a mapping of option: value."""
    import yaml

    if "--config" not in argv:
        return
    i = argv.index("--config")
    path = argv[i + 1] if i + 1 < len(argv) else ""
    if not Path(path).is_file():
        raise UserError(f"--config: no such file '{path}'")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"--config {path}: not a UTF-8 text file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"--config {where}: YAML syntax error ({what})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")


class SummaryFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The summary keeps its layout; every option shows its default."""


COMMON_FLAGS = """Most runs need:
  --model_name_or_path MODEL          hub id or local model directory
  --dataset_name DATA [DATA ...]      hub id(s) or local .jsonl/.json/.parquet file(s) or folder(s)
  --output_dir DIR                    where the model goes (default outputs/{method}); a non-empty
                                      DIR is refused unless --overwrite_output_dir true
  --config RECIPE                     a recipe's YAML file or shipped name (`iftune recipes`); flags win
  --learning_rate LR  --num_train_epochs N (or --max_steps N)  --max_length TOKENS
  --per_device_train_batch_size B  --gradient_accumulation_steps A  --bf16 true
  --use_peft true --lora_r 16         train a LoRA adapter instead of every weight
  --resume_from_checkpoint true|DIR   continue from the newest checkpoint in --output_dir (or DIR)
"""


def training_summary(method: str) -> str:
    """The top of `iftune <method> --help`: the flags most runs need, and IFT's own options."""
    what = METHOD_HELP[method]
    text = f"{what[0].upper()}{what[1:]}; saves the model, tokenizer and trainer_state.json.\n\n"
    text += COMMON_FLAGS.format(method=method)
    if method == "ift":
        from dataclasses import fields

        from trl import SFTConfig

        from iftune.trainer import IFTConfig

        inherited = {f.name for f in fields(SFTConfig)}
        own = [f"--{f.name} {f.default}" for f in fields(IFTConfig) if f.name not in inherited]
        text += "\nIFT options and their defaults (the paper's recipe; each is described below):\n"
        text += "".join(f"  {line}\n" for line in pack(own, width=94))
    return text + "\nEvery option follows: iftune's data options, then TRL's and transformers'."


def pack(items: list[str], width: int) -> list[str]:
    """`items` joined by three spaces into lines of at most `width` characters, none split."""
    lines = [""]
    for item in items:
        if lines[-1] and len(lines[-1]) + 3 + len(item) > width:
            lines.append("")
        lines[-1] += f"   {item}" if lines[-1] else item
    return lines


def describe(parser: argparse.ArgumentParser, method: str) -> None:
    """Give a training command's parser a short usage line and the summary at the top of --help."""
    parser.usage = f"iftune {method} --model_name_or_path MODEL --dataset_name DATA [--config RECIPE] [options]"
    parser.description = training_summary(method)
    parser.formatter_class = SummaryFormatter


__all__ = ["METHOD_HELP", "check_config", "describe", "training_summary"]
