"""`iftune study`: pair construction, step validity, statistics on numbers with a known answer, the
tuning's choices, resume after an interruption, provenance, and the schemas of tuning.json and
study.json. Never the outcome."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from iftune import stats
from iftune.demo import data as demo_data
from iftune.demo.score import final_answer, step_lines
from iftune.errors import UserError
from iftune.study import analysis, pairs, validity


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


def test_t_distribution_on_known_values():
    # Cauchy (df 1): P(T <= 1) = 3/4; the usual table quantiles
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)
    assert stats.t_cdf(0.0, 5) == 0.5 and stats.t_cdf(-2.0, 7) == pytest.approx(1 - stats.t_cdf(2.0, 7), abs=1e-14)
    for p, df, q in ((0.975, 1, 12.706204736), (0.975, 5, 2.570581836), (0.975, 6, 2.446911851), (0.8, 6, 0.905703285)):
        assert stats.t_quantile(p, df) == pytest.approx(q, abs=1e-8)
    assert stats.t_quantile(0.975, 10_000) == pytest.approx(1.96, abs=1e-3)  # tends to the normal
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)


def test_cluster_t_is_a_t_interval_on_the_group_means():
    groups = {"a": [1.0, 3.0], "b": [4.0], "c": [0.0, 2.0, 4.0], "d": [5.0, 7.0]}  # group means 2, 4, 2, 6
    r = stats.cluster_t(groups)
    sd = (sum((m - 3.5) ** 2 for m in (2, 4, 2, 6)) / 3) ** 0.5
    half = 3.182446305 * sd / 2  # t_{0.975, 3}
    assert (r["mean"], r["df"]) == (3.5, 3) and r["se"] == pytest.approx(sd / 2)
    assert (r["low"], r["high"]) == (pytest.approx(3.5 - half), pytest.approx(3.5 + half))
    assert r["p"] == pytest.approx(2 * (1 - stats.t_cdf(3.5 / (sd / 2), 3)))
    # no spread between bases: a zero-width interval and no p-value
    assert stats.cluster_t({0: [0.1, 0.3], 1: [0.2]}) == {
        "mean": pytest.approx(0.2), "low": pytest.approx(0.2), "high": pytest.approx(0.2),
        "level": 0.95, "se": 0.0, "df": 1, "p": None,
    }  # fmt: skip


def test_holm_on_known_values():
    assert stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None}) == {
        "a": pytest.approx(0.03), "b": pytest.approx(0.06), "c": pytest.approx(0.06), "d": None,
    }  # fmt: skip
    assert stats.holm({"a": 0.5, "b": 0.6}) == {"a": 1.0, "b": 1.0}  # capped at 1


def test_variance_components_and_the_minimal_detectable_effect():
    # within every base the seeds differ by +-1 (SD sqrt 2 over 2 seeds); the base means are 0 and 2
    groups = {0: [-1.0, 1.0], 1: [1.0, 3.0]}
    parts = stats.variance_components(groups)
    assert parts["seed_sd"] == pytest.approx(2**0.5)
    assert parts["base_sd"] == pytest.approx((2.0 - 2.0 / 2) ** 0.5)  # var of means 2, less seed var / 2
    assert stats.variance_components({0: [0.0, 4.0], 1: [0.0, 4.0]})["base_sd"] == 0.0
    mde = stats.minimal_detectable_effect(seed_sd=2.0, base_sd=1.0, n_bases=7, n_seeds=2)
    assert mde == pytest.approx((2.446911851 + 0.905703285) * ((1 + 4 / 2) / 7) ** 0.5, abs=1e-8)
    with pytest.raises(ValueError):
        stats.variance_components({0: [1.0, 2.0]})


def test_power_from_the_first_study_matches_the_review():
    """The review of the first study estimated, from its study.json, a seed SD of the IFT - SFT
    difference in exact match of 9.5 points, a base SD of 3.9 and an MDE of ~12 points at 4 x 5."""
    from pathlib import Path

    first = json.loads((Path(__file__).parents[1] / "docs" / "study-1.json").read_text())
    em = analysis.power(first, 4, 5)["exact_match"]
    assert round(100 * em["seed_sd"], 1) == 9.5 and round(100 * em["base_sd"], 1) == 3.9
    assert 11.5 < 100 * em["mde"] < 12.5
    assert analysis.power(first, 7, 2)["step_accuracy"]["mde"] < analysis.power(first, 4, 5)["step_accuracy"]["mde"]


# ------------------------------------------------------------------ step validity


def test_step_validity_counts_steps_right_given_the_models_own_previous_result():
    prompt = "solve 3 a +2 b *3 c -1"
    ref = "3 a +2 = 5 ; 5 b *3 = 5 ; 5 c -1 = 4 ; answer 4"
    assert validity.step_flags(ref, prompt) == [True, True, True]
    assert validity.validity(ref, prompt) == (1.0, None)
    # step 1 wrong (6), the rest worked correctly from it: 2 of 3 valid, every later step valid
    carried = "3 a +2 = 6 ; 6 b *3 = 8 ; 8 c -1 = 7 ; answer 7"
    assert validity.step_flags(carried, prompt) == [False, True, True]
    assert validity.validity(carried, prompt) == (pytest.approx(2 / 3), 1.0)
    # a miscopied carried value (5 -> 9), a wrong operation, a wrong label: invalid
    assert validity.step_flags("3 a +2 = 5 ; 9 b *3 = 7 ; 7 c -1 = 6", prompt) == [True, False, True]
    assert validity.step_flags("3 a +2 = 5 ; 5 b *2 = 0 ; 0 c -1 = 9", prompt) == [True, False, True]
    assert validity.step_flags("3 a +2 = 5 ; 5 c *3 = 5 ; 5 c -1 = 4", prompt) == [True, False, True]
    # the start digit miscopied: step 1 invalid even though 9 +2 = 1 is right
    assert validity.step_flags("9 a +2 = 1 ; 1 b *3 = 3 ; 3 c -1 = 2", prompt) == [False, True, True]
    # a malformed step leaves nothing to carry; missing steps are invalid
    assert validity.step_flags("3 a +2 = 5 ; 5 b *3 5 ; 5 c -1 = 4", prompt) == [True, False, False]
    assert validity.validity("3 a +2 = 5 ; answer 5", prompt) == (pytest.approx(1 / 3), 0.0)
    assert validity.validity("", prompt) == (0.0, 0.0)
    # the last step wrong: nothing comes after the first error
    assert validity.validity("3 a +2 = 5 ; 5 b *3 = 5 ; 5 c -1 = 5 ; answer 5", prompt) == (pytest.approx(2 / 3), None)
    means = validity.mean_validity([ref, carried, "3 a +2 = 5 ; 5 b *3 = 5 ; 5 c -1 = 5"], [prompt] * 3)
    assert means == {"step_validity": pytest.approx((1 + 2 / 3 + 2 / 3) / 3), "validity_after_error": 1.0}


def test_an_early_error_carried_on_is_valid_after_it_but_wrong_for_step_accuracy():
    from iftune.demo.score import score_one

    rng = random.Random(3)
    for ex in demo_data.make_splits(200, 0)[0]:
        prompt, reference = ex["messages"][0]["content"], ex["messages"][1]["content"]
        rejected = pairs.early_error(demo_data.parse_prompt(prompt), rng)  # step 1 or 2 wrong, carried through
        k, n = pairs.first_wrong_step(rejected, reference), len(step_lines(reference))
        assert validity.validity(rejected, prompt) == (pytest.approx((n - 1) / n), 1.0)
        assert score_one(rejected, reference)[1] == pytest.approx((k - 1) / n)


# ------------------------------------------------------------------ analysis


def fake_runs(shift: dict[str, float], bases: int = 4, seeds: int = 2, metrics=analysis.METRICS) -> list[dict]:
    """Synthetic runs: every method's score is the SFT score of that (base, seed) plus `shift`."""
    rng, runs = random.Random(1), []
    for b in range(bases):
        for s in range(seeds):
            sft = rng.random() * 0.5
            for m, d in shift.items():
                row = {"base": b, "seed": s, "method": m}
                row.update({k: (2 - sft - d if k == "heldout_nll" else sft + d) for k in metrics})
                runs.append(row)
    return runs


ALL = {"sft": 0.0, "ift": 0.1, "ift_mix": 0.0, "ift_prop": 0.0, "dft": 0.02, "sft_sft": 0.0, "sft_ift": 0.05}


def test_analysis_recovers_known_shifts_and_reads_the_positive_control():
    runs = fake_runs({**ALL, "sft_dpo": 0.2})
    result = analysis.analyse(runs, list({**ALL, "sft_dpo": 0}), n_boot=300, smallest_effect=0.05)
    em = result["comparisons"]["ift_vs_sft"]["step_validity"]
    assert em["role"] == "primary" and em["p_holm"] is None
    for interval in (em["cluster_t"], em["bootstrap"]):
        assert interval["low"] == pytest.approx(0.1) and interval["high"] == pytest.approx(0.1)
    assert result["answer"] == "IFT better"
    nll = result["comparisons"]["ift_vs_sft"]["heldout_nll"]
    assert nll["mean"] == pytest.approx(-0.1) and nll["role"] == "exploratory"
    assert result["positive_control"]["held"] and result["positive_control"]["mean"] == pytest.approx(0.2)
    assert result["comparisons"]["sft_ift_vs_sft_dpo"]["step_validity"]["mean"] == pytest.approx(-0.15)
    assert result["comparisons"]["ift_vs_dft"]["exact_match"]["mean"] == pytest.approx(0.08)
    roles = [st["role"] for row in result["comparisons"].values() for st in row.values()]
    assert roles.count("exploratory") == 8 * 5 - 2 and {"primary", "positive control"} <= set(roles)
    assert result["methods"]["ift"]["n_runs"] == 8
    failed = analysis.analyse(fake_runs({**ALL, "sft_dpo": -0.01}), list({**ALL, "sft_dpo": 0}), 200, 0.05)
    assert failed["positive_control"]["held"] is False


def test_exploratory_verdicts_follow_the_holm_adjusted_p_values():
    runs = fake_runs({"sft": 0.0, "ift": 0.0, "dft": 0.0})
    rng = random.Random(5)
    for r in runs:  # dft: a clear shift with noise between bases; ift: pure noise
        if r["method"] == "dft":
            r["exact_match"] += 0.1 + 0.01 * rng.gauss(0, 1)
        if r["method"] == "ift":
            r["exact_match"] += 0.05 * rng.gauss(0, 1)
    result = analysis.analyse(runs, ["sft", "ift", "dft"], n_boot=200, smallest_effect=0.05)
    dft = result["comparisons"]["dft_vs_sft"]["exact_match"]
    assert dft["p_holm"] >= dft["cluster_t"]["p"] and dft["p_holm"] < 0.05 and dft["verdict"] == "a better"
    ift = result["comparisons"]["ift_vs_sft"]["exact_match"]
    assert ift["verdict"] == "inconclusive" and ift["p_holm"] >= ift["cluster_t"]["p"]


def test_primary_verdict_rules():
    def stat(low, high):
        return {"cluster_t": {"low": low, "high": high}}

    v = analysis.primary_verdict
    assert v(stat(0.01, 0.09), 0.05) == "IFT better"
    assert v(stat(0.01, 0.04), 0.05) == "IFT better, by less than 5 points"
    assert v(stat(-0.09, -0.01), 0.05) == "IFT worse"
    assert v(stat(-0.04, 0.03), 0.05) == "level"
    assert v(stat(-0.06, 0.03), 0.05) == "inconclusive"
    assert v(None, 0.05) == "not run"


# ------------------------------------------------------------------ tuning


QUICK_TUNING_SETTINGS = {"steps": 2, "extra_steps": 2, "batch_size": 16, "n_train": 64, "n_valid": 16, "quick": True}


def test_tuning_chooses_by_mean_validation_validity_in_the_pre_registered_order(tmp_path, monkeypatch):
    from iftune.study import tuning
    from iftune.study.runs import save_json
    from iftune.study.settings import QUICK, StudySettings, Tuning

    # a made-up landscape: validity peaks at lr 1e-3 for sft, 3e-3 for ift; lam 0.4 best; base 1 lower
    def score(method, values, base):
        lr, peak = values["learning_rate"], {"sft": 1e-3, "ift": 3e-3}.get(method, 1e-4)
        return 0.5 - abs(lr - peak) * 10 - 0.1 * base + 0.01 * values.get("max_lambda", 0)

    calls = []

    def fake_run(work, s, base, base_dir, method, seed, values, examples, path, sft_values=None):
        calls.append((method, seed, tuple(sorted(values.items())), sft_values and sft_values["learning_rate"], base))
        r = {"base": base, "seed": seed, "method": method, "step_validity": score(method, values, base) + 0.001 * seed}
        save_json(r, path)
        return r

    monkeypatch.setattr(tuning, "run_one", fake_run)
    monkeypatch.setattr(tuning, "bases", lambda work, s, seeds, w: [{"index": b, "path": "x"} for b in seeds])
    grid = (
        Tuning("sft", "learning_rate", (3e-4, 1e-3, 3e-3)),
        Tuning("ift", "learning_rate", (1e-3, 3e-3)),
        Tuning("ift", "max_lambda", (0.1, 0.2, 0.4)),
        Tuning("dft", "learning_rate", (3e-3,)),
        Tuning("sft_sft", "learning_rate", (1e-4,)),
        Tuning("sft_ift", "learning_rate", (1e-4, 3e-4)),
        Tuning("sft_dpo", "learning_rate", (1e-4, 1e-4 + 1e-9)),  # a tie to 4 decimals: the first wins
    )
    s = StudySettings(**{**QUICK, "tuning_bases": (0, 1), "pilot_seeds": (1, 2), "grid": grid})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "valid.jsonl").write_text("")
    out = tuning.tune(tmp_path, s, 1, {"commit": "abc", "status": []})
    v = out["values"]
    assert v["sft"] == {"learning_rate": 1e-3}
    assert v["ift"] == {"learning_rate": 3e-3, "max_lambda": 0.4} == v["ift_mix"]
    assert v["ift_prop"] == {"learning_rate": 3e-3}  # its own --max_lambda 0 stands
    assert v["sft_ift"] == {"learning_rate": 1e-4, "max_lambda": 0.4}  # IFT's lam, SFT's model
    assert v["sft_dpo"]["learning_rate"] == 1e-4 and v["sft_dpo"]["beta"] == 0.1
    assert out["learning_rates"]["dft"] == 3e-3 and out["learning_rates"]["ift_mix"] == 3e-3
    assert "ift learning_rate" in out["at_edge"] and "sft learning_rate" not in out["at_edge"]
    sft_step = out["steps"][0]
    assert [round(x["step_validity"], 4) for x in sft_step["validation"]] == [
        round((score("sft", {"learning_rate": lr}, 0) + score("sft", {"learning_rate": lr}, 1)) / 2, 4)
        for lr in (3e-4, 1e-3, 3e-3)
    ]
    seq = [c for c in calls if c[0] in ("sft_ift", "sft_dpo")]
    assert seq and all(c[3] == 1e-3 for c in seq)  # from the tuned SFT model
    # lam 0.2 at IFT's chosen lr was not run twice; the pilot reuses seed 0 and adds seeds 1, 2
    assert len(calls) == len(set(calls))
    assert sorted(c[1] for c in calls if c[0] == "ift" and dict(c[2]) == v["ift"]) == [0, 0, 1, 1, 2, 2]
    assert out["pilot"]["seed_sd"] == pytest.approx(0.0, abs=1e-12)  # the made-up seed effect is the same for both
    assert out["commit"] == "abc" and json.loads((tmp_path / "tuning.json").read_text())["values"] == v
    # resumable: a second call runs nothing
    n = len(calls)
    tuning.tune(tmp_path, s, 1, {"commit": "abc", "status": []})
    assert len(calls) == n


def write_tuning(path, settings=QUICK_TUNING_SETTINGS, methods=("sft", "ift")):
    from iftune.study.runs import save_json

    values = {m: {"learning_rate": 1e-3} for m in methods}
    pilot = {"mde": None}
    return save_json(
        {"settings": settings, "values": values, "grid": [], "steps": [], "at_edge": [], "pilot": pilot}, path
    )


def test_a_tuning_file_made_with_other_settings_is_refused(tmp_path):
    from iftune import study

    base = ["--quick", "--workers", "1", "--methods", "sft", "ift", "--output-dir", str(tmp_path / "s")]
    with pytest.raises(UserError, match="--tuning"):
        study.main(base)
    with pytest.raises(UserError, match="no such file"):
        study.main([*base, "--tuning", str(tmp_path / "none.json")])
    other = write_tuning(tmp_path / "t.json", {**QUICK_TUNING_SETTINGS, "steps": 300})
    with pytest.raises(UserError, match="steps=300"):
        study.main([*base, "--tuning", str(other)])
    partial = write_tuning(tmp_path / "p.json", methods=("sft",))
    with pytest.raises(UserError, match="no tuned values for ift"):
        study.main([*base, "--tuning", str(partial)])
    with pytest.raises(UserError, match="--tune and --tuning"):
        study.parse_args(["--tune", "--tuning", str(other)])


# ------------------------------------------------------------------ provenance


def test_a_dirty_tree_is_refused_unless_allowed():
    from iftune.study.work import check_clean, git_state

    dirty = {"commit": "abc-dirty", "status": [" M src/iftune/stats.py"]}
    with pytest.raises(UserError, match=r"uncommitted.*--allow-dirty"):
        check_clean(dirty, allow_dirty=False, quick=False)
    check_clean(dirty, allow_dirty=True, quick=False)
    check_clean(dirty, allow_dirty=False, quick=True)
    check_clean({"commit": "abc", "status": []}, allow_dirty=False, quick=False)
    with pytest.raises(UserError, match="not a git checkout"):
        check_clean({"commit": None, "status": None}, allow_dirty=False, quick=False)
    state = git_state()  # this checkout: a commit, and a list of changes (maybe empty)
    assert state["commit"] and isinstance(state["status"], list)


# ------------------------------------------------------------------ resume, schema


def test_resume_continues_after_an_interruption(tmp_path, monkeypatch):
    from iftune import study
    from iftune.study.runs import save_json

    calls = []

    def fake_run(work, s, base, base_dir, method, seed, values, examples, path, sft_values=None):
        calls.append((base, method, seed))
        if len(calls) == 5:
            raise KeyboardInterrupt
        result = {"base": base, "seed": seed, "method": method, **dict.fromkeys(analysis.METRICS, 0.5)}
        result["exact_match"] = 0.1 * base
        save_json(result, path)
        return result

    monkeypatch.setattr(study, "bases", lambda work, s, seeds, w: [{"index": b, "path": "x"} for b in seeds])
    monkeypatch.setattr(study, "run_one", fake_run)
    tuning = write_tuning(tmp_path / "t.json", methods=("sft", "ift", "sft_ift"))
    argv = ["--quick", "--workers", "1", "--seeds", "2", "--methods", "sft", "ift", "sft_ift"]
    argv += ["--tuning", str(tuning), "--output_dir", str(tmp_path / "s")]
    with pytest.raises(KeyboardInterrupt):
        study.main(argv)
    assert len(calls) == 5 and not (tmp_path / "s" / "study.json").exists()
    assert calls[0][1] == "sft" and calls[3][1] == "sft"  # every cell starts with sft
    assert study.main(argv) == 0
    assert len(calls) == 5 + (2 * 2 * 3 - 4)  # the 4 saved runs are not run again
    assert len(set(calls)) == 12  # the interrupted one is run again, nothing twice after saving
    out = json.loads((tmp_path / "s" / "study.json").read_text())
    assert len(out["runs"]) == 12 and out["answer"] == "level"  # identical scores: a zero-width interval at 0
    assert out["settings"]["learning_rates"] == {"sft": 1e-3, "ift": 1e-3, "sft_ift": 1e-3}
    with pytest.raises(UserError, match="other settings"):
        study.main([*argv, "--seeds", "1"])
    # runs made by one commit are not continued by another; a later report names the runs' commit
    made_by = out["commit"]
    monkeypatch.setattr(study, "git_state", lambda: {"commit": "0123abc", "status": []})
    with pytest.raises(UserError, match=r"other settings \(commit\)"):
        study.main(argv)
    for b in (0, 1):  # what the real base step writes (faked above)
        save_json({"index": b, "path": "x"}, tmp_path / "s" / "bases" / f"base{b}.json")
    assert study.main([*argv, "--report-only"]) == 0
    assert json.loads((tmp_path / "s" / "study.json").read_text())["commit"] == made_by != "0123abc"


def test_quick_study_tunes_then_compares_and_writes_its_schemas(tmp_path, capsys):
    from iftune import study

    tune_dir, out_dir = tmp_path / "t", tmp_path / "s"
    assert study.main(["--tune", "--quick", "--workers", "1", "--output-dir", str(tune_dir)]) == 0
    tuning = json.loads((tune_dir / "tuning.json").read_text())
    assert {"settings", "grid", "steps", "values", "learning_rates", "at_edge", "pilot", "commit", "git_status"} <= set(
        tuning
    )
    assert set(tuning["learning_rates"]) == set(study.METHODS)
    assert all(0 <= x["step_validity"] <= 1 for st in tuning["steps"] for x in st["validation"])
    assert not (tune_dir / "models").exists() and "chosen on the validation split" in capsys.readouterr().out
    methods = ("sft", "ift", "sft_sft", "sft_dpo")
    argv = ["--quick", "--workers", "1", "--methods", *methods, "--output-dir", str(out_dir)]
    assert study.main([*argv, "--tuning", str(tune_dir / "tuning.json")]) == 0
    out = json.loads((out_dir / "study.json").read_text())
    keys = {"settings", "commit", "git_status", "answer", "positive_control", "bases", "comparisons", "runs"}
    assert keys <= set(out)
    assert out["settings"]["learning_rates"] == {m: tuning["learning_rates"][m] for m in methods}
    assert out["settings"]["tuning"]["steps"] == tuning["steps"]
    assert [b["index"] for b in out["bases"]] == [0, 1]
    assert {(r["base"], r["method"]) for r in out["runs"]} == {(b, m) for b in (0, 1) for m in methods}
    for r in out["runs"]:
        for k in ("step_validity", "exact_match", "step_accuracy"):
            assert 0 <= r[k] <= 1
        assert r["heldout_nll"] > 0 and (r["pairs"] is None) == (r["method"] != "sft_dpo")
        if r["pairs"]:
            assert r["pairs"]["own"] + r["pairs"]["synthetic"] == out["settings"]["extra_steps"] * 16
    for name in ("ift_vs_sft",):
        for metric in ("step_validity", "exact_match", "heldout_nll"):
            st = out["comparisons"][name][metric]
            for interval in (st["cluster_t"], st["bootstrap"]):
                assert interval["low"] <= st["mean"] <= interval["high"]
            assert set(st["per_base"]) == {"0", "1"}
    control = out["positive_control"]
    assert control["comparison"] == "sft_dpo - sft_sft" and control["held"] == (control["low"] > 0)
    assert (out_dir / "study.png").stat().st_size > 0 and not (out_dir / "models").exists()
    printed = capsys.readouterr().out
    assert "ift - sft" in printed and "Pre-registered answer" in printed


def test_bad_flags_are_one_line_errors(tmp_path):
    from iftune import study

    with pytest.raises(UserError, match="--seeds=0"):
        study.parse_args(["--seeds", "0"])
    with pytest.raises(UserError, match="sft"):
        study.parse_args(["--methods", "ift"])
    with pytest.raises(UserError, match="--power"):
        study.main(["--power", str(tmp_path / "missing.json")])


def test_power_prints_the_mde_table(capsys):
    from pathlib import Path

    from iftune import study

    assert study.main(["--power", str(Path(__file__).parents[1] / "docs" / "study-1.json")]) == 0
    printed = capsys.readouterr().out
    assert "MDE 7x2" in printed and "step_accuracy" in printed


def test_report_only_analyses_the_saved_runs(tmp_path, monkeypatch, capsys):
    from iftune import study
    from iftune.study.runs import save_json

    work = tmp_path / "s"
    tuning = write_tuning(tmp_path / "t.json")
    argv = ["--quick", "--workers", "1", "--seeds", "2", "--methods", "sft", "ift", "--output-dir", str(work)]
    argv += ["--report-only", "--tuning", str(tuning)]
    with pytest.raises(UserError, match="no study"):
        study.main(argv)
    for b in (0, 1):
        save_json({"index": b, "path": "x"}, work / "bases" / f"base{b}.json")
        for m in ("sft", "ift"):
            run = {"base": b, "seed": 0, "method": m, **dict.fromkeys(analysis.METRICS, 0.5)}
            save_json(run, study.run_path(work, b, m, 0))
    monkeypatch.setattr(study, "run_one", lambda *a: pytest.fail("--report-only must not run anything"))
    assert study.main(argv) == 0
    out = json.loads((work / "study.json").read_text())
    assert out["runs_missing"] == 4 and len(out["runs"]) == 4
    assert "INCOMPLETE" in capsys.readouterr().out


# ------------------------------------------------------------------ the published result


def test_published_study_is_clean_complete_and_reanalyses_to_itself():
    """docs/study.json is the comparison's output: from a clean commit, no run missing, and its
    intervals, Holm p-values, verdicts, answer and positive control are what `analyse` gives from
    its own runs (the bootstrap, seeded and 10,000 replicates, is left out here for time). The
    README and docs/study.md quote its primary and control intervals."""
    root = Path(__file__).resolve().parents[1]
    published = json.loads((root / "docs" / "study.json").read_text())
    assert not published["git_status"] and "dirty" not in published["commit"]
    assert published["runs_missing"] == 0 and not published["settings"]["quick"]
    s = published["settings"]
    redo = analysis.analyse(published["runs"], list(s["methods"]), 10, s["smallest_effect"])
    assert redo["answer"] == published["answer"]
    assert redo["positive_control"] == published["positive_control"]
    for name, row in published["comparisons"].items():
        for metric, st in row.items():
            got = redo["comparisons"][name][metric]
            assert got["cluster_t"] == pytest.approx(st["cluster_t"], rel=1e-12)
            assert (got["p_holm"], got["verdict"]) == (st["p_holm"], st["verdict"])
    for pc in (published["comparisons"]["ift_vs_sft"]["step_validity"]["cluster_t"], published["positive_control"]):
        quoted = f"{pc['mean'] * 100:+.1f} points"
        interval = f"[{pc['low'] * 100:+.1f}, {pc['high'] * 100:+.1f}]"
        for doc in ("README.md", "docs/study.md"):
            text = " ".join((root / doc).read_text().split())
            assert interval in text, (doc, interval)
        assert quoted.replace("+", "") in " ".join((root / "docs/study.md").read_text().split()).replace("+", "")
