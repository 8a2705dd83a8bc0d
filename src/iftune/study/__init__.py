"""`iftune study`: does IFT help? SFT, IFT, its two halves, DFT and the paper's sequential scenario
(SFT -> SFT, SFT -> IFT, SFT -> DPO), each at its tuned learning rate, from several base models
and seeds, on the demo's compounding-error task, with paired 95% intervals.

docs/study.md holds the pre-registered design and analysis, and the result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from iftune.demo.base import single_thread
from iftune.demo.data import DATA_SEED, TASK_MAX_STEPS, TASK_MIN_STEPS
from iftune.errors import UserError
from iftune.study.analysis import analyse, forest_plot, power_table, table
from iftune.study.runs import run_one, save_json, sft_dir
from iftune.study.settings import METHODS, QUICK, StudySettings
from iftune.study.tuning import read_tuning, tune
from iftune.study.work import bases, check_clean, execute, git_state, prepare_data, read_split


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except None (those flags say their default in words)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str]) -> argparse.Namespace:
    d = StudySettings()
    p = argparse.ArgumentParser(prog="iftune study", description=__doc__.splitlines()[0], formatter_class=_Help)
    p.add_argument("--tune", action="store_true", help="choose each method's values on the validation split")
    p.add_argument("--tuning", type=Path, help="the tuning.json the comparison runs with (written by --tune)")
    p.add_argument(
        "--power", type=Path, metavar="STUDY_JSON", help="print the minimal detectable effects from an earlier study"
    )
    p.add_argument(
        "--bases",
        type=int,
        help=f"confirmatory bases, pre-training seeds from {d.first_base} (default: {d.bases}; 2 with --quick)",
    )
    p.add_argument(
        "--seeds", type=int, help=f"fine-tuning seeds per base and method (default: {d.seeds}; 1 with --quick)"
    )
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=list(METHODS), help="methods to run")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (processes, one torch thread each)")
    p.add_argument(
        "--output-dir",
        "--output_dir",
        dest="output_dir",
        type=Path,
        help="results and every run's file (a rerun continues from them); "
        "default outputs/study, or outputs/study-tuning with --tune",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="analyse the runs saved so far in --output-dir without running more (same settings)",
    )
    p.add_argument("--allow-dirty", action="store_true", help="run from a git tree with uncommitted changes")
    p.add_argument("--quick", action="store_true", help="a tiny, minutes-long version for tests")
    args = p.parse_args(argv)
    for flag in ("bases", "seeds", "workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag}={getattr(args, flag)}: expected an integer >= 1")
    if "sft" not in args.methods:
        raise UserError("--methods: the differences are taken against sft and the sequential methods start from it")
    if args.tune and args.tuning:
        raise UserError("--tune and --tuning: tune first, then run the comparison with the file it wrote")
    if args.output_dir is None:
        args.output_dir = Path("outputs/study-tuning" if args.tune else "outputs/study")
    return args


def settings_from(args: argparse.Namespace) -> StudySettings:
    """The study's settings; --quick shrinks everything (--bases/--seeds, when given, still count)."""
    given = {k: getattr(args, k) for k in ("bases", "seeds") if getattr(args, k) is not None}
    s = StudySettings(methods=tuple(args.methods))
    return replace(s, **{**(QUICK if args.quick else {}), **given})


def check_resume(work: Path, mine: dict, state: dict, report_only: bool = False) -> dict:
    """Refuse to mix runs made under other settings, values or code (commit) into this study's
    results; returns the commit and `git status` of the code the saved runs were made with
    (with --report-only, those saved; a report made later from a newer commit names the runs')."""
    saved = work / "settings.json"
    mine = json.loads(json.dumps({**mine, "commit": state["commit"], "git_status": state["status"]}))
    if saved.exists():
        before = json.loads(saved.read_text())
        ignore = {"methods", "bases", "git_status", *(("commit",) if report_only else ())}
        changed = sorted(k for k in mine if k not in ignore and before.get(k) != mine[k])
        if changed:
            raise UserError(
                f"--output-dir {work} holds a study with other settings ({', '.join(changed)}); "
                f"use another --output-dir or delete it"
            )
        if report_only:
            return {"commit": before.get("commit"), "status": before.get("git_status")}
    save_json(mine, saved)
    return state


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.power:
        return print_power(args)
    with single_thread():
        return run_tuning(args) if args.tune else run_study(args)


def print_power(args: argparse.Namespace) -> int:
    s = settings_from(args)
    try:
        first = json.loads(args.power.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--power {args.power}: not a readable study.json ({err})") from None
    if "runs" not in first:
        raise UserError(f"--power {args.power}: no 'runs' in it; expected a study.json")
    designs = list(dict.fromkeys([(s.bases, s.seeds), (6, 2), (8, 2), (6, 3), (4, 5)]))
    print(power_table(first, designs))
    print(
        f"\nMDE: the true mean IFT - SFT difference a two-sided 95% cluster-t test on B per-base means "
        f"(B bases x S seeds) detects with 80% power, from the seed and base SD of {args.power}."
    )
    return 0


def run_tuning(args: argparse.Namespace) -> int:
    from iftune.console import silence_libraries

    silence_libraries()
    state = git_state()  # the code the runs are made with
    s, work = settings_from(args), args.output_dir
    check_clean(state, args.allow_dirty, s.quick)
    work.mkdir(parents=True, exist_ok=True)
    check_resume(work, {**asdict(s), "role": "tuning"}, state)
    prepare_data(work, s)
    start = time.perf_counter()
    out = tune(work, s, args.workers, state)
    print("\nchosen on the validation split (mean step validity over the tuning bases):")
    for st in out["steps"]:
        scores = ", ".join(f"{v['values'][st['param']]:g}: {100 * v['step_validity']:.1f}" for v in st["validation"])
        edge = "  (at the grid's edge)" if st["at_edge"] else ""
        print(f"  {st['method']:<8} {st['param']:<13} {scores}  -> {st['chosen']:g}{edge}")
    pilot = out["pilot"]
    if pilot["mde"] is not None:
        print(
            f"pilot: seed SD of IFT - SFT {100 * pilot['seed_sd']:.1f} points of step validity, "
            f"base SD {100 * pilot['base_sd']:.1f}; MDE at {s.bases} x {s.seeds}: {100 * pilot['mde']:.1f} "
            "points (informational)"
        )
    print(f"{time.perf_counter() - start:.0f} s. wrote {work / 'tuning.json'} (commit {state['commit']})")
    return 0


def run_cell(work: Path, s: StudySettings, base: dict, seed: int, values: dict, order: list[str]) -> list[dict]:
    """Every method of one (base, seed), `sft` first (the sequential methods continue its model),
    skipping saved runs; the `sft` model is deleted once the cell is done."""
    heldout, results = read_split(work, "heldout"), []
    for m in order:
        path = run_path(work, base["index"], m, seed)
        if path.exists():
            continue
        results.append(
            run_one(work, s, base["index"], Path(base["path"]), m, seed, values[m], heldout, path, values["sft"])
        )
    shutil.rmtree(sft_dir(work, base["index"], seed, values["sft"]), ignore_errors=True)
    return results


def run_path(work: Path, base: int, method: str, seed: int) -> Path:
    return work / "runs" / f"base{base}" / f"{method}-seed{seed}.json"


def run_study(args: argparse.Namespace) -> int:
    from iftune.console import silence_libraries

    silence_libraries()
    state = git_state()  # the code the runs are made with
    s, work = settings_from(args), args.output_dir
    if not args.report_only:
        check_clean(state, args.allow_dirty, s.quick)
    if args.tuning is None:
        raise UserError("the comparison needs --tuning FILE (the tuning.json `iftune study --tune` wrote)")
    tuning = read_tuning(args.tuning, s)
    values = {m: tuning["values"][m] for m in s.methods}
    start = time.perf_counter()
    records = [json.loads(p.read_text()) for p in sorted((work / "bases").glob("base*.json"))]
    if args.report_only and not records:
        raise UserError(f"--report-only: {work} holds no study yet")
    work.mkdir(parents=True, exist_ok=True)
    state = check_resume(work, {**asdict(s), "role": "comparison", "values": values}, state, args.report_only)
    if not args.report_only:
        prepare_data(work, s)
        records = bases(work, s, s.base_seeds(), args.workers)
        order = ["sft", *(m for m in s.methods if m != "sft")]
        cells = [(b, seed) for seed in range(s.seeds) for b in records]
        todo = [c for c in cells if not all(run_path(work, c[0]["index"], m, c[1]).exists() for m in order)]
        print(f"{len(cells) - len(todo)} of {len(cells)} (base, seed) cells already saved in {work}, {len(todo)} to go")
        jobs = [partial(run_cell, work, s, b, seed, values, order) for b, seed in todo]
        execute(jobs, args.workers, f"fine-tuning and scoring ({len(order)} runs a cell)", "cell")
        with contextlib.suppress(OSError):
            (work / "models").rmdir()  # the cells delete their models; an interrupted one leaves its own
    paths = [run_path(work, b["index"], m, seed) for seed in range(s.seeds) for b in records for m in s.methods]
    runs = [json.loads(p.read_text()) for p in paths if p.exists()]
    missing = s.bases * s.seeds * len(s.methods) - len(runs)
    report(work, s, tuning, args.tuning, records, runs, time.perf_counter() - start, state, missing)
    return 0


def report(
    work: Path,
    s: StudySettings,
    tuning: dict,
    tuning_file: Path,
    records: list[dict],
    runs: list[dict],
    seconds: float,
    state: dict,
    missing: int = 0,
) -> dict:
    """Write study.json and study.png, print the tables; returns study.json's content."""
    analysis = analyse(runs, list(s.methods), s.n_boot, s.smallest_effect)
    settings = asdict(s)
    settings.pop("grid")
    out = {
        "settings": {
            **settings,
            "base_seeds": s.base_seeds(),
            "task_steps": [TASK_MIN_STEPS, TASK_MAX_STEPS],
            "data_seed": DATA_SEED,
            "methods": {m: {**asdict(METHODS[m]), "values": tuning["values"][m]} for m in s.methods},
            "learning_rates": {m: tuning["values"][m]["learning_rate"] for m in s.methods},
            "tuning": {
                "file": str(tuning_file),
                "commit": tuning.get("commit"),
                "grid": tuning["grid"],
                "steps": tuning["steps"],
                "at_edge": tuning["at_edge"],
                "pilot": tuning["pilot"],
            },
        },
        "commit": state["commit"],
        "git_status": state["status"],
        "answer": analysis["answer"],
        "positive_control": analysis["positive_control"],
        "runs_missing": missing,
        "bases": records,
        "methods": analysis["methods"],
        "comparisons": analysis["comparisons"],
        "runs": runs,
        "seconds_this_invocation": round(seconds, 1),
    }
    save_json(out, work / "study.json")
    forest_plot(analysis, work / "study.png")
    print(
        f"\n{len(records)} bases x {s.seeds} seeds; {s.steps} steps from a base, {s.extra_steps} more after sft; "
        f"held-out: {s.n_heldout} problems of {TASK_MIN_STEPS}-{TASK_MAX_STEPS} steps, greedy"
    )
    if missing:
        print(
            f"INCOMPLETE: {missing} of the study's runs are not saved yet; these numbers use the {len(runs)} that are"
        )
    control = analysis["positive_control"]
    if control:
        print(
            f"positive control ({control['comparison']}, step validity): {100 * control['mean']:+.1f} "
            f"[{100 * control['low']:+.1f}, {100 * control['high']:+.1f}] -> {'held' if control['held'] else 'FAILED'}"
        )
    print(table(analysis))
    print(
        f"\nmean ± sample std over all runs; a - b: mean over bases of the per-base mean paired difference; "
        f"cluster-t interval (decides) and hierarchical bootstrap (beside); p Holm: exploratory family.\n"
        f"Pre-registered answer (docs/study.md, IFT - SFT in step validity): {analysis['answer']}. "
        f"{seconds:.0f} s.\nwrote {work / 'study.json'} and {work / 'study.png'} (commit {state['commit']})"
    )
    return out
