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

from iftune.arguments import check_config, describe
from iftune.checks import check_run, model_config
from iftune.errors import UserError, usage_error

logger = logging.getLogger("iftune")

METHODS = ("sft", "ift", "dpo", "orpo")
RECIPES = Path(__file__).parent / "recipes"


@dataclass
class DataArguments:
    """Where the training data comes from (the model is `ModelConfig.model_name_or_path`)."""

    dataset_name: list[str] = field(
        default_factory=list,
        metadata={"help": "Hub id(s) or local .jsonl/.json/.parquet file(s) or folder(s); several make a mixture."},
    )
    dataset_num_samples: list[int] = field(
        default_factory=list,
        metadata={"help": "Rows to draw from each dataset_name, in order (-1 = all), e.g. -1 60000."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: list[str] = field(
        default_factory=lambda: ["train"],
        metadata={"help": "Split to train on: one for all datasets, or one per dataset_name."},
    )
    eval_dataset_name: list[str] = field(
        default_factory=list,
        metadata={"help": "Evaluation data, as dataset_name (used with --eval_strategy steps|epoch)."},
    )
    dataset_test_split: list[str] = field(
        default_factory=lambda: ["test"],
        metadata={"help": "Split of eval_dataset_name to evaluate on: one for all, or one per dataset."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a non-empty output_dir (its files may be replaced)."}
    )


@dataclass
class PreferenceDataArguments(DataArguments):
    """DPO and ORPO configs have no `chat_template_path` (SFTConfig does): the command adds it."""

    chat_template_path: str | None = field(
        default=None, metadata={"help": "A .jinja chat template to give the tokenizer (e.g. for a base model)."}
    )


def trainer_classes(method: str) -> tuple[type, type]:
    """(config class, trainer class) of `method`, one of `METHODS`; imported lazily (TRL is slow
    to import). SFT, DPO and ORPO are TRL's trainers as they are."""
    if method == "ift":
        from iftune.trainer import IFTConfig, IFTTrainer

        return IFTConfig, IFTTrainer
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTConfig, SFTTrainer
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer
    raise UserError(f"unknown method '{method}'; expected one of {', '.join(METHODS)}")


def make_parser(method: str) -> Any:
    """The `TrlParser` of `iftune <method>`: iftune's data arguments, the method's config, TRL's
    `ModelConfig`, with iftune's defaults (bf16 where the GPU has it, `outputs/<method>`)."""
    from trl import ModelConfig, TrlParser

    from iftune.trainer import IFTConfig, default_bf16

    config_cls, _ = trainer_classes(method)
    data_cls = PreferenceDataArguments if method in ("dpo", "orpo") else DataArguments
    parser = TrlParser((data_cls, config_cls, ModelConfig), prog=f"iftune {method}")
    defaults: dict[str, Any] = {"output_dir": f"outputs/{method}"}
    if config_cls is not IFTConfig:
        # TRL's own configs get the defaults that IFTConfig declares where they differ from TRL's:
        # bf16 only where the hardware has it; for SFT, assistant-only loss filled in from the data,
        # and the Trainer's token count, which checkpoints keep (TRL's `num_tokens` restarts at 0
        # on resume). TrainingArguments types that option `str | bool`, which the parser reads as
        # a bool, so SFT counts every input token ("all"), IFT the non-padding ones.
        defaults["bf16"] = default_bf16()
        if method == "sft":
            defaults["assistant_only_loss"] = None
            defaults["include_num_input_tokens_seen"] = True
    parser.set_defaults(**defaults)
    describe(parser, method)
    return parser


def recipe_path(name: str) -> Path:
    """A shipped recipe file (`mistral-7b-ultrafeedback/ift.yaml`, `accelerate/zero3.yaml`,
    `chat_templates/zephyr.jinja`; `.yaml` may be left out), or `name` itself if it is a file."""
    if Path(name).is_file():
        return Path(name)
    for candidate in (RECIPES / name, RECIPES / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise UserError(f"no such file or shipped recipe '{name}' (`iftune recipes` lists them)")


def recipes_main(argv: list[str]) -> int:
    """`iftune recipes [NAME]`: the full path of a shipped recipe, or the list of them."""
    if argv:
        print(recipe_path(argv[0]).resolve())
        return 0
    for path in sorted(RECIPES.rglob("*")):
        if path.suffix in (".yaml", ".jinja"):
            print(path.relative_to(RECIPES))
    return 0


def parse(method: str, argv: list[str]) -> tuple[DataArguments, Any, Any]:
    """(script_args, training_args, model_args) from a YAML `--config` plus flags, exactly as
    `iftune <method>` parses them; a bad value raises `UserError`. `--config` also takes a
    shipped recipe's name; a relative `chat_template_path` in it is read beside the YAML."""
    parser = make_parser(method)
    parser.error = usage_error(method)  # argparse would print the whole 160-line usage, then exit
    argv = list(argv)
    config = None
    if "--config" in argv:
        at = argv.index("--config") + 1
        if at >= len(argv):
            raise UserError("--config: expected a YAML file or a shipped recipe's name")
        config = recipe_path(argv[at])
        argv[at] = str(config)
    check_config(argv)
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    except ValueError as err:
        raise UserError(str(err).strip().splitlines()[0]) from None
    holder = script_args if hasattr(script_args, "chat_template_path") else training_args
    template = getattr(holder, "chat_template_path", None)
    if template and config is not None and not Path(template).exists() and (config.parent / template).is_file():
        holder.chat_template_path = str(config.parent / template)
    return script_args, training_args, model_args


def load_tokenizer(model_args, trust_remote_code: bool = False) -> Any:
    """The tokenizer of `--model_name_or_path`; a missing or unreadable model is a `UserError`."""
    from transformers import AutoTokenizer

    name = model_args.model_name_or_path
    if not name:
        raise UserError("--model_name_or_path is required (a hub id or a local directory)")
    try:
        return AutoTokenizer.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        where = "no such local directory, and" if not Path(name).exists() else "the directory is not a model:"
        raise UserError(f"model '{name}' could not be loaded ({where} {str(err).splitlines()[0]})") from None


def model_init_kwargs(model_args, training_args) -> dict[str, Any]:
    """Keyword arguments for the model's `from_pretrained`, with 4/8-bit quantization (QLoRA)
    and its device map when `--load_in_4bit` or `--load_in_8bit` is given."""
    from trl import get_quantization_config

    kwargs = dict(training_args.model_init_kwargs or {})
    kwargs.setdefault("revision", model_args.model_revision)
    kwargs.setdefault("trust_remote_code", getattr(training_args, "trust_remote_code", False))
    if model_args.attn_implementation:
        kwargs.setdefault("attn_implementation", model_args.attn_implementation)
    if model_args.dtype not in (None, "auto"):
        kwargs.setdefault("dtype", model_args.dtype)
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("--load_in_4bit/--load_in_8bit need bitsandbytes: pip install 'iftune[qlora]'") from None
        if not model_args.use_peft:
            raise UserError("--load_in_4bit/--load_in_8bit train adapters only: add --use_peft (QLoRA)")
        kwargs.setdefault("quantization_config", quantization)
        # Each process's whole model on its own device, as transformers advises for distributed runs
        # (TRL 1.16 has no `get_kbit_device_map` any more, and its default "auto" would spread a
        # one-process or FSDP run over every visible GPU; under DDP and DeepSpeed TRL resets it to None,
        # and bitsandbytes' quantizer then picks the process's current device, the same one).
        kwargs.setdefault("device_map", {"": str(training_args.device)})
    return kwargs


def apply_chat_template_path(tokenizer, path: str | None) -> None:
    """Set the tokenizer's chat template from a .jinja file (TRL's `chat_template_path`)."""
    if not path:
        return
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--chat_template_path: no such file '{path}'")
    tokenizer.chat_template = file.read_text(encoding="utf-8")


def check_chat_template(tokenizer, model_name: str, assistant_only_loss: bool) -> None:
    """Conversational data needs a chat template, and assistant-only loss needs its
    `{% generation %}` markers (TRL takes the assistant mask from them). A template without
    them passes where TRL has a training version of it, which SFTTrainer then swaps in."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if not template:
        raise UserError(
            f"model '{model_name}': the tokenizer has no chat template, which conversational data "
            f"needs; give one with --chat_template_path FILE.jinja (iftune ships one: "
            f"`iftune recipes chat_templates/zephyr.jinja`)"
        )
    if not assistant_only_loss or has_generation_markers(template):
        return
    try:
        get_training_chat_template(tokenizer)
    except ValueError:  # TRL knows no training version of this template
        raise UserError(
            f"model '{model_name}': its chat template has no {{% generation %}} markers, which "
            f"--assistant_only_loss needs, and TRL has no training version of it; give the same template "
            f"with {{% generation %}}...{{% endgeneration %}} around each assistant reply "
            f"(--chat_template_path FILE.jinja) or set --assistant_only_loss false"
        ) from None


def warn_pure_bf16(model_args, training_args) -> None:
    """bf16 weights updated in place (one GPU, DDP) lose updates below bf16's resolution."""
    from accelerate.utils import parse_flag_from_env

    # FSDP2 and ZeRO-3 keep fp32 master weights, chosen by flags or by accelerate's config (env).
    sharded = (
        bool(getattr(training_args, "fsdp", None))
        or getattr(training_args, "deepspeed", None) is not None
        or parse_flag_from_env("ACCELERATE_USE_FSDP")
        or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    )
    if (
        model_args.dtype == "bfloat16"
        and not sharded
        and not model_args.use_peft
        and training_args.learning_rate < 1e-4
    ):
        logger.warning(
            "bf16 weights without fp32 master weights: at learning_rate=%g most of each update is below "
            "bf16's resolution (2^-8 of the weight) and rounds away; use --dtype float32 with --bf16 true, "
            "or FSDP2/ZeRO-3 (which keep fp32 master weights). See docs/distributed.md.",
            training_args.learning_rate,
        )


def build_trainer(method: str, data_args: DataArguments, training_args, model_args):
    """The trainer for `method`, with its model, tokenizer and data loaded and checked."""
    from trl import get_peft_config

    from iftune.data import load_training_data
    from iftune.families import check_lora_targets
    from iftune.trainer import resolve_assistant_only_loss

    if not data_args.dataset_name:
        raise UserError("--dataset_name is required (a hub id or a local .jsonl/.json/.parquet file)")
    tokenizer = load_tokenizer(model_args, getattr(training_args, "trust_remote_code", False))
    dataset = load_training_data(
        data_args.dataset_name,
        method,
        data_args.dataset_num_samples,
        data_args.dataset_train_split,
        data_args.dataset_config,
        training_args.seed,
    )
    eval_dataset = None
    if data_args.eval_dataset_name:
        eval_dataset = load_training_data(
            data_args.eval_dataset_name,
            method,
            None,
            data_args.dataset_test_split,
            data_args.dataset_config,
            training_args.seed,
        )
    elif training_args.eval_strategy != "no":
        raise UserError(
            f"--eval_strategy {training_args.eval_strategy}: give the evaluation data with --eval_dataset_name"
        )
    if method in ("dpo", "orpo"):
        apply_chat_template_path(tokenizer, data_args.chat_template_path)
    else:
        resolve_assistant_only_loss(training_args, dataset[0] if len(dataset) else None)
        if "messages" in dataset.column_names:
            # Set here, not left to TRL, so that the template check below sees it.
            apply_chat_template_path(tokenizer, training_args.chat_template_path)
            training_args.chat_template_path = None
            check_chat_template(tokenizer, model_args.model_name_or_path, training_args.assistant_only_loss)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    warn_pure_bf16(model_args, training_args)
    peft_config = get_peft_config(model_args)
    config = model_config(
        model_args.model_name_or_path, model_args.model_revision, getattr(training_args, "trust_remote_code", False)
    )
    if peft_config is not None and config is not None:
        check_lora_targets(config, peft_config)  # PEFT knows no default targets for some families
    _, trainer_cls = trainer_classes(method)
    try:
        trainer = trainer_cls(
            model=model_args.model_name_or_path,
            args=training_args,
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    except ValueError as err:  # TRL checks its options' combinations here (e.g. padding_free without packing)
        raise UserError(f"{trainer_cls.__name__}: {' '.join(str(err).split())}") from err
    report_dropped(trainer, len(dataset), method, training_args)
    return trainer


def report_dropped(trainer, n_rows: int, method: str, training_args) -> None:
    """Log the rows TRL dropped for having no trained token left after truncation; refuse a run
    that would train on nothing."""
    kept = len(trainer.train_dataset)
    if kept == 0:  # DPO and ORPO drop such rows too
        raise UserError(
            f"--max_length {training_args.max_length}: every one of the {n_rows} training rows has no "
            f"trained token left after truncation; raise --max_length"
        )
    if getattr(training_args, "packing", False) or method not in ("sft", "ift"):
        return
    if kept < n_rows:
        logger.warning(
            "training data: dropped %d of %d rows that have no trained token after truncation (max_length=%s)",
            n_rows - kept,
            n_rows,
            training_args.max_length,
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
    trainer.add_callback(FiniteGuard())  # a NaN run stops with one line, and saves nothing
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json (the log history) beside the model, even with save_strategy=no
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(training_args.output_dir)
        # The name TRL's trainers give the card when they save; the card's base model is TRL's
        # `get_config_model_id(model.config)`, read by `create_model_card` itself.
        hub_id = training_args.hub_model_id
        trainer.create_model_card(model_name=hub_id.split("/")[-1] if hub_id else Path(training_args.output_dir).name)
        logger.info("saved %s model to %s", method, training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return trainer


def run(method: str, argv: list[str]) -> int:
    """`iftune <method> ...`: logging to the console, then `train(method, *parse(method, argv))`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # bitsandbytes warns on import about an optional CPU kernel package, on every run.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = train(method, *parse(method, argv))
    # The end of the script (transformers' Trainer.end): trackers finish, and each process
    # destroys its process group, which torch asks for before exit.
    trainer.accelerator.end_training()
    return 0


__all__ = [
    "METHODS",
    "DataArguments",
    "PreferenceDataArguments",
    "build_trainer",
    "make_parser",
    "parse",
    "recipe_path",
    "run",
    "train",
    "trainer_classes",
]
