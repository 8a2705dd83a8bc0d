"""`iftune sft|ift|dpo|orpo` end to end on tiny local models and data, recipes, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from iftune import cli, train

RECIPES = sorted((Path(train.__file__).parent / "recipes").glob("*/*.yaml"))
RECIPES = [r for r in RECIPES if r.parent.name != "accelerate"]


def run_cli(*args) -> int:
    return cli.main([str(a) for a in args])


def base_args(model_dir, data, out, steps=2, **extra) -> list[str]:
    args = {
        "model_name_or_path": model_dir,
        "dataset_name": data,
        "output_dir": out,
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "use_cpu": "true",
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": "true",
        "logging_steps": 1,
        **extra,
    }
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


@pytest.mark.parametrize("method", ["sft", "ift", "dpo", "orpo"])
def test_each_method_trains_and_saves_a_loadable_model(
    method, tiny_model_dir, chat_file, preference_file, tmp_path, monkeypatch
):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ended = []
    monkeypatch.setattr(Accelerator, "end_training", lambda self: ended.append(self))
    data = preference_file if method in ("dpo", "orpo") else chat_file
    out = tmp_path / method
    assert run_cli(method, *base_args(tiny_model_dir, data, out)) == 0
    assert len(ended) == 1  # the script's teardown, once, after the model is saved
    state = json.loads((out / "trainer_state.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))
    assert changed, "training did not change the weights"
    assert state["global_step"] == 2 and any("loss" in h for h in state["log_history"])


def test_ift_lora_saves_an_adapter(tiny_model_dir, chat_file, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "lora"
    assert (
        run_cli(
            "ift",
            *base_args(tiny_model_dir, chat_file, out, use_peft="true", lora_r=4, lora_alpha=8, learning_rate=0.05),
            "--lora_target_modules",
            "q_proj",
            "v_proj",
        )
        == 0
    )
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it trained


def test_preference_data_trains_sft_and_ift_on_chosen(preference_file):
    from iftune.data import load_training_data

    rows = [json.loads(line) for line in preference_file.read_text().splitlines()]
    data = load_training_data([str(preference_file)], "ift")
    assert data.column_names == ["messages"]
    assert data[0]["messages"] == rows[0]["prompt"] + rows[0]["chosen"]


def test_mixture_with_sample_counts(chat_file, tmp_path):
    from iftune.data import load_training_data

    other = write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"messages": [{"role": "user", "content": "dog"}, {"role": "assistant", "content": f"cat {i}"}]}
            for i in range(10)
        ],
    )
    data = load_training_data([str(chat_file), str(other)], "sft", [-1, 3])
    assert len(data) == 16 + 3
    assert sum(r["messages"][0]["content"] == "dog" for r in data) == 3


def test_packing_keeps_each_document_its_own(tiny_model_dir, chat_file, tmp_path):
    """A packed batch gives the same IFT loss as its documents one by one: no prediction,
    weight or normalisation crosses a document boundary."""
    from iftune.objective import ift_loss

    args = train.parse(
        "ift",
        base_args(
            tiny_model_dir,
            chat_file,
            tmp_path / "p",
            packing="true",
            max_length=64,
            per_device_train_batch_size=4,
            dtype="float32",
        ),
    )
    trainer = train.build_trainer("ift", *args)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    pos = batch["position_ids"]
    assert "attention_mask" not in batch and int((pos == 0).sum()) > 1
    model = trainer.model.eval()
    packed = ift_loss(model, batch["input_ids"], batch["labels"], position_ids=pos)
    starts = (pos[0] == 0).nonzero().flatten().tolist() + [pos.shape[1]]
    per_doc = []
    for a, b in zip(starts[:-1], starts[1:]):
        ids, lab = batch["input_ids"][:, a:b], batch["labels"][:, a:b]
        if (lab[:, 1:] != -100).any():
            per_doc.append(ift_loss(model, ids, lab).loss)
    assert packed.n_sequences == len(per_doc)
    assert packed.loss.item() == pytest.approx(torch.stack(per_doc).mean().item(), abs=1e-5)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipes_parse_and_build(recipe, tiny_model_dir, chat_file, preference_file, tmp_path):
    method = recipe.stem
    data = preference_file if method in ("dpo", "orpo") else chat_file
    argv = [
        "--config",
        str(recipe),
        *base_args(
            tiny_model_dir,
            data,
            tmp_path / "out",
            bf16="false",
            dtype="float32",
            gradient_checkpointing="false",
            dataset_train_split="train",
            dataset_num_samples=-1,
        ),
    ]
    data_args, training_args, model_args = train.parse(method, argv)
    assert training_args.learning_rate > 0 and training_args.num_train_epochs == 3
    if method == "ift":
        assert (training_args.max_lambda, training_args.gamma, training_args.optim) == (0.2, 0.95, "rmsprop")
    trainer = train.build_trainer(method, data_args, training_args, model_args)
    assert type(trainer).__name__.lower().startswith(method)


# ---------------------------------------------------------------- bad input: one line, exit 2


def expect_error(capsys, args, *fragments) -> str:
    code = run_cli(*args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, last
    return last


def test_malformed_json_line(capsys, tiny_model_dir, tmp_path, chat_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chat_file.read_text().splitlines()[0] + '\n{"messages": [oops\n')
    expect_error(capsys, ["ift", *base_args(tiny_model_dir, bad, tmp_path / "o")], "bad.jsonl:2", "malformed JSON")


def test_missing_fields(capsys, tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "q.jsonl", [{"question": "two plus two"}])
    expect_error(capsys, ["sft", *base_args(tiny_model_dir, bad, tmp_path / "o")], "row 1", "messages")
    bad = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b"}])
    expect_error(capsys, ["dpo", *base_args(tiny_model_dir, bad, tmp_path / "o")], "row 1", "rejected")


def test_missing_file_and_model(capsys, tiny_model_dir, chat_file, tmp_path):
    expect_error(
        capsys,
        ["ift", *base_args(tiny_model_dir, tmp_path / "nope.jsonl", tmp_path / "o")],
        "nope.jsonl",
        "no such file",
    )
    expect_error(capsys, ["ift", *base_args(tmp_path / "no-model", chat_file, tmp_path / "o")], "no-model")


def test_empty_completion(capsys, tiny_model_dir, tmp_path):
    bad = write_jsonl(
        tmp_path / "e.jsonl", [{"prompt": "the sky", "completion": "blue"}, {"prompt": "the cat", "completion": "  "}]
    )
    expect_error(capsys, ["ift", *base_args(tiny_model_dir, bad, tmp_path / "o")], "row 2", "completion", "empty")


def test_over_long_prompt_is_dropped_not_nan(capsys, caplog, tiny_model_dir, chat_file, tmp_path):
    rows = [json.loads(x) for x in chat_file.read_text().splitlines()]
    rows[0]["messages"][0]["content"] = " ".join(["the"] * 80)
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "o"
    with caplog.at_level("WARNING"):
        assert run_cli("ift", *base_args(tiny_model_dir, data, out, max_length=32, steps=3)) == 0
    assert "dropped 1 of 16 rows" in caplog.text
    assert all(
        torch.isfinite(p).all()
        for p in __import__("safetensors.torch").torch.load_file(str(out / "model.safetensors")).values()
    )


def test_unknown_method(capsys):
    assert run_cli("ppo") == 2
    assert "unknown command 'ppo'" in capsys.readouterr().err


def test_bad_option_values(capsys, tiny_model_dir, chat_file, tmp_path):
    expect_error(
        capsys,
        ["ift", *base_args(tiny_model_dir, chat_file, tmp_path / "o"), "--max_lambda", "1.5"],
        "max_lambda",
        "[0, 1]",
    )
    expect_error(capsys, ["ift", *base_args(tiny_model_dir, chat_file, tmp_path / "o"), "--norm", "L3"], "norm", "L1")


def test_option_combination_trl_refuses_is_one_line(capsys, tiny_model_dir, chat_file, tmp_path):
    # TRL's SFTTrainer raises ValueError for padding_free without packing (max_length unenforced).
    expect_error(
        capsys,
        ["ift", *base_args(tiny_model_dir, chat_file, tmp_path / "o"), "--padding_free", "true"],
        "IFTTrainer:",
        "padding_free",
    )


def test_missing_config_file(capsys, tmp_path):
    expect_error(capsys, ["ift", "--config", tmp_path / "none.yaml"], "none.yaml")


# ---------------------------------------------------------------- issue 11: every bad input one line, before loading


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the run gets as far as building the trainer (tokenizer, data, model)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(train, "build_trainer", forbidden)


@pytest.mark.parametrize(
    "flag,value,steps,expected",
    [
        ("learning_rate", "-1", 2, "finite number > 0"),
        ("learning_rate", "0", 2, "finite number > 0"),
        ("learning_rate", "inf", 2, "finite number > 0"),
        ("learning_rate", "nan", 2, "finite number > 0"),
        ("per_device_train_batch_size", "0", 2, "integer >= 1"),
        ("gradient_accumulation_steps", "0", 2, "integer >= 1"),
        ("num_train_epochs", "-1", -1, "number > 0"),
        ("num_train_epochs", "0", -1, "number > 0"),
        ("max_steps", "0", 2, "-1"),
    ],
)
def test_bad_values_refused_before_the_model_loads(
    capsys, no_model_load, tiny_model_dir, chat_file, tmp_path, flag, value, steps, expected
):
    out = tmp_path / "o"
    args = base_args(tiny_model_dir, chat_file, out, steps=steps, **{flag: value})
    expect_error(capsys, ["ift", *args], f"--{flag} {value if flag != 'learning_rate' else float(value)}", expected)
    assert not out.exists()


def test_wrong_type_is_one_line_naming_flag_and_type(capsys, tiny_model_dir, chat_file, tmp_path):
    code = run_cli("ift", *base_args(tiny_model_dir, chat_file, tmp_path / "o"), "--learning_rate", "abc")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "usage:" not in err
    line = err.strip().splitlines()[-1]
    assert "--learning_rate" in line and "invalid float value: 'abc'" in line


def test_intuition_k_larger_than_vocabulary(capsys, no_model_load, tiny_model_dir, chat_file, tmp_path):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_model_dir).vocab_size
    args = base_args(tiny_model_dir, chat_file, tmp_path / "o", intuition="rank", intuition_k=vocab + 1)
    expect_error(capsys, ["ift", *args], f"--intuition_k {vocab + 1}", f"vocabulary ({vocab} tokens)")


def test_max_length_beyond_positions_warns_once(caplog, tiny_model_dir, chat_file, tmp_path):
    from transformers import AutoConfig

    limit = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    with caplog.at_level("WARNING"):
        assert run_cli("sft", *base_args(tiny_model_dir, chat_file, tmp_path / "o", steps=1, max_length=limit + 1)) == 0
    warnings = [r.getMessage() for r in caplog.records if "--max_length" in r.getMessage()]
    assert len(warnings) == 1 and f"maximum positions ({limit})" in warnings[0]


def digests(folder: Path) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("method", ["ift", "dpo"])
def test_non_empty_output_dir_is_refused_and_kept(
    capsys, no_model_load, tiny_model_dir, chat_file, preference_file, tmp_path, method
):
    out = tmp_path / "earlier"
    shutil.copytree(tiny_model_dir, out)  # another model, already there
    (out / "notes.txt").write_text("mine")
    before = digests(out)
    data = preference_file if method == "dpo" else chat_file
    expect_error(
        capsys,
        [method, *base_args(tiny_model_dir, data, out)],
        f"--output_dir {out}",
        "not empty",
        "--overwrite_output_dir true",
    )
    assert digests(out) == before


def test_overwrite_output_dir_true_writes_over(tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "earlier"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli("sft", *base_args(tiny_model_dir, chat_file, out, steps=1, overwrite_output_dir="true")) == 0
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"


def test_output_dir_that_is_a_file(capsys, no_model_load, tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(b"data")
    expect_error(capsys, ["ift", *base_args(tiny_model_dir, chat_file, out)], f"--output_dir {out}", "is a file")
    assert out.read_bytes() == b"data"
    expect_error(capsys, ["ift", *base_args(tiny_model_dir, chat_file, out / "sub")], "--output_dir", "is a file")


# Tests run as root, for whom permission bits do not stop a write; /sys (sysfs) refuses to create
# files even for root, so it stands in for a read-only filesystem (the check writes, it does not
# trust os.access, which says True there).
@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs /sys")
@pytest.mark.parametrize("where", ["/sys/iftune-out", "/sys/iftune-out/nested"])
def test_unwritable_output_dir_refused_before_training(capsys, no_model_load, tiny_model_dir, chat_file, where):
    expect_error(
        capsys, ["ift", *base_args(tiny_model_dir, chat_file, where)], f"--output_dir {where}", "cannot write in /sys"
    )


def test_resume_from_a_directory_that_is_not_a_checkpoint(capsys, no_model_load, tiny_model_dir, chat_file, tmp_path):
    expect_error(
        capsys,
        ["ift", *base_args(tiny_model_dir, chat_file, tmp_path / "o"), "--resume_from_checkpoint", tiny_model_dir],
        "--resume_from_checkpoint",
        "not a checkpoint",
        "trainer_state.json",
    )
    expect_error(
        capsys,
        ["ift", *base_args(tiny_model_dir, chat_file, tmp_path / "o"), "--resume_from_checkpoint", tmp_path / "none"],
        "no such checkpoint directory",
    )


def test_resume_true_without_a_checkpoint(capsys, no_model_load, tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    expect_error(
        capsys,
        ["ift", *base_args(tiny_model_dir, chat_file, out), "--resume_from_checkpoint", "true"],
        "--resume_from_checkpoint true",
        "no checkpoint-N",
        str(out),
    )


@pytest.mark.parametrize("method", ["ift", "sft"])
def test_resume_true_continues_in_the_same_output_dir(tiny_model_dir, chat_file, tmp_path, method):
    out = tmp_path / "o"
    args = base_args(tiny_model_dir, chat_file, out, steps=2, save_strategy="steps", save_steps=1)
    assert run_cli(method, *args) == 0
    assert (
        run_cli(
            method,
            *base_args(tiny_model_dir, chat_file, out, steps=3, save_strategy="steps", save_steps=1),
            "--resume_from_checkpoint",
            "true",
        )
        == 0
    )
    state = json.loads((out / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 3 and [h["step"] for h in logs] == [1, 2, 3]
    # The token count goes on from the checkpoint instead of restarting at 0.
    seen = [h["num_input_tokens_seen"] for h in logs]
    assert seen[0] < seen[1] < seen[2]


def test_output_dir_with_checkpoints_suggests_resuming(capsys, tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "o"
    (out / "checkpoint-2").mkdir(parents=True)
    expect_error(
        capsys,
        ["ift", *base_args(tiny_model_dir, chat_file, out)],
        "not empty",
        "--resume_from_checkpoint true",
        "--overwrite_output_dir true",
    )


def test_truncated_safetensors(capsys, no_model_load, tiny_model_dir, chat_file, tmp_path):
    model = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    expect_error(capsys, ["ift", *base_args(model, chat_file, tmp_path / "o")], str(weights), "truncated")


def test_config_yaml_syntax_error(capsys, tmp_path):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("learning_rate: 1.0e-5\nlr_scheduler_type: [cosine\nseed: 1\n")
    expect_error(capsys, ["ift", "--config", bad], f"--config {bad}:", "YAML syntax error")


def test_version(capsys):
    from iftune import __version__

    assert run_cli("--version") == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"iftune {__version__} (python ") and "torch " in out and "trl " in out


def test_ift_help_starts_with_a_short_summary(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_cli("ift", "--help")
    assert exit_.value.code == 0
    top = "\n".join(capsys.readouterr().out.splitlines()[:30])
    for flag in (
        "--model_name_or_path",
        "--dataset_name",
        "--output_dir",
        "--overwrite_output_dir",
        "--max_lambda 0.2",
        "--gamma 0.95",
        "--intuition greedy",
    ):
        assert flag in top, flag


@pytest.mark.parametrize("method", ["ift", "sft"])
@pytest.mark.parametrize(
    "lr,step,what,kept",
    [
        # AdamW's first update is lr / (1 - beta1) = 10 lr per weight: 1e31 is finite, the next
        # forward overflows, so step 2's gradient norm is NaN; 1e39 is already inf at step 1.
        (1e30, 2, "gradient norm", ["checkpoint-1"]),
        (1e38, 1, "weights", []),
    ],
)
def test_non_finite_run_stops_and_saves_no_nan_model(
    capsys, tiny_model_dir, chat_file, tmp_path, method, lr, step, what, kept
):
    """A run whose weights or gradients stop being finite stops at that step with one line, keeps
    only the finite checkpoints before it, and saves no final model."""
    from safetensors.torch import load_file

    out = tmp_path / "o"
    args = base_args(
        tiny_model_dir, chat_file, out, steps=4, learning_rate=lr, save_strategy="steps", save_steps=1, dtype="float32"
    )
    expect_error(capsys, [method, *args], f"step {step}:", what, "not finite")
    assert not (out / "model.safetensors").exists()
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == kept
    for checkpoint in checkpoints:
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model.safetensors")).values())


def test_non_finite_weights_after_the_last_step_are_not_saved(capsys, tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / "o"
    expect_error(
        capsys,
        ["ift", *base_args(tiny_model_dir, chat_file, out, steps=1, learning_rate=1e38)],
        "step 1:",
        "weights are not finite",
        "end of training",
    )
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("method", ["ift", "dpo"])
def test_every_row_dropped_by_max_length(capsys, tiny_model_dir, chat_file, preference_file, tmp_path, method):
    data = preference_file if method == "dpo" else chat_file
    expect_error(
        capsys,
        [method, *base_args(tiny_model_dir, data, tmp_path / "o", max_length=1)],
        "--max_length 1",
        "every one of the 16 training rows",
        "no trained token",
    )
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_argparse_commands_take_underscores_as_dashes():
    assert cli.dashed(["--output_dir", "a_b", "--max_new_tokens=3", "-x", "--", "--keep_me"]) == [
        "--output-dir",
        "a_b",
        "--max-new-tokens=3",
        "-x",
        "--",
        "--keep_me",
    ]
    from iftune.evaluation.generate import build_parser

    args = build_parser().parse_args(
        cli.dashed(["--model", "m", "--prompts", "p", "--output", "o", "--max_new_tokens", "3", "--batch_size", "2"])
    )
    assert (args.max_new_tokens, args.batch_size) == (3, 2)


def test_eval_wrong_type_is_one_line(capsys):
    pytest.importorskip("lm_eval")
    assert run_cli("eval", "--model", "m", "--limit", "abc") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--limit" in err[0] and "invalid float value: 'abc'" in err[0], err
