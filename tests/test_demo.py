"""`iftune demo`: base-model builder, data set, scorer, and one tiny end-to-end run."""

from __future__ import annotations

import json
import re

import pytest

from iftune.demo import base as demo_base
from iftune.demo import data as demo_data
from iftune.demo import score as demo_score

TINY = demo_base.BaseSpec(
    hidden_size=16,
    num_hidden_layers=1,
    intermediate_size=32,
    num_attention_heads=2,
    corpus_docs=300,
    batch_size=8,
    pretrain_steps=3,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("IFTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return demo_base.build_base(TINY, tmp_path_factory.mktemp("cache"))


# ------------------------------------------------------------------ base model


def test_base_loads_with_auto_classes(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert tiny_base.name == f"demo-base-{TINY.key()}"
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert model.config.hidden_size == 16 and model.config.vocab_size == len(tok)
    text = "3 a +2 = 5 ; answer 5"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.eos_token == "<|end|>" and tok.pad_token_id is not None


def test_chat_template_marks_exactly_the_answer(tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    example = demo_data.to_messages(demo_data.Problem(3, (("+", 2), ("*", 3))))
    out = tok.apply_chat_template(example["messages"], return_dict=True, return_assistant_tokens_mask=True)
    tokens = tok.convert_ids_to_tokens(out["input_ids"])
    trained = [t for t, m in zip(tokens, out["assistant_masks"]) if m]
    assert " ".join(trained) == example["messages"][1]["content"] + " <|end|>"
    prompt = tok.apply_chat_template(example["messages"][:1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|assistant|> ")


def test_base_is_cached_and_deterministic(tiny_base, tmp_path):
    stamp = (tiny_base / "config.json").stat().st_mtime_ns
    assert demo_base.build_base(TINY, tiny_base.parent) == tiny_base
    assert (tiny_base / "config.json").stat().st_mtime_ns == stamp  # not rebuilt
    again = demo_base.build_base(TINY, tmp_path)  # same spec, fresh cache: same weights
    from safetensors.torch import load_file

    a, b = load_file(tiny_base / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IFTUNE_CACHE", str(tmp_path / "x"))
    assert demo_base.cache_root() == tmp_path / "x"
    monkeypatch.delenv("IFTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_base.cache_root() == tmp_path / "xdg" / "iftune"
    assert demo_base.BaseSpec(seed=1).key() != demo_base.BaseSpec(seed=2).key()


# ------------------------------------------------------------------ data


def recompute(prompt: str) -> tuple[list[str], str]:
    """Solve a prompt independently of the generator: parse it and apply Python's arithmetic."""
    words = prompt.split()
    assert words[0] == "solve"
    value, steps = int(words[1]), []
    for label, op in zip(words[2::2], words[3::2]):
        sign, operand = op[0], int(op[1:])
        result = {"+": value + operand, "-": value - operand, "*": value * operand}[sign] % 10
        steps.append(f"{value} {label} {op} = {result}")
        value = result
    return steps, str(value)


def test_dataset_answers_are_correct():
    train, heldout = demo_data.make_splits(500, 200)
    for ex in train + heldout:
        user, assistant = ex["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        steps, answer = recompute(user["content"])
        assert demo_data.TASK_MIN_STEPS <= len(steps) <= demo_data.TASK_MAX_STEPS
        assert assistant["content"] == " ; ".join(steps + [f"answer {answer}"])
    assert not {e["messages"][0]["content"] for e in train} & {e["messages"][0]["content"] for e in heldout}
    assert demo_data.make_splits(500, 200) == (train, heldout)  # fixed seed: same data


def test_pretraining_corpus_is_correct_and_shorter_than_the_task():
    for doc in demo_data.pretraining_corpus(400, seed=0):
        for fact in re.findall(r"(\d) ([a-h] )?([+*-]\d) = (\d)", doc):
            a, _, op, c = fact
            assert int(c) == demo_data.apply(op[0], int(a), int(op[1:]))
        if doc.startswith("solve"):
            prompt, answer = doc.split(" : ")
            steps, final = recompute(prompt)
            assert len(steps) <= demo_data.PRETRAIN_MAX_STEPS < demo_data.TASK_MIN_STEPS
            assert answer == " ; ".join(steps + [f"answer {final}"])


# ------------------------------------------------------------------ scorer


def test_scorer_on_known_strings():
    ref = "3 a +2 = 5 ; 5 b *3 = 5 ; 5 c -1 = 4 ; answer 4"
    assert demo_score.final_answer(ref) == "4"
    assert demo_score.final_answer("3 a +2 = 5 ; answer") is None
    assert demo_score.final_answer("answer 4 ; 5 c -1 = 4") is None  # must end the text
    assert demo_score.score_one(ref, ref) == (True, 1.0)
    # early error: every later step wrong, final wrong
    assert demo_score.score_one("3 a +2 = 6 ; 6 b *3 = 8 ; 8 c -1 = 7 ; answer 7", ref) == (False, 0.0)
    # late error: two of three steps
    em, acc = demo_score.score_one("3 a +2 = 5 ; 5 b *3 = 5 ; 5 c -1 = 3 ; answer 3", ref)
    assert (em, acc) == (False, pytest.approx(2 / 3))
    # right answer by luck, wrong steps; extra spaces are not an error
    assert demo_score.score_one("3  a +2 = 5 ; answer  4 ", ref) == (True, pytest.approx(1 / 3))
    s = demo_score.score([ref, "answer 1"], [ref, ref])
    assert (s.exact_match, s.step_accuracy) == (0.5, 0.5)


def test_summary_pairs_by_seed():
    from iftune.demo import RunResult, summarize

    runs = [
        RunResult("sft", 0, 0.2, 0.5, 1.0),
        RunResult("sft", 1, 0.4, 0.6, 1.0),
        RunResult("ift", 0, 0.3, 0.5, 1.0),
        RunResult("ift", 1, 0.4, 0.8, 1.0),
    ]
    s = summarize(runs)
    assert s["sft"]["exact_match"]["mean"] == pytest.approx(0.3)
    assert s["sft"]["exact_match"]["std"] == pytest.approx(0.1414213, rel=1e-5)
    diff = s["ift"]["exact_match_minus_sft"]
    assert diff["per_seed"] == pytest.approx([0.1, 0.0]) and diff["mean"] == pytest.approx(0.05)
    assert s["ift"]["step_accuracy_minus_sft"]["mean"] == pytest.approx(0.1)


# ------------------------------------------------------------------ end to end


def test_demo_end_to_end(monkeypatch, tmp_path, capsys):
    from iftune import demo
    from iftune.cli import main

    monkeypatch.setattr(demo, "BASE_SPEC", TINY)
    out = tmp_path / "out"
    assert main(["demo", "--seeds", "1", "--steps", "5", "--output-dir", str(out)]) == 0
    report = json.loads((out / "demo.json").read_text())
    assert {r["method"] for r in report["runs"]} == {"sft", "ift", "ift_gamma0"}
    for run in report["runs"]:
        assert [s for s, _ in run["loss"]] == [1, 2, 3, 4, 5]
        assert 0.0 <= run["exact_match"] <= 1.0 and 0.0 <= run["step_accuracy"] <= 1.0
    assert "exact_match_minus_sft" in report["summary"]["ift"]
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "ift_gamma0" in printed and "exact match" in printed
    assert main(["demo", "--seeds", "1", "--steps", "2", "--output_dir", str(out)]) == 0  # a rerun rewrites runs/


def test_demo_rejects_bad_options():
    from iftune.demo import main
    from iftune.errors import UserError

    with pytest.raises(UserError, match="--steps"):
        main(["--steps", "0"])


def test_shipped_base_is_the_default_build():
    from dataclasses import asdict

    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((demo_base.SHIPPED_BASE / "iftune-demo-base.json").read_text())
    assert info["spec"] == asdict(demo_base.BaseSpec()) and info["build_version"] == demo_base.BUILD_VERSION
    assert demo_base.base_model() == demo_base.SHIPPED_BASE  # no build, whatever the cache holds
    assert demo_base.base_model(TINY) != demo_base.SHIPPED_BASE
    model = AutoModelForCausalLM.from_pretrained(demo_base.SHIPPED_BASE)
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    assert AutoTokenizer.from_pretrained(demo_base.SHIPPED_BASE).chat_template == demo_base.CHAT_TEMPLATE


def test_output_dir_takes_both_spellings():
    from iftune.demo import parse_args

    assert parse_args(["--output_dir", "x"]).output_dir == parse_args(["--output-dir", "x"]).output_dir == "x"
