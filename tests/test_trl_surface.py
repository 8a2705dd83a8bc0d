"""The seams between iftune and TRL/transformers: the private names iftune relies on, options of
SFTTrainer's loss that IFT refuses, layouts it refuses, QLoRA loading, chat templates, model cards."""

from __future__ import annotations

import inspect
import sys
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from conftest import build_model, build_tokenizer, conversations
from iftune import cli
from iftune.errors import UserError
from iftune.train import build_trainer, parse, recipe_path
from iftune.trainer import IFTConfig, IFTTrainer

CPU = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True)


def small_trainer(output_dir, **kwargs) -> IFTTrainer:
    """An IFTTrainer of the tiny Llama on two conversations, on the CPU."""
    tok = build_tokenizer()
    return IFTTrainer(model=build_model(len(tok)), processing_class=tok, args=IFTConfig(output_dir=str(output_dir),
                      **CPU), train_dataset=Dataset.from_list(conversations(2)), **kwargs)  # fmt: skip


def test_private_trl_and_transformers_names_iftune_relies_on():
    """One place that fails when a TRL or transformers upgrade renames what IFTTrainer uses."""
    from transformers import Trainer
    from trl import SFTTrainer

    # Overridden: the sequence count of an accumulation window (transformers' private hook).
    params = list(inspect.signature(Trainer._get_num_items_in_batch).parameters)
    assert params == ["self", "batch_samples", "device"]
    # Called: preparing eval inputs, the autocast of compute_loss, the GA-scaling flag.
    for name in ("_prepare_inputs", "compute_loss_context_manager", "loss_is_scaled_for_ga"):
        assert hasattr(Trainer, name), name
    # Read or set: TRL's metric store, model-card attributes.
    trainer = small_trainer("unused")
    assert set(trainer._metrics) == {"train", "eval"}
    for name in ("_tag_names", "_name", "_paper"):
        assert hasattr(SFTTrainer, name), name
    assert "fused_lm_head" in inspect.signature(type(trainer.model).forward).parameters or hasattr(
        trainer.model, "forward"
    )  # lm_head="trl" passes fused_lm_head=True to the patched forward


@pytest.mark.parametrize("option", [dict(loss_type="dft"), dict(label_smoothing_factor=0.1)])  # MoE: test_moe.py
def test_options_the_ift_loss_would_ignore_are_refused(tmp_path, option):
    name = next(iter(option))
    with pytest.raises(UserError, match=name):
        IFTConfig(output_dir=str(tmp_path), **CPU, **option)


def test_compute_loss_func_is_refused(tmp_path):
    with pytest.raises(UserError, match="compute_loss_func"):
        small_trainer(tmp_path, compute_loss_func=lambda *a, **k: 0)


def test_fsdp1_is_refused_and_fsdp2_accepted(tmp_path):
    trainer = small_trainer(tmp_path)
    trainer.is_fsdp_enabled = True
    trainer.accelerator.state.fsdp_plugin = SimpleNamespace(fsdp_version=2)
    trainer._check_parallelism()
    trainer.accelerator.state.fsdp_plugin = SimpleNamespace(fsdp_version=1)
    with pytest.raises(UserError, match="FSDP2"):
        trainer._check_parallelism()


def _args(model_dir, data, out, *extra):
    return [
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "2",
        "--save_strategy",
        "no",
        "--bf16",
        "false",
        *extra,
    ]


def test_load_in_4bit_reaches_the_model_and_trains(tmp_path, chat_file):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    tok, model_dir = build_tokenizer(), tmp_path / "m"  # 4-bit blocks need widths of 64 and more
    build_model(len(tok), hidden_size=64, intermediate_size=128).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    trainer = build_trainer(
        "ift",
        *parse(
            "ift",
            _args(
                model_dir,
                chat_file,
                tmp_path / "q",
                "--load_in_4bit",
                "true",
                "--use_peft",
                "--lora_r",
                "4",
                "--lora_target_modules",
                "q_proj",
                "v_proj",
            ),
        ),
    )
    four_bit = [m for m in trainer.model.modules() if isinstance(m, Linear4bit)]
    assert four_bit, "the model was loaded in full precision"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert before and any(not torch.equal(before[n], after[n]) for n in before)  # the adapters trained


def test_load_in_4bit_without_bitsandbytes_or_peft_is_one_line(
    tmp_path, tiny_model_dir, chat_file, monkeypatch, capsys
):
    argv = _args(tiny_model_dir, chat_file, tmp_path / "q", "--load_in_4bit", "true")
    assert cli.main(["ift", *argv]) == 2
    assert "--use_peft" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as when it is not installed
    assert cli.main(["ift", *argv, "--use_peft"]) == 2
    err = capsys.readouterr().err
    assert "bitsandbytes" in err and "Traceback" not in err


def test_chat_template_without_generation_markers_is_one_line(tmp_path, chat_file, capsys):
    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    model_dir = tmp_path / "m"
    build_model(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    assert cli.main(["ift", *_args(model_dir, chat_file, tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "generation" in err and "--chat_template_path" in err and "Traceback" not in err
    # The shipped template, given by its path, makes the same run train.
    template = recipe_path("chat_templates/zephyr.jinja")
    assert cli.main(["ift", *_args(model_dir, chat_file, tmp_path / "o"), "--chat_template_path", str(template)]) == 0


def test_model_card_names_ift_and_the_paper(tmp_path, tiny_model_dir, chat_file):
    argv = [*_args(tiny_model_dir, chat_file, tmp_path / "o"), "--hub_model_id", "someone/ift-card"]
    assert cli.main(["ift", *argv]) == 0
    card = (tmp_path / "o" / "README.md").read_text()
    assert "IFT" in card and "Intuitive Fine-Tuning" in card and "2405.11870" in card
    assert "# Model Card for ift-card" in card  # the name TRL's trainers give it: the hub id's, not output_dir's


def test_eval_split_is_used_or_its_absence_refused(tmp_path, tiny_model_dir, chat_file, capsys):
    argv = _args(tiny_model_dir, chat_file, tmp_path / "o", "--eval_strategy", "steps", "--eval_steps", "1")
    assert cli.main(["ift", *argv]) == 2
    assert "--eval_dataset_name" in capsys.readouterr().err
    assert cli.main(["ift", *argv, "--eval_dataset_name", str(chat_file), "--dataset_test_split", "train"]) == 0
    import json

    history = json.loads((tmp_path / "o" / "trainer_state.json").read_text())["log_history"]
    assert any("eval_loss" in h for h in history)


def test_recipes_command_lists_and_resolves(capsys):
    assert cli.main(["recipes"]) == 0
    listed = capsys.readouterr().out.split()
    assert "mistral-7b-ultrafeedback/ift.yaml" in listed and "chat_templates/zephyr.jinja" in listed
    assert cli.main(["recipes", "accelerate/zero3"]) == 0
    assert capsys.readouterr().out.strip().endswith("accelerate/zero3.yaml")
    assert cli.main(["recipes", "no/such"]) == 2


def test_padding_free_collator_keys_reach_both_forwards(tmp_path):
    """cu_seq_lens_*, max_length_* (flash-attention varlen) are passed on, not rebuilt per layer."""
    trainer = small_trainer(tmp_path)
    ids = torch.tensor([[1, 7, 8, 9, 1, 10, 11]])
    inputs = {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2]]),
        "cu_seq_lens_q": torch.tensor([0, 4, 7]),
        "cu_seq_lens_k": torch.tensor([0, 4, 7]),
        "max_length_q": 4,
        "max_length_k": 4,
    }
    trainer.compute_loss(trainer.model, inputs)  # the first micro-batch also runs the family checks' forwards
    seen = []
    handle = trainer.model.register_forward_pre_hook(lambda m, a, kw: seen.append(sorted(kw)), with_kwargs=True)
    try:
        trainer.compute_loss(trainer.model, inputs)
    finally:
        handle.remove()
    assert len(seen) == 2
    for keys in seen:
        assert {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"} <= set(keys)


def test_pure_bf16_weights_with_a_small_learning_rate_warn(tmp_path, tiny_model_dir, chat_file, caplog):
    import logging

    from iftune.train import warn_pure_bf16

    training_args = IFTConfig(output_dir=str(tmp_path), **CPU, learning_rate=5e-7)
    with caplog.at_level(logging.WARNING, logger="iftune"):
        warn_pure_bf16(SimpleNamespace(dtype="bfloat16", use_peft=False), training_args)
        warn_pure_bf16(SimpleNamespace(dtype="float32", use_peft=False), training_args)
    assert len([r for r in caplog.records if "fp32 master weights" in r.getMessage()]) == 1


def test_preference_methods_take_a_chat_template_path(tmp_path, preference_file, capsys):
    """DPOConfig has no chat_template_path: `iftune dpo` adds it, for base models without a template."""
    tok = build_tokenizer()
    tok.chat_template = None
    model_dir = tmp_path / "m"
    build_model(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    argv = _args(model_dir, preference_file, tmp_path / "o")
    assert cli.main(["dpo", *argv, "--chat_template_path", str(tmp_path / "none.jinja")]) == 2
    err = capsys.readouterr().err
    assert "--chat_template_path" in err and "Traceback" not in err
    template = recipe_path("chat_templates/zephyr.jinja")
    assert cli.main(["dpo", *argv, "--chat_template_path", str(template)]) == 0
    assert "<|assistant|>" in (tmp_path / "o" / "chat_template.jinja").read_text()
