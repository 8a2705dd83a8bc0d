"""Checks of a training run's values and files, made before the tokenizer and model load.

Each check raises `UserError` with one line naming the flag or file and what was expected, so a
run that cannot succeed (or would overwrite a model, or would lose its result at save time)
stops in seconds instead of after training.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

from iftune.errors import UserError

logger = logging.getLogger("iftune")

# Names of the write probes: another rank's probe must not make the directory look non-empty.
PROBE_PREFIX = ".iftune-write-check-"
TRUE = ("true", "True", "TRUE", "1", "yes")
FALSE = ("false", "False", "FALSE", "0", "no")


def check_values(args) -> None:
    """Learning rate, batch size, accumulation and the run's length (a TrainingArguments)."""
    lr = args.learning_rate
    if not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--learning_rate {lr}: expected a finite number > 0")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, name)
        if value < 1:
            raise UserError(f"--{name} {value}: expected an integer >= 1")
    if args.max_steps == 0 or args.max_steps < -1:
        raise UserError(
            f"--max_steps {args.max_steps}: expected a number of optimizer steps >= 1, "
            f"or -1 (the default) to train for --num_train_epochs"
        )
    epochs = args.num_train_epochs
    if args.max_steps < 0 and not (math.isfinite(epochs) and epochs > 0):
        raise UserError(f"--num_train_epochs {epochs}: expected a number > 0 (or give --max_steps)")


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool) -> None:
    """`output_dir` is (or can be created as) a writable directory, and holds nothing that the
    run would overwrite unless `overwrite` or `resuming` says it may."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--output_dir {output_dir}: is a file, not a directory")
    if path.is_dir():
        kept = [p.name for p in path.iterdir() if not p.name.startswith(PROBE_PREFIX)]
        if kept and not (overwrite or resuming):
            resume = (
                ", --resume_from_checkpoint true to continue its run,"
                if any(name.startswith("checkpoint-") for name in kept)
                else ""
            )
            raise UserError(
                f"--output_dir {output_dir}: is not empty (holds {', '.join(sorted(kept)[:3])}"
                f"{', ...' if len(kept) > 3 else ''}); choose a new directory{resume} or pass "
                f"--overwrite_output_dir true to write over it"
            )
        probe_writable(path, output_dir)
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--output_dir {output_dir}: {parent} is a file, not a directory")
    probe_writable(parent, output_dir)


def probe_writable(directory: Path, flag_value: str) -> None:
    """Create and remove a directory entry in `directory`: permission bits alone do not say
    whether root can write (a read-only mount, /proc, /sys), an actual write does."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=directory))
    except OSError as err:
        raise UserError(
            f"--output_dir {flag_value}: cannot write in {directory} ({err.strerror}); choose a writable directory"
        ) from None


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint directory to resume from (`true`: the newest in `output_dir`), checked;
    None when not resuming."""
    from transformers.trainer_utils import get_last_checkpoint

    if not resume or resume in FALSE:
        return None
    if resume in TRUE:
        found = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if found is None:
            raise UserError(
                f"--resume_from_checkpoint true: no checkpoint-N directory in --output_dir {output_dir} to resume from"
            )
        resume = found
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume_from_checkpoint: no such checkpoint directory '{resume}'")
    if not (path / "trainer_state.json").is_file():
        raise UserError(
            f"--resume_from_checkpoint {resume}: not a checkpoint (no trainer_state.json); "
            f"expected a checkpoint-N directory saved by a training run"
        )
    check_weight_files(path, "--resume_from_checkpoint")
    return str(path)


def check_weight_files(directory: Path, flag: str) -> None:
    """Every `*.safetensors` file in `directory` is whole (a cut-off download or copy is caught
    here instead of as a deserialisation traceback)."""
    for file in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            raise UserError(
                f"{flag}: {file}: truncated or not a safetensors file ({problem}); download or copy it again"
            )


def safetensors_problem(file: Path) -> str | None:
    """Why `file` is not a complete safetensors file (safetensors' own reason), or None.

    `safe_open` reads only the header, and refuses a file whose tensors' byte ranges do not
    cover the data section exactly, so a file cut anywhere (header or data) is caught without
    reading the weights."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            return None
    except SafetensorError as err:
        return str(err).removeprefix("Error while deserializing header: ")
    except OSError as err:
        return err.strerror or str(err)


def model_config(name: str, revision: str | None, trust_remote_code: bool):
    """The model's config, or None when it cannot be read here (loading the tokenizer then
    reports why, in one line)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return None


def max_positions(config) -> int | None:
    """The longest sequence the model's config declares, or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_against_model(config, args) -> None:
    """`--intuition_k` against the vocabulary, `--router_aux_loss_coef` against a model without
    experts (TRL would raise a ValueError later); a warning when `--max_length` exceeds the
    model's positions (some models extrapolate, so it is not refused)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    k = getattr(args, "intuition_k", None)
    if k is not None and vocab and getattr(args, "intuition", None) == "rank" and k > vocab:
        raise UserError(f"--intuition_k {k}: larger than the model's vocabulary ({vocab} tokens)")
    coef = getattr(args, "router_aux_loss_coef", None)
    if coef and not hasattr(text, "output_router_logits"):
        raise UserError(
            f"--router_aux_loss_coef {coef}: the model ({getattr(text, 'model_type', '?')}) is not a "
            f"mixture-of-experts model with a router loss; leave the option unset"
        )
    limit, length = max_positions(config), getattr(args, "max_length", None)
    if limit and length and length > limit:
        logger.warning(
            "--max_length %d is larger than the model's maximum positions (%d): sequences "
            "longer than %d may give poor results",
            length,
            limit,
            limit,
        )


def check_run(method: str, script_args, training_args, model_args) -> str | None:
    """Every check that needs no tokenizer or model weights, in the order a user fixes them;
    returns the checkpoint directory to resume from (None when not resuming)."""
    check_values(training_args)
    resume = training_args.resume_from_checkpoint
    check_output_dir(training_args.output_dir, script_args.overwrite_output_dir, bool(resume) and resume not in FALSE)
    checkpoint = resolve_resume(resume, training_args.output_dir)
    name = model_args.model_name_or_path
    if name and Path(name).is_dir():
        check_weight_files(Path(name), "--model_name_or_path")
    config = (
        model_config(name, model_args.model_revision, getattr(training_args, "trust_remote_code", False))
        if name
        else None
    )
    if config is not None:
        check_against_model(config, training_args)
    return checkpoint


__all__ = [
    "check_against_model",
    "check_output_dir",
    "check_run",
    "check_values",
    "check_weight_files",
    "resolve_resume",
    "safetensors_problem",
]
