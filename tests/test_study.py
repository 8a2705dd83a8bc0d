"""`iftune study`: pair construction, statistics on numbers with a known answer, resume after an
interruption, and study.json's schema. Never the outcome."""

from __future__ import annotations

import json
import random

import pytest

from iftune import stats
from iftune.demo import data as demo_data
from iftune.demo.score import final_answer, step_lines
from iftune.errors import UserError
from iftune.study import analysis, pairs


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("IFTUNE_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------ pairs


def test_early_error_is_early_and_propagates():
    rng, wrong_final = random.Random(0), 0
    train, _ = demo_data.make_splits(300, 0)
    for ex in train:
        problem = demo_data.parse_prompt(ex["messages"][0]["content"])
        assert problem.prompt == ex["messages"][0]["content"]
        reference = ex["messages"][1]["content"]
        rejected = pairs.early_error(problem, rng)
        assert pairs.first_wrong_step(rejected, reference) in (1, 2)
        steps = step_lines(rejected)
        assert len(steps) == len(problem.ops)
        value = problem.start
        for i, (step, (op, d)) in enumerate(zip(steps, problem.ops)):
            a, label, opd, _, c = step.split()
            assert (int(a), label, opd) == (value, problem.label(i), f"{op}{d}")  # carried on from the last result
            if i != pairs.first_wrong_step(rejected, reference) - 1:
                assert int(c) == demo_data.apply(op, int(a), d)  # worked correctly from it
            value = int(c)
        assert final_answer(rejected) == str(value)
        wrong_final += final_answer(rejected) != final_answer(reference)
    assert wrong_final >= 0.95 * len(train)


def test_pairs_take_the_models_own_wrong_answers_else_a_synthetic_error():
    train, _ = demo_data.make_splits(4, 0)
    refs = [ex["messages"][1]["content"] for ex in train]
    wrong = refs[1].rsplit("answer", 1)[0] + f"answer {(int(final_answer(refs[1])) + 1) % 10}"
    generated = [refs[0], wrong, "garbage without an answer", ""]
    rows, counts = pairs.build_pairs(train, generated)
    assert counts == {"own": 1, "synthetic": 3, "own_early": 0}
    assert rows[1]["rejected"] == [{"role": "assistant", "content": wrong}]
    for row, ex, ref in zip(rows, train, refs):
        assert row["prompt"] == ex["messages"][:1]
        assert row["chosen"] == [{"role": "assistant", "content": ref}]
        assert final_answer(row["rejected"][0]["content"]) != final_answer(ref) or row is rows[0]
    assert rows[0]["rejected"][0]["content"] != refs[0]  # a right answer is never the rejected one
    with pytest.raises(ValueError):
        pairs.build_pairs(train, generated[:2])


def test_pairs_load_as_preference_data(tmp_path):
    from iftune.data import load_training_data

    train, _ = demo_data.make_splits(8, 0)
    rows, _ = pairs.build_pairs(train, [""] * len(train))
    path = demo_data.write_jsonl(rows, tmp_path / "pairs.jsonl")
    for method in ("dpo", "orpo"):
        ds = load_training_data([str(path)], method, [], ["train"], None, 0)
        assert len(ds) == len(rows) and {"chosen", "rejected"} <= set(ds.column_names)


# ------------------------------------------------------------------ statistics


def test_mean_std_and_paired_on_known_values():
    assert stats.mean_std([2.0, 4.0, 6.0]) == (4.0, 2.0)  # sample std: n - 1
    assert stats.mean_std([5.0]) == (5.0, 0.0)
    p = stats.paired([0.3, 0.5, 0.2, 0.4], [0.1, 0.5, 0.3, 0.1])  # d = .2, 0, -.1, .3
    assert p["mean_diff"] == pytest.approx(0.1) and p["win_rate"] == pytest.approx(2.5 / 4)
    sd = (sum((x - 0.1) ** 2 for x in (0.2, 0.0, -0.1, 0.3)) / 3) ** 0.5
    assert p["std"] == pytest.approx(sd) and p["t"] == pytest.approx(0.1 / (sd / 2))
    assert stats.paired([1.0], [1.0], lower_is_better=True)["t"] is None
    assert stats.paired_differences({"a": 3, "b": 1}, {"a": 1, "c": 0}) == {"a": 2}


def test_hierarchical_bootstrap_known_answers():
    # no spread within bases: only the draw of bases varies. With two bases, a replicate is
    # 1 (both draws base one, p = 1/4), 3 (p = 1/4) or 2: the 2.5% and 97.5% points are 1 and 3.
    r = stats.hierarchical_bootstrap({"x": [1.0, 1.0, 1.0], "y": [3.0, 3.0, 3.0]}, n_boot=2000)
    assert (r["mean"], r["low"], r["high"]) == (2.0, 1.0, 3.0)
    # one base: only seeds vary; the interval lies inside the values' range and holds the mean
    r = stats.hierarchical_bootstrap({"x": [0.0, 1.0, 2.0, 3.0, 4.0]}, n_boot=2000)
    assert r["mean"] == 2.0 and 0.0 <= r["low"] < 2.0 < r["high"] <= 4.0
    # every value equal: a zero-width interval
    r = stats.hierarchical_bootstrap({b: [0.25] * 5 for b in range(4)}, n_boot=500)
    assert r["low"] == r["high"] == pytest.approx(0.25) and (r["n_groups"], r["n_values"]) == (4, 20)
    # bases weigh the same whatever their number of seeds
    assert stats.hierarchical_bootstrap({"x": [0.0], "y": [1.0, 1.0, 1.0]}, n_boot=10)["mean"] == 0.5


def fake_runs(shift: dict[str, float], bases: int = 4, seeds: int = 5) -> list[dict]:
    """Synthetic runs: every method's score is the SFT score of that (base, seed) plus `shift`."""
    rng, runs = random.Random(1), []
    for b in range(bases):
        for s in range(seeds):
            sft = rng.random()
            for m, d in shift.items():
                runs.append(
                    {
                        "base": b,
                        "seed": s,
                        "method": m,
                        "exact_match": sft + d,
                        "step_accuracy": sft + d,
                        "heldout_nll": 2 - sft - d,
                    }
                )
    return runs


def test_analysis_recovers_a_known_shift():
    runs = fake_runs({"sft": 0.0, "ift": 0.1, "dpo": -0.05})
    result = analysis.analyse(runs, ["sft", "ift", "dpo"], n_boot=300)
    em = result["comparisons"]["ift_vs_sft"]["exact_match"]
    assert em["mean"] == pytest.approx(0.1) and em["low"] == pytest.approx(0.1) and em["high"] == pytest.approx(0.1)
    assert em["verdict"] == "a better" and em["a_better_share"] == 1.0
    nll = result["comparisons"]["ift_vs_sft"]["heldout_nll"]
    assert nll["mean"] == pytest.approx(-0.1) and nll["verdict"] == "a better"  # lower NLL is better
    assert result["comparisons"]["dpo_vs_sft"]["exact_match"]["verdict"] == "b better"
    assert result["comparisons"]["ift_vs_dpo"]["exact_match"]["mean"] == pytest.approx(0.15)
    assert "orpo_vs_sft" not in result["comparisons"]
    assert analysis.primary(result) == "IFT helps"
    assert result["methods"]["ift"]["n_runs"] == 20
    noisy = fake_runs({"sft": 0.0, "ift": 0.0})
    for r in noisy:
        r["exact_match"] += 0.3 * (r["method"] == "ift") * (1 if r["seed"] % 2 else -1)
    assert analysis.primary(analysis.analyse(noisy, ["sft", "ift"], n_boot=300)) == "inconclusive"


# ------------------------------------------------------------------ resume, schema


def test_resume_continues_after_an_interruption(tmp_path, monkeypatch):
    from iftune import study
    from iftune.study.runs import run_path, save_json

    calls = []

    def fake_base(work, s, index, build):
        return {"index": index, "path": str(tmp_path), "pairs": {}, "score": {}}

    def fake_run(work, s, base, base_dir, method, seed, pair_examples, heldout):
        calls.append((base, method, seed))
        if len(calls) == 5:
            raise KeyboardInterrupt
        result = {
            "base": base,
            "seed": seed,
            "method": method,
            "exact_match": 0.1 * seed,
            "step_accuracy": 0.5,
            "heldout_nll": 1.0,
        }
        save_json(result, run_path(work, base, method, seed))
        return result

    monkeypatch.setattr(study, "prepare_base", fake_base)
    monkeypatch.setattr(study, "run_one", fake_run)
    argv = ["--quick", "--workers", "1", "--methods", "sft", "ift", "--output_dir", str(tmp_path / "s")]
    with pytest.raises(KeyboardInterrupt):
        study.main(argv)
    assert len(calls) == 5 and not (tmp_path / "s" / "study.json").exists()
    assert study.main(argv) == 0
    assert len(calls) == 5 + (2 * 2 * 2 - 4)  # the 4 saved runs are not run again
    assert len(set(calls)) == 8  # the interrupted one is run again, nothing twice after saving
    out = json.loads((tmp_path / "s" / "study.json").read_text())
    assert len(out["runs"]) == 8 and out["answer"] == "inconclusive"
    with pytest.raises(UserError, match="other settings"):
        study.main([*argv, "--steps", "7"])


def test_quick_study_writes_its_schema(tmp_path, capsys):
    from iftune import study

    out_dir = tmp_path / "s"
    leftover = out_dir / "models" / "base0-sft-seed0" / "stage0"  # an interrupted attempt's folder
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    assert (
        study.main(
            [
                "--quick",
                "--workers",
                "1",
                "--seeds",
                "1",
                "--methods",
                "sft",
                "dpo",
                "sft_dpo",
                "--output-dir",
                str(out_dir),
            ]
        )
        == 0
    )
    out = json.loads((out_dir / "study.json").read_text())
    assert {"settings", "commit", "answer", "bases", "methods", "comparisons", "runs"} <= set(out)
    assert [b["index"] for b in out["bases"]] == [0, 1]
    for base in out["bases"]:
        assert (
            sum(base["pairs"][k] for k in ("own", "synthetic"))
            == out["settings"]["steps"] * out["settings"]["batch_size"]
        )
    assert {(r["base"], r["method"]) for r in out["runs"]} == {
        (b, m) for b in (0, 1) for m in ("sft", "dpo", "sft_dpo")
    }
    for r in out["runs"]:
        assert 0 <= r["exact_match"] <= 1 and 0 <= r["step_accuracy"] <= 1 and r["heldout_nll"] > 0
        assert (r["pairs"] is None) == (r["method"] == "sft")
    for name in ("dpo_vs_sft", "sft_dpo_vs_sft"):
        for metric in ("exact_match", "step_accuracy", "heldout_nll"):
            st = out["comparisons"][name][metric]
            assert st["low"] <= st["mean"] <= st["high"] and set(st["per_base"]) == {"0", "1"}
    assert (out_dir / "study.png").stat().st_size > 0
    assert "dpo - sft" in capsys.readouterr().out


def test_bad_flags_are_one_line_errors():
    from iftune import study

    with pytest.raises(UserError, match="--seeds=0"):
        study.parse_args(["--seeds", "0"])
    with pytest.raises(UserError, match="sft"):
        study.parse_args(["--methods", "ift"])


def test_report_only_analyses_the_saved_runs(tmp_path, monkeypatch, capsys):
    from iftune import study
    from iftune.study.runs import run_path, save_json

    work = tmp_path / "s"
    argv = ["--quick", "--workers", "1", "--methods", "sft", "ift", "--output-dir", str(work), "--report-only"]
    with pytest.raises(UserError, match="no study"):
        study.main(argv)
    for b in (0, 1):
        save_json({"index": b, "path": "x", "pairs": {}, "score": {}}, work / "bases" / f"base{b}.json")
        for m in ("sft", "ift"):
            save_json(
                {"base": b, "seed": 0, "method": m, "exact_match": 0.5, "step_accuracy": 0.5, "heldout_nll": 1.0},
                run_path(work, b, m, 0),
            )
    monkeypatch.setattr(study, "run_one", lambda *a: pytest.fail("--report-only must not run anything"))
    assert study.main(argv) == 0
    out = json.loads((work / "study.json").read_text())
    assert out["runs_missing"] == 4 and len(out["runs"]) == 4
    assert "INCOMPLETE" in capsys.readouterr().out
