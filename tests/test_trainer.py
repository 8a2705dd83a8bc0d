"""IFTConfig / IFTTrainer: the loss, gradient accumulation, processes, resume, LoRA, packing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from conftest import (
    ACCELERATE_TWO,
    CPU,
    build_model,
    build_tokenizer,
    conversations,
    first_batch,
    make_trainer,
    run_offline,
    write_jsonl,
)
from iftune.objective import ift_loss
from iftune.trainer import IFTConfig, IFTTrainer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "train.py"
# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_lambda", 1.5),
        ("min_lambda", -0.1),
        ("gamma", 2.0),
        ("norm", "L3"),
        ("side", "up"),
        ("propagation", "x"),
        ("intuition", "beam"),
        ("lambda_schedule", "cosine"),
        ("intuition_embeddings", "cold"),
        ("intuition_embeddings", "frozen"),
        ("intuition_k", 0),
        ("head_chunk_size", 0),
        ("head_logits_budget_mb", -1.0),
        ("lm_head", "liger"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        IFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **{field: value})


def test_lm_head_default_follows_the_device_and_an_explicit_choice_is_kept(tmp_path, monkeypatch):
    def head(**kw):
        return IFTConfig(output_dir=str(tmp_path), bf16=False, **kw).lm_head

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert head() == head(use_cpu=False) == "iftune"
    assert head(lm_head="trl") == "trl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the default reads it
    assert head(use_cpu=True) == "iftune"
    assert head(use_cpu=True, lm_head="trl") == "trl"
    assert head(use_cpu=True, lm_head=None) == "iftune"


def test_lm_head_default_is_trl_where_training_runs_on_cuda(monkeypatch):
    from iftune.trainer import default_lm_head

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_lm_head(use_cpu=False) == "trl" and default_lm_head(use_cpu=True) == "iftune"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_lm_head(use_cpu=False) == "iftune"


def test_config_refuses_wrapped_packing(tmp_path):
    with pytest.raises(ValueError, match="wrapped"):
        IFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, packing=True, packing_strategy="wrapped")


def test_lambda_schedule_and_disturbance(tmp_path):
    cfg = IFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        min_lambda=0.0,
        max_lambda=0.4,
        lambda_schedule="linear",
        lambda_warmup_steps=4,
    )
    assert [cfg.lambda_at(s) for s in (0, 1, 2, 4, 10)] == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.4])
    noisy = IFTConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, lambda_disturb="normal", disturb_std=0.5, seed=3
    )
    draws = [noisy.lambda_at(s) for s in range(50)]
    assert draws == [noisy.lambda_at(s) for s in range(50)]  # seeded per step: resumable
    assert len(set(draws)) > 40 and all(0.0 <= d <= 1.0 for d in draws)
    assert abs(sum(draws) / 50 - 0.2) < 0.05
    assert noisy.lambda_at(7, disturb=False) == 0.2


def test_defaults_are_the_authors_recipe(tmp_path):
    cfg = IFTConfig(output_dir=str(tmp_path), use_cpu=True)
    assert (cfg.max_lambda, cfg.gamma, cfg.propagation, cfg.side, cfg.norm) == (0.2, 0.95, "loss", "left", "L1")
    assert cfg.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert cfg.include_num_input_tokens_seen == "non_padding" and cfg.ift_options().lam == cfg.max_lambda
    # assistant_only_loss: filled in from the data (True for conversations), never rewritten.
    assert cfg.assistant_only_loss is None
    assert make_trainer(tmp_path / "chat").args.assistant_only_loss is True
    rows = [{"prompt": "1+1=", "completion": "2"}] * 4
    assert make_trainer(tmp_path / "pc", rows=rows).args.assistant_only_loss is False
    with pytest.raises(ValueError, match="assistant_only_loss true needs conversational data"):
        make_trainer(tmp_path / "explicit", rows=rows, assistant_only_loss=True)


# ---------------------------------------------------------------- the loss in the trainer


def test_trains_only_assistant_turns_and_lam0_gamma0_is_sft(tmp_path):
    trainer = make_trainer(tmp_path, max_lambda=0.0, min_lambda=0.0, gamma=0.0, per_device_train_batch_size=4)
    batch = first_batch(trainer)
    labels = batch["labels"]
    assert (labels == -100).any() and (labels != -100).any()  # prompts are masked
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
    mask = labels[:, 1:] != -100
    expected = (-(lp * mask).sum(-1) / mask.sum(-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert trainer._metrics["train"]["lambda"] == [0.0]
    logs = {}
    trainer.log(logs)
    assert logs["sft_loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert logs["intuitive_nll"] == pytest.approx(expected.item(), abs=1e-5)  # lam 0: the same inputs


@pytest.mark.parametrize("head", [dict(head_chunk_size=3), dict(lm_head="trl")])
def test_head_paths_change_cost_not_the_loss_or_gradient(tmp_path, head):
    results = []
    for name, options in (("default", {}), ("other", head)):
        trainer = make_trainer(tmp_path / name, per_device_train_batch_size=4, **options)
        loss = trainer.compute_loss(trainer.model, first_batch(trainer))
        loss.backward()
        results.append((loss.item(), trainer.model.lm_head.weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-4)


def test_logs_ift_metrics_with_trl_lines(tmp_path, caplog):
    trainer = make_trainer(tmp_path, max_steps=2, per_device_train_batch_size=4)
    with caplog.at_level("INFO", logger="iftune"):
        trainer.train()
    # The first line says what the logged losses are.
    assert any(r.getMessage().startswith("IFT logs: loss = the objective") for r in caplog.records)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for key in (
        "loss",
        "sft_loss",
        "intuitive_nll",
        "lambda",
        "intuition_accuracy",
        "num_input_tokens_seen",
        "grad_norm",
    ):
        assert key in logs[0], key
    assert logs[0]["lambda"] == pytest.approx(0.2)


def test_metrics_of_a_logging_window_are_sums_over_counts(tmp_path):
    """Over a window of micro-batches of different sizes, each logged metric is its sum over
    every sequence (or token) divided by their count, as one big batch would give it."""
    trainer = make_trainer(tmp_path, per_device_train_batch_size=5, rows=conversations(8, seed=2))
    loader = iter(trainer.get_train_dataloader())
    outs = []
    for _ in range(2):
        batch = trainer._prepare_inputs(next(loader))
        trainer.compute_loss(trainer.model, batch)
        outs.append(ift_loss(trainer.model, batch["input_ids"], batch["labels"], batch["attention_mask"]))
    logs = {}
    trainer.log(logs)
    seqs = sum(int(o.n_sequences) for o in outs)
    assert logs["sft_loss"] == pytest.approx(sum(o.sft_loss_sum.item() for o in outs) / seqs, rel=1e-6)
    assert logs["intuition_accuracy"] == pytest.approx(
        sum(int(o.n_correct) for o in outs) / sum(int(o.n_tokens) for o in outs), rel=1e-6
    )
    # Not the mean of the two micro-batches' means, unless they happen to agree.
    per_batch = [o.sft_loss.item() for o in outs]
    if outs[0].n_sequences != outs[1].n_sequences and per_batch[0] != per_batch[1]:
        assert logs["sft_loss"] != pytest.approx(sum(per_batch) / 2, rel=1e-9)
    empty = {}
    trainer.log(empty)  # the window starts again after a log
    assert "sft_loss" not in empty


def _one_update(tmp_path, name, **overrides) -> dict:
    tok = build_tokenizer()
    model = build_model(len(tok)).double()
    trainer = make_trainer(
        tmp_path / name,
        model=model,
        rows=conversations(8, seed=5),
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        **overrides,
    )
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    big = _one_update(tmp_path, "big", per_device_train_batch_size=4, gradient_accumulation_steps=1)
    acc = _one_update(tmp_path, "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    start = build_model(len(build_tokenizer())).double().state_dict()
    assert any((big[k] - start[k]).abs().max() > 1e-3 for k in big)  # the update is not trivial
    for k in big:
        torch.testing.assert_close(acc[k], big[k], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- through real processes


_run = run_offline


def _train_args(model_dir, data, out, **extra) -> list[str]:
    args = {
        "model_name_or_path": model_dir,
        "dataset_name": data,
        "output_dir": out,
        "use_cpu": "true",
        "report_to": "none",
        "disable_tqdm": "true",
        "logging_steps": "1",
        "seed": "11",
        **extra,
    }
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def _weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def model64_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny64")
    tok = build_tokenizer()
    build_model(len(tok)).double().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, model64_dir, chat_file):
    common = dict(
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0,
        dtype="auto",
        save_strategy="no",
    )
    one = tmp_path / "one"
    _run(
        [
            sys.executable,
            str(SCRIPT),
            "ift",
            *_train_args(model64_dir, chat_file, one, per_device_train_batch_size=4, **common),
        ]
    )
    two = tmp_path / "two"
    _run(
        [
            *ACCELERATE_TWO,
            "--mixed_precision",
            "no",
            str(SCRIPT),
            "ift",
            *_train_args(model64_dir, chat_file, two, per_device_train_batch_size=2, **common),
        ]
    )
    a, b = _weights(one), _weights(two)
    start = load_file(str(model64_dir / "model.safetensors"))
    assert any((a[k] - start[k]).abs().max() > 1e-3 for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_two_processes_log_the_one_process_metrics(tmp_path):
    """Ranks whose trained-token counts differ by 10x, and whose intuition accuracy differs,
    log what one process logs on the whole batch: metrics are sums and counts gathered over
    processes, not a mean of per-rank means."""
    rows = conversations(4, seed=3)
    for i, row in enumerate(rows):  # sequential sampling: rows 0-1 go to rank 0, rows 2-3 to rank 1
        answer = row["messages"][1]["content"].split()[:2]
        row["messages"][1]["content"] = " ".join(answer * (20 if i < 2 else 1))
    data = write_jsonl(tmp_path / "uneven.jsonl", rows)
    tok = build_tokenizer()
    tokens = [len(tok(r["messages"][1]["content"])["input_ids"]) for r in rows]
    assert sum(tokens[:2]) >= 10 * sum(tokens[2:])
    # A model that has learnt the long answers' repetition, so that rank 0's accuracy is high
    # and rank 1's low: a mean of the two would differ from the token-weighted accuracy.
    trainer = make_trainer(
        tmp_path / "warm", rows=rows[:2], max_steps=40, learning_rate=3e-2, per_device_train_batch_size=2
    )
    trainer.train()
    model_dir = tmp_path / "model"
    trainer.model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    common = dict(max_steps=1, save_strategy="no", train_sampling_strategy="sequential", learning_rate=1e-9)
    one, two = tmp_path / "one", tmp_path / "two"
    _run(
        [
            sys.executable,
            str(SCRIPT),
            "ift",
            *_train_args(model_dir, data, one, per_device_train_batch_size=4, **common),
        ]
    )
    _run(
        [
            *ACCELERATE_TWO,
            "--mixed_precision",
            "no",
            str(SCRIPT),
            "ift",
            *_train_args(model_dir, data, two, per_device_train_batch_size=2, **common),
        ]
    )
    logged = [json.loads((out / "trainer_state.json").read_text())["log_history"][0] for out in (one, two)]
    assert 0.3 < logged[0]["intuition_accuracy"] < 0.99  # the ranks differ: the test can tell the two means apart
    for key in ("sft_loss", "intuitive_nll", "intuition_accuracy", "loss"):
        assert logged[1][key] == pytest.approx(logged[0][key], rel=1e-6), key


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tmp_path, tiny_model_dir, chat_file):
    common = dict(
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        lambda_schedule="linear",
        min_lambda=0.05,
        max_lambda=0.3,
        lambda_warmup_steps=3,
        lambda_disturb="normal",
        disturb_std=0.3,
    )
    full = tmp_path / "full"
    _run([sys.executable, str(SCRIPT), "ift", *_train_args(tiny_model_dir, chat_file, full, **common)])
    cut = tmp_path / "cut"
    killed = _run(
        [
            sys.executable,
            str(SCRIPT),
            "ift",
            "--kill_at_step",
            "2",
            *_train_args(tiny_model_dir, chat_file, cut, **common),
        ],
        check=False,
    )
    assert killed.returncode == -9 and (cut / "checkpoint-2").is_dir() and not (cut / "model.safetensors").exists()
    _run(
        [
            sys.executable,
            "-m",
            "iftune.cli",
            "ift",
            *_train_args(tiny_model_dir, chat_file, cut, resume_from_checkpoint=cut / "checkpoint-2", **common),
        ]
    )
    a, b = _weights(full), _weights(cut)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    # The token count continues from the checkpoint instead of restarting at 0.
    seen = [
        json.loads((d / "trainer_state.json").read_text())["log_history"][-1]["num_input_tokens_seen"]
        for d in (full, cut)
    ]
    assert seen[0] == seen[1] > 0


def test_detached_intuition_embeddings_leave_an_untied_input_table_untrained(tmp_path):
    """The reference mixes embeddings without gradient: an untied model's input table never trains."""

    def embed_change(mode: str) -> float:
        tok = build_tokenizer()
        model = build_model(len(tok))
        start = model.get_input_embeddings().weight.detach().clone()
        trainer = make_trainer(
            tmp_path / mode, model=model, intuition_embeddings=mode, learning_rate=0.1, per_device_train_batch_size=4
        )
        trainer.train()
        return (trainer.model.get_input_embeddings().weight - start).abs().max().item()

    assert embed_change("detached") == 0.0
    assert embed_change("live") > 1e-4


def test_sampled_intuition_and_evaluation(tmp_path):
    rows = conversations(8)
    tok = build_tokenizer()
    trainer = IFTTrainer(
        model=build_model(len(tok)),
        processing_class=tok,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows[:4]),
        args=IFTConfig(
            **{
                **CPU,
                "output_dir": str(tmp_path),
                "max_steps": 2,
                "intuition": "sample",
                "intuition_temperature": 0.7,
                "per_device_train_batch_size": 4,
            }
        ),
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"])) and "eval_sft_loss" in metrics
