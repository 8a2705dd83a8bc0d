"""Whole runs with the GPU-shaped settings left on, on CPU: the shipped IFT recipes with their own
`bf16: true` / `dtype: bfloat16`, and 2-process DDP in bf16 through `accelerate launch`.
Only the model, the data and the number of steps are replaced (a tiny local model saved in bf16,
tiny local data in the layout of the recipe's hub datasets)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from conftest import (
    ACCELERATE_TWO,
    CHAT_TEMPLATE,
    build_model,
    build_tokenizer,
    conversations,
    run_offline,
    write_jsonl,
)
from iftune import train

ROOT = Path(__file__).resolve().parents[1]
IFT_RECIPES = sorted((Path(train.__file__).parent / "recipes").glob("*/ift.yaml"))
# The zephyr-style case: a template that renders the chat but marks no assistant tokens.
TEMPLATE_WITHOUT_MARKERS = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def save_bf16_model(path: Path, chat_template: str | None) -> Path:
    """The tiny Llama saved with bf16 weights, and its tokenizer with `chat_template`."""
    tok = build_tokenizer()
    tok.chat_template = chat_template
    build_model(len(tok)).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bf16-models")
    return {
        "no_template": save_bf16_model(root / "no_template", None),
        "no_generation_markers": save_bf16_model(root / "no_markers", TEMPLATE_WITHOUT_MARKERS),
    }


def hub_layout(root: Path, split: str, rows: list[dict]) -> Path:
    """A local dataset folder laid out like a hub dataset (data/<split>-00000-of-00001.parquet),
    so that the recipe's own `dataset_train_split` names select it."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory) -> dict[str, Path]:
    """UltraFeedback-binarized-like preference rows and UltraChat-like chat rows."""
    root = tmp_path_factory.mktemp("recipe-data")
    prefs = []
    for i, row in enumerate(conversations(16, seed=7)):
        user, answer = row["messages"]
        worse = {"role": "assistant", "content": " ".join(reversed(answer["content"].split()))}
        prefs.append(
            {
                "prompt": user["content"],
                "prompt_id": str(i),
                "chosen": [user, answer],
                "rejected": [user, worse],
                "messages": [user, answer],
                "score_chosen": 8.0,
                "score_rejected": 3.0,
            }
        )
    chats = [
        {"prompt": r["messages"][0]["content"], "prompt_id": str(i), "messages": r["messages"]}
        for i, r in enumerate(conversations(16, seed=8))
    ]
    return {
        "train_prefs": hub_layout(root / "ultrafeedback", "train_prefs", prefs),
        "train_sft": hub_layout(root / "ultrachat", "train_sft", chats),
    }


def recipe_argv(recipe: Path, model_dir: Path, data: dict[str, Path], out: Path) -> list[str]:
    """The recipe as shipped, with the model, the data (same splits, all rows) and 2 steps replaced."""
    import yaml

    shipped = yaml.safe_load(recipe.read_text())
    splits = shipped["dataset_train_split"]
    return [
        "--config",
        str(recipe),
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        *[str(data[s]) for s in splits],
        "--dataset_num_samples",
        *["-1"] * len(splits),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--use_cpu",
        "true",
        "--disable_tqdm",
        "true",
    ]


def check_trained_in_bf16(trainer, out: Path, start: Path) -> None:
    args = trainer.args
    assert args.bf16 and trainer.accelerator.mixed_precision == "bf16"
    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [
        trainer.state.log_history[-1]["train_loss"]
    ]
    assert all(torch.isfinite(torch.tensor(x)) for x in losses)
    # Assistant-only loss stays on (IFT must not replace prompt tokens): every row starts with an
    # untrained user turn and trains some assistant tokens.
    assert args.assistant_only_loss
    labels = trainer.train_dataset["labels"]
    assert all(row[0] == -100 and any(t != -100 for t in row) for row in labels)
    saved, before = load_file(str(out / "model.safetensors")), load_file(str(start / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    assert set(saved) == set(before)
    json.loads((out / "trainer_state.json").read_text())


@pytest.mark.parametrize("tokenizer", ["no_template", "no_generation_markers"])
@pytest.mark.parametrize("recipe", IFT_RECIPES, ids=lambda p: p.parent.name)
def test_ift_recipe_runs_as_shipped_in_bf16(recipe, tokenizer, models, recipe_data, tmp_path):
    out = tmp_path / "out"
    trainer = train.train("ift", *train.parse("ift", recipe_argv(recipe, models[tokenizer], recipe_data, out)))
    check_trained_in_bf16(trainer, out, models[tokenizer])


def test_ift_recipe_honours_chat_template_path(models, recipe_data, tmp_path):
    template = tmp_path / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE)
    out = tmp_path / "out"
    argv = recipe_argv(IFT_RECIPES[0], models["no_template"], recipe_data, out)
    trainer = train.train("ift", *train.parse("ift", [*argv, "--chat_template_path", str(template)]))
    check_trained_in_bf16(trainer, out, models["no_template"])
    assert trainer.processing_class.chat_template == CHAT_TEMPLATE


@pytest.mark.slow
def test_ddp_two_processes_bf16_trains_and_saves(tmp_path):
    """`accelerate launch --multi_gpu` on 2 CPU processes, bf16 weights and bf16 autocast."""
    model_dir = save_bf16_model(tmp_path / "model", CHAT_TEMPLATE)
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(16))
    out = tmp_path / "out"
    flags = {
        "model_name_or_path": model_dir,
        "dataset_name": data,
        "output_dir": out,
        "use_cpu": "true",
        "bf16": "true",
        "dtype": "bfloat16",
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": "true",
    }
    cmd = [
        *ACCELERATE_TWO,
        "-m",
        "iftune.cli",
        "ift",
        *[x for k, v in flags.items() for x in (f"--{k}", str(v))],
    ]
    run_offline(cmd)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and all(
        torch.isfinite(torch.tensor(h["loss"])) for h in state["log_history"] if "loss" in h
    )
    saved, before = load_file(str(out / "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    assert any(not torch.equal(saved[k], before[k]) for k in before), "training did not change the weights"


@pytest.mark.parametrize(
    "launcher_env,fp32_master",
    [
        ({}, False),  # `iftune ift` or `accelerate launch` with DDP: bf16 weights are updated in place
        # What `accelerate launch --config_file recipes/accelerate/{fsdp,zero3}.yaml` sets.
        ({"ACCELERATE_USE_FSDP": "true"}, True),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, True),
    ],
    ids=["single-or-ddp", "fsdp-config", "deepspeed-config"],
)
def test_pure_bf16_warning_names_only_runs_without_fp32_master_weights(
    launcher_env, fp32_master, models, recipe_data, tmp_path, monkeypatch, caplog
):
    """The recipes' bf16 weights with lr 5e-7 round most updates away, unless a sharding wrapper
    keeps fp32 master weights (FSDP2 upcasts, ZeRO-3 keeps fp32 partitions)."""
    for key, value in launcher_env.items():
        monkeypatch.setenv(key, value)
    argv = recipe_argv(IFT_RECIPES[0], models["no_template"], recipe_data, tmp_path / "out")
    _, training_args, model_args = train.parse("ift", argv)
    with caplog.at_level(logging.WARNING, logger="iftune"):
        train.warn_pure_bf16(model_args, training_args)
    assert ("without fp32 master weights" in caplog.text) is not fp32_master, caplog.text
