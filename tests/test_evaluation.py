"""`iftune eval` and `iftune generate` end to end on tiny local models and tasks (offline).

The stub models are real Llama checkpoints whose weights make every position predict one fixed
token: all token embeddings are equal and the blocks add nothing to the residual stream, so the
last hidden state is constant and `lm_head` picks the token. A model that always says the gold
letter must score exactly 1.0, one that always says another letter exactly 0.0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest

pytest.importorskip("lm_eval")
import torch

from conftest import write_jsonl
from iftune import cli
from iftune.evaluation import data as data_mod
from iftune.evaluation.report import LEADERBOARD, markdown_table, summarize
from iftune.evaluation.run import task_plan
from iftune.tiny import llama

GOLD, WRONG = "B", "D"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
WORDS = (
    list("ABCDEFGH")
    + list("1234")
    + [
        "Question",
        "Answer",
        ":",
        ".",
        "?",
        "with",
        "the",
        "letter",
        "of",
        "correct",
        "option",
        "which",
        "is",
        "sky",
        "sea",
        "sun",
        "red",
        "blue",
        "green",
    ]
)


def make_tokenizer(path: Path, chat: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[4:],
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return tok


def make_model(path: Path, tok, answer: str, chat: bool = True) -> Path:
    """A tiny Llama that predicts `answer` at every position, saved with its tokenizer."""
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = llama(len(tok), num_hidden_layers=1, num_key_value_heads=2, max_position_embeddings=1024, **ids)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0  # every token: same residual stream
        for layer in model.model.layers:  # blocks write nothing into the residual stream
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.convert_tokens_to_ids(answer), 0] = 5.0
    model.save_pretrained(path)
    make_tokenizer(path, chat=chat)
    return path


def make_adapter(path: Path, base: Path, tok, answer: str) -> Path:
    """A LoRA on lm_head that moves the base model's fixed answer to `answer`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=1, lora_alpha=1, target_modules=["lm_head"])
    )
    lm_head = model.base_model.model.lm_head
    with torch.no_grad():
        lm_head.lora_A["default"].weight.zero_()
        lm_head.lora_A["default"].weight[0, 0] = 1.0
        lm_head.lora_B["default"].weight.zero_()
        lm_head.lora_B["default"].weight[tok.convert_tokens_to_ids(answer), 0] = 20.0
    model.save_pretrained(path)
    return path


TINY_MC = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
"""
TINY_GEN = """\
task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    train: {gen}
    test: {gen}
output_type: generate_until
training_split: train
test_split: test
num_fewshot: 2
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 3
  do_sample: false
filter_list:
  - name: first-word
    filter:
      - function: regex
        regex_pattern: "(\\\\w+)"
      - function: take_first
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    """Keep the arrow files `datasets` builds, and our mirrors, out of the user's folders."""
    import datasets

    saved = datasets.config.HF_DATASETS_CACHE, data_mod.MIRRORS
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("datasets-cache")
    data_mod.MIRRORS = tmp_path_factory.mktemp("mirrors")
    yield
    datasets.config.HF_DATASETS_CACHE, data_mod.MIRRORS = saved


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalenv")
    tok = make_tokenizer(root / "tok")
    right = make_model(root / "right", tok, GOLD)
    wrong = make_model(root / "wrong", tok, WRONG)
    no_template = make_model(root / "plain", tok, GOLD, chat=False)
    adapter = make_adapter(root / "adapter", wrong, tok, GOLD)
    questions = ["which is the sky ?", "which is red ?", "which is the sea ?", "is the sun ?"]
    mc = write_jsonl(
        root / "mc.jsonl", [{"question": q, "choices": ["A", GOLD, "C", WRONG], "gold": 1} for q in questions]
    )
    gen = write_jsonl(root / "gen.jsonl", [{"question": q, "answer": GOLD} for q in questions])
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(TINY_MC.format(mc=mc))
    (tasks / "tiny_gen.yaml").write_text(TINY_GEN.format(gen=gen))
    return {"root": root, "right": right, "wrong": wrong, "plain": no_template, "adapter": adapter, "tasks": tasks}


def run_eval(env, out: Path, *extra: str, model: str = "right", tasks="tiny_mc,tiny_gen"):
    args = [
        "eval",
        "--model",
        str(env[model]),
        "--tasks",
        tasks,
        "--include-path",
        str(env["tasks"]),
        "--output-dir",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]
    return cli.main(args)


def scores(out: Path) -> dict[str, float]:
    summary = json.loads((out / "summary.json").read_text())
    return {task: row["value"] for task, row in summary["tasks"].items()}


def logged_prompts(out: Path, task: str) -> list[str]:
    (path,) = out.glob(f"samples_{task}_*.jsonl")
    return [json.loads(line)["arguments"]["gen_args_0"]["arg_0"] for line in path.read_text().splitlines()]


def test_right_model_scores_one_with_chat_template_and_outputs(env, tmp_path):
    out = tmp_path / "right"
    assert run_eval(env, out) == 0
    assert scores(out) == {"tiny_mc": 1.0, "tiny_gen": 1.0}
    assert list(out.glob("results_*.json")) and list(out.glob("samples_tiny_mc_*.jsonl"))
    results = json.loads(next(out.glob("results_*.json")).read_text())
    assert results["results"]["tiny_mc"]["acc,none"] == 1.0
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| Model | tiny_gen | tiny_mc | Avg. |"
    assert table[2] == "| right | 100.00 | 100.00 | 100.00 |"
    # chat template on, and the 2 few-shot examples are earlier turns of the conversation
    for prompt in logged_prompts(out, "tiny_gen"):
        assert prompt.startswith("<|user|> Question:") and prompt.endswith("<|assistant|>")
        assert prompt.count("<|user|>") == 3 and prompt.count(f"<|assistant|> {GOLD} <|end|>") == 2
    assert all(p.startswith("<|user|>") for p in logged_prompts(out, "tiny_mc"))


def test_wrong_model_scores_zero(env, tmp_path):
    assert run_eval(env, tmp_path, model="wrong") == 0
    assert scores(tmp_path) == {"tiny_mc": 0.0, "tiny_gen": 0.0}


def test_lora_adapter_is_applied(env, tmp_path):
    # the base model always answers wrongly; its adapter moves the answer to the gold letter
    assert run_eval(env, tmp_path, "--adapter", str(env["adapter"]), model="wrong") == 0
    assert scores(tmp_path) == {"tiny_mc": 1.0, "tiny_gen": 1.0}
    assert json.loads((tmp_path / "summary.json").read_text())["adapter"] == str(env["adapter"])
    assert (tmp_path / "results.md").read_text().splitlines()[2].startswith("| wrong + adapter |")


def test_no_chat_template_gives_plain_prompts(env, tmp_path):
    assert run_eval(env, tmp_path, "--no-chat-template", "--num-fewshot", "1", model="plain", tasks="tiny_gen") == 0
    assert scores(tmp_path) == {"tiny_gen": 1.0}
    prompts = logged_prompts(tmp_path, "tiny_gen")
    assert prompts and not any("<|" in p for p in prompts)
    # one few-shot example (the YAML's 2 overridden), in the same plain-text prompt
    assert all(p.startswith("Question:") and p.count("Question:") == 2 for p in prompts)


def test_tokenizer_without_template_is_a_one_line_error(env, tmp_path, capsys):
    assert run_eval(env, tmp_path, model="plain", tasks="tiny_gen") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no chat template" in err and "--no-chat-template" in err
    assert not (tmp_path / "summary.json").exists()
    prompts = tmp_path / "prompts.json"
    prompts.write_text('["which is red ?"]')
    assert (
        cli.main(
            ["generate", "--model", str(env["plain"]), "--prompts", str(prompts), "--output", str(tmp_path / "o.json")]
        )
        == 2
    )
    assert "no chat template" in capsys.readouterr().err


def test_hub_only_task_offline_names_dataset_before_model_load(env, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data_mod, "in_cache", lambda path: False)
    code = cli.main(
        ["eval", "--model", str(tmp_path / "no-such-model"), "--tasks", "arc_gen", "--output-dir", str(tmp_path)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "allenai/ai2_arc" in err and "--data-dir DIR" in err and "no-such-model" not in err


def write_parquet(root: Path, repo: str, config: str, splits: list[str], rows: list[dict]):
    import pandas as pd

    folder = root / repo / config
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        pd.DataFrame(rows).to_parquet(folder / f"{split}-00000-of-00001.parquet")


def fake_hub(root: Path, mmlu_subjects: list[str]) -> Path:
    """The six leaderboard data sets laid out as on the hub (parquet per split, no README).

    Every gold answer is the letter/word GOLD, rows differ (few-shot sampling skips the doc
    itself); ARC mixes A-D and 1-4 labels like the real set.
    """
    arc = [
        {
            "id": f"q{i}",
            "question": f"which is red {i} ?",
            "answerKey": key,
            "choices": {"text": ["A", GOLD, "C", WRONG], "label": labels},
        }
        for i in range(13)
        for labels, key in [(list("ABCD"), "B"), (list("1234"), "2")]
    ]
    write_parquet(root, "allenai/ai2_arc", "ARC-Challenge", ["train", "validation", "test"], arc)
    for subject in mmlu_subjects:
        write_parquet(
            root,
            "cais/mmlu",
            subject,
            ["test", "dev", "validation"],
            [
                {"question": f"which is red {i} ?", "subject": subject, "choices": ["A", GOLD, "C", WRONG], "answer": 1}
                for i in range(5)
            ],
        )
    targets = {"choices": [GOLD, WRONG], "labels": [1, 0]}
    write_parquet(
        root,
        "truthfulqa/truthful_qa",
        "multiple_choice",
        ["validation"],
        [{"question": f"is the sun blue {i} ?", "mc1_targets": targets, "mc2_targets": targets} for i in range(2)],
    )
    write_parquet(
        root,
        "allenai/winogrande",
        "winogrande_xl",
        ["train", "validation", "test"],
        [{"sentence": f"the sky {i} is _ blue .", "option1": GOLD, "option2": WRONG, "answer": "1"} for i in range(6)],
    )
    write_parquet(
        root,
        "openai/gsm8k",
        "main",
        ["train", "test"],
        [{"question": f"which is red {i} ?", "answer": "it is #### 4"} for i in range(6)],
    )
    return root


def test_leaderboard_from_data_dir(env, tmp_path, monkeypatch):
    """`--tasks leaderboard` offline: lm-eval's own YAMLs (mmlu is a nested group) and ARC-Gen
    read the local copies, with the paper's shots, chat template and multi-turn few-shot."""
    from iftune.evaluation.run import task_manager_for

    monkeypatch.setattr(data_mod, "in_cache", lambda path: False)
    index = task_manager_for(["mmlu"], [env["tasks"]]).task_index
    subjects = sorted({cfg["dataset_name"] for _, cfg in data_mod.leaf_configs(index, "mmlu")})
    assert len(subjects) == 57
    hub = fake_hub(tmp_path / "hub", subjects)
    out = tmp_path / "out"
    assert run_eval(env, out, "--data-dir", str(hub), "--limit", "2", tasks="leaderboard") == 0
    got = scores(out)
    # the stub always says GOLD: right on every multiple-choice set and on ARC-Gen, while
    # GSM8K wants "#### 4"; TruthfulQA's mc2 is a probability mass, not a 0/1 count
    assert {t: v for t, v in got.items() if t not in ("gsm8k", "truthfulqa_mc2")} == {
        "arc_challenge": 1.0,
        "arc_gen": 1.0,
        "mmlu": 1.0,
        "winogrande": 1.0,
    }
    assert got["gsm8k"] == 0.0 and got["truthfulqa_mc2"] == pytest.approx(1.0, abs=1e-6)
    results = json.loads(next(out.glob("results_*.json")).read_text())
    shots = {
        t: results["configs"][t]["num_fewshot"]
        for t in ["arc_challenge", "arc_gen", "mmlu_anatomy", "truthfulqa_mc2", "winogrande", "gsm8k"]
    }
    assert shots == {
        "arc_challenge": 25,
        "arc_gen": 25,
        "mmlu_anatomy": 5,
        "truthfulqa_mc2": 0,
        "winogrande": 5,
        "gsm8k": 5,
    }
    assert results["fewshot_as_multiturn"] is True and results["chat_template"] == CHAT_TEMPLATE
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| Model | ARC | ARC-Gen | MMLU | TruthfulQA | WinoGrande | GSM8K | Avg. |"
    assert table[2] == "| right | 100.00 | 100.00 | 100.00 | 100.00 | 100.00 | 0.00 | 80.00 |"
    # ARC-Gen: options relabelled A, B, ... in the prompt (item 1 had labels 1-4), gold = B
    prompt = logged_prompts(out, "arc_gen")[1]
    assert prompt.count("<|user|>") == 26
    assert prompt.endswith(
        "\nA. A\nB. B\nC. C\nD. D\nAnswer with the letter of the correct option.\nAnswer: <|end|> <|assistant|>"
    )
    samples = [json.loads(s) for s in next(out.glob("samples_arc_gen_*.jsonl")).open()]
    assert [s["doc"]["answerKey"] for s in samples] == ["B", "2"]
    assert {s["target"] for s in samples} == {GOLD}


def test_local_copy_layouts(tmp_path):
    """A hub snapshot (README declares configs) is used as is; a plain JSON copy gets a
    mirror that `datasets` reads by config name; an empty config folder is a clear error."""
    import datasets

    root = tmp_path / "allenai" / "ai2_arc"
    (root / "ARC-Challenge").mkdir(parents=True)
    (root / "README.md").write_text("---\nconfigs:\n- config_name: ARC-Challenge\n---\n")
    need = data_mod.HubData("allenai/ai2_arc", {"ARC-Challenge"}, ["arc_gen"])
    assert data_mod.resolve_local_data({"allenai/ai2_arc": need}, tmp_path) == {"allenai/ai2_arc": str(root.resolve())}
    copy = tmp_path / "gsm8k" / "main"  # DIR/<name> without the org also counts
    copy.mkdir(parents=True)
    write_jsonl(copy / "test.jsonl", [{"question": "q1", "answer": "1"}])
    write_jsonl(copy / "train.jsonl", [{"question": "q2", "answer": "2"}] * 2)
    need = data_mod.HubData("openai/gsm8k", {"main"}, ["gsm8k"])
    local = data_mod.resolve_local_data({"openai/gsm8k": need}, tmp_path)["openai/gsm8k"]
    loaded = datasets.load_dataset(local, "main")
    assert loaded["test"]["question"] == ["q1"] and loaded["train"].num_rows == 2
    empty = data_mod.HubData("x/y", {"main"}, ["t"])
    (tmp_path / "x" / "y" / "main").mkdir(parents=True)
    with pytest.raises(data_mod.UserError, match="no data files"):
        data_mod.resolve_local_data({"x/y": empty}, tmp_path)


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.7", "--top-p", "0.9"]])
def test_generate_writes_alpaca_eval_records(env, tmp_path, sampling):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps([{"instruction": "which is red ?", "dataset": "tiny"}, "is the sun blue ?", "which is the sea ?"])
    )
    out = tmp_path / "outputs.json"
    code = cli.main(
        [
            "generate",
            "--model",
            str(env["right"]),
            "--prompts",
            str(prompts),
            "--output",
            str(out),
            "--max-new-tokens",
            "2",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            *sampling,
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["instruction"] for r in rows] == ["which is red ?", "is the sun blue ?", "which is the sea ?"]
    assert all({"instruction", "output", "generator"} <= set(r) for r in rows)
    assert all(r["output"] == f"{GOLD} {GOLD}" and r["generator"] == "right" for r in rows)
    assert rows[0]["dataset"] == "tiny" and "dataset" not in rows[1]


def test_leaderboard_plan_has_the_papers_shots():
    plan = task_plan("leaderboard")
    assert plan == {
        "arc_challenge": {"num_fewshot": 25},
        "arc_gen": {"num_fewshot": 25},
        "mmlu": {"num_fewshot": 5},
        "truthfulqa_mc2": {"num_fewshot": 0},
        "winogrande": {"num_fewshot": 5},
        "gsm8k": {"num_fewshot": 5},
    }


def test_table3_layout_and_compare(tmp_path, capsys):
    # the paper's Mistral-7B row of Table 3; its Avg. leaves ARC-Gen out
    values = [0.5307, 0.7304, 0.5914, 0.4529, 0.7758, 0.3889]
    results = {"results": {c.task: {c.metric: v, "alias": c.task} for c, v in zip(LEADERBOARD, values)}}
    summary = summarize(results, [c.task for c in LEADERBOARD], "/m/ift-model", None)
    lines = markdown_table([summary]).splitlines()
    assert lines[0] == "| Model | ARC | ARC-Gen | MMLU | TruthfulQA | WinoGrande | GSM8K | Avg. |"
    assert lines[2] == "| ift-model | 53.07 | 73.04 | 59.14 | 45.29 | 77.58 | 38.89 | 54.79 |"
    partial = {t: v for t, v in summary["tasks"].items() if t != "gsm8k"}
    for name, s in [("a", summary), ("b", {**summary, "model": "sft-model", "tasks": partial})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(s))
    assert cli.main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[2] == lines[2]
    assert rows[3] == "| sft-model | 53.07 | 73.04 | 59.14 | 45.29 | 77.58 | – | – |"
    assert cli.main(["eval", "--compare", str(tmp_path / "missing")]) == 2


def test_default_device_and_underscore_output_dir(env, tmp_path):
    """Without --device, eval runs where torch can: on a machine without CUDA (as CI's), the old
    default `cuda` failed with "Torch not compiled with CUDA enabled". --output_dir and
    --include_path are accepted as well as --output-dir and --include-path."""
    out = tmp_path / "under"
    args = [
        "eval",
        "--model",
        str(env["right"]),
        "--tasks",
        "tiny_mc",
        "--include_path",
        str(env["tasks"]),
        "--output_dir",
        str(out),
        "--limit",
        "2",
    ]
    assert cli.main(args) == 0
    assert scores(out) == {"tiny_mc": 1.0}


def test_mirror_links_are_private_and_verified(tmp_path):
    """A link planted in the mirror (pointing at someone else's data) is replaced by one to the
    user's copy; a mirror folder others can write in is refused."""
    copy = tmp_path / "data" / "openai" / "gsm8k"
    (copy / "main").mkdir(parents=True)
    write_jsonl(copy / "main" / "test.jsonl", [{"question": "q1", "answer": "1"}])
    planted = tmp_path / "planted"
    planted.mkdir()
    write_jsonl(planted / "test.jsonl", [{"question": "evil", "answer": "0"}])
    need = data_mod.HubData("openai/gsm8k", {"main"}, ["gsm8k"])
    mirrors = tmp_path / "mirrors"
    mirror = data_mod.loadable_root(copy.resolve(), need, mirrors)
    (mirror / "main").unlink()
    (mirror / "main").symlink_to(planted, target_is_directory=True)
    assert data_mod.loadable_root(copy.resolve(), need, mirrors) == mirror
    assert (mirror / "main").resolve() == (copy / "main").resolve()
    mirrors.chmod(0o777)
    with pytest.raises(data_mod.UserError, match="others"):
        data_mod.loadable_root(copy.resolve(), need, mirrors)


def test_mirrors_default_to_the_users_cache():
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    import importlib

    fresh = importlib.reload(data_mod)
    try:
        assert home_cache / "iftune" / "data-mirrors" == fresh.MIRRORS
    finally:
        importlib.reload(data_mod)
