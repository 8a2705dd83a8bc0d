"""The `iftune` command: one subcommand per module, imported only when it is used.

Each entry point is `main(argv: list[str]) -> int`. A user mistake raises `UserError`;
it is printed as one line (no traceback) and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import NoReturn

from iftune.errors import UserError

# subcommand -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "ift": ("iftune.train", "main_ift", "train with Intuitive Fine-Tuning (IFTTrainer)"),
    "sft": ("iftune.train", "main_sft", "train with TRL's SFTTrainer"),
    "dpo": ("iftune.train", "main_dpo", "train with TRL's DPOTrainer"),
    "orpo": ("iftune.train", "main_orpo", "train with TRL's ORPO trainer"),
    "recipes": ("iftune.train", "recipes_main", "list the shipped recipes, or print one's full path"),
    "demo": ("iftune.demo", "main", "offline IFT vs SFT study on a tiny model (the default)"),
    "frozenlake": ("iftune.frozenlake.cli", "main", "the paper's Frozen Lake study"),
    "eval": ("iftune.evaluation", "main", "benchmarks through lm-evaluation-harness"),
    "generate": ("iftune.evaluation", "generate_main", "AlpacaEval-ready generations"),
    "bench": ("iftune.benchmarks.trainers", "main", "time and memory of IFT vs SFT, DPO, ORPO"),
}
# Commands parsed by TRL's parser, which spells flags with underscores (and accepts dashes);
# the others use argparse with dashes, and are given underscores as dashes.
TRAINING = ("ift", "sft", "dpo", "orpo")


def usage() -> str:
    lines = ["usage: iftune <command> [options]   (iftune <command> --help for its options)", ""]
    lines += [f"  {name:<11} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "With no command, `iftune` runs the demo."]
    return "\n".join(lines)


def version() -> str:
    """`iftune X (python, torch, transformers, trl versions)`: what a bug report needs."""
    from iftune import __version__

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{name} {installed(name)}" for name in ("torch", "transformers", "trl", "peft"))
    return f"iftune {__version__} (python {platform.python_version()}, {deps})"


def dashed(argv: list[str]) -> list[str]:
    """`--output_dir x` as `--output-dir x` (up to a `--`), so both spellings work everywhere."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            flag, sep, value = arg.partition("=")
            out[i] = flag.replace("_", "-") + sep + value
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv and argv[0] in ("-V", "--version", "version"):
        print(version())
        return 0
    if not argv:
        name = "demo"
        print("iftune: no command given, running the demo (IFT vs SFT on a tiny offline model); "
              "train your own model with `iftune ift --model_name_or_path M --dataset_name D`.")
    else:
        name, argv = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"iftune: unknown command '{name}'; expected one of: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    if name not in TRAINING:
        argv = dashed(argv)
    try:
        entry = getattr(importlib.import_module(module), func)
        return int(entry(argv) or 0)
    except UserError as err:
        print(f"iftune {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------- training commands' parser


def usage_error(method: str) -> Callable[[str], NoReturn]:
    """A replacement for `ArgumentParser.error`: one line naming the flag and what it expected
    (`argument --learning_rate: invalid float value: 'abc'`) instead of the 160-line usage."""
    def error(message: str) -> NoReturn:
        raise UserError(f"{message} (`iftune {method} --help` lists the options)")
    return error


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
    what = COMMANDS[method][2]
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


if __name__ == "__main__":
    sys.exit(main())
