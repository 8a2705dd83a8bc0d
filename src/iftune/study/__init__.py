"""`iftune study`: does IFT help? SFT, IFT, its two halves, DPO, ORPO and SFT -> DPO, from several
base models and seeds, on the demo's compounding-error task, with paired 95% intervals.

docs/study.md holds the pre-registered settings and analysis, and the result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from iftune.demo.base import BaseSpec, base_model, single_thread
from iftune.demo.data import (
    DATA_SEED,
    TASK_MAX_STEPS,
    TASK_MIN_STEPS,
    make_splits,
    write_jsonl,
)
from iftune.demo.evaluate import evaluate
from iftune.errors import UserError
from iftune.study.analysis import analyse, forest_plot, primary, table
from iftune.study.runs import base_pairs_path, make_pairs, run_one, run_path, save_json
from iftune.study.settings import METHODS, QUICK, StudySettings

QUICK_BASE = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "intermediate_size": 32,
    "num_attention_heads": 2,
    "corpus_docs": 300,
    "batch_size": 8,
    "pretrain_steps": 3,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    d = StudySettings()
    p = argparse.ArgumentParser(
        prog="iftune study", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--bases", type=int, default=d.bases, help="base models (pre-training seeds 0..N-1; 0 ships with iftune)"
    )
    p.add_argument("--seeds", type=int, default=d.seeds, help="fine-tuning seeds per base and method")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per run")
    p.add_argument("--methods", nargs="+", default=list(d.methods), choices=list(METHODS), help="methods to run")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (processes, one torch thread each)")
    p.add_argument(
        "--output-dir",
        "--output_dir",
        dest="output_dir",
        default="outputs/study",
        help="study.json, study.png, and every run's result (a rerun continues from them)",
    )
    p.add_argument(
        "--build-base",
        action="store_true",
        help="build base 0 with the builder instead of using the copy shipped with iftune",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="analyse the runs saved so far in --output-dir without running more (same settings)",
    )
    p.add_argument("--quick", action="store_true", help="a tiny, minute-long version for tests")
    args = p.parse_args(argv)
    for flag in ("bases", "seeds", "steps", "workers"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag}={getattr(args, flag)}: expected an integer >= 1")
    if "sft" not in args.methods:
        raise UserError("--methods: the differences are taken against sft, so it must be one of them")
    return args


def settings_from(args: argparse.Namespace) -> StudySettings:
    """The study's settings; --quick shrinks everything (flags still override bases/seeds/steps)."""
    s = StudySettings(bases=args.bases, seeds=args.seeds, steps=args.steps, methods=tuple(args.methods))
    if args.quick:
        default = StudySettings()
        given = {k: getattr(args, k) for k in ("bases", "seeds", "steps") if getattr(args, k) != getattr(default, k)}
        s = replace(s, **{**QUICK, **given})
    return s


def base_spec(s: StudySettings, index: int) -> BaseSpec:
    return BaseSpec(**QUICK_BASE, seed=index) if s.quick else BaseSpec(seed=index)


def check_resume(work: Path, s: StudySettings, build: bool) -> None:
    """Refuse to mix runs made under other settings into this study's results."""
    saved = work / "settings.json"
    mine = {**asdict(s), "build_base": build}
    if saved.exists():
        before = json.loads(saved.read_text())
        changed = sorted(k for k in mine if k != "methods" and before.get(k) != mine[k])
        if changed:
            raise UserError(
                f"--output-dir {work} holds a study with other settings ({', '.join(changed)}); "
                f"use another --output-dir or delete it"
            )
    save_json(mine, saved)


def prepare_data(work: Path, s: StudySettings) -> tuple[list[dict], list[dict]]:
    """(training problems that get preference pairs, held-out problems); writes the data files."""
    train, heldout = make_splits(s.n_train, s.n_heldout)
    write_jsonl(train, work / "data" / "train.jsonl")
    write_jsonl(heldout, work / "data" / "heldout.jsonl")
    return train[: s.pair_prompts(s.steps)], heldout


def prepare_base(work: Path, s: StudySettings, index: int, build: bool) -> dict:
    """Base `index`: its folder (built when missing), its preference pairs from its own answers,
    and its held-out score; cached in `bases/base<index>.json`."""
    path = work / "bases" / f"base{index}.json"
    if path.exists():
        return json.loads(path.read_text())
    folder = base_model(base_spec(s, index), build=build)
    pair_examples, heldout = read_data(work, s)
    counts = make_pairs(folder, pair_examples, False, base_pairs_path(work, index))
    score = evaluate(folder, heldout)
    info = {
        "index": index,
        "path": str(folder),
        "spec": asdict(base_spec(s, index)),
        "pairs": counts,
        "score": {k: score[k] for k in ("exact_match", "step_accuracy", "heldout_nll")},
    }
    return json.loads(save_json(info, path).read_text())


def read_data(work: Path, s: StudySettings) -> tuple[list[dict], list[dict]]:
    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (work / "data" / name).read_text().splitlines()]

    return rows("train.jsonl")[: s.pair_prompts(s.steps)], rows("heldout.jsonl")


def run_job(work: Path, s: StudySettings, base: dict, method: str, seed: int) -> dict:
    pair_examples, heldout = read_data(work, s)
    return run_one(work, s, base["index"], Path(base["path"]), method, seed, pair_examples, heldout)


def init_worker() -> None:
    """A pool process: one torch thread, quiet libraries, nothing downloaded."""
    import torch

    from iftune.console import silence_libraries

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    silence_libraries()


def execute(jobs: list, workers: int, desc: str) -> list:
    """Results of the jobs (callables), run in `workers` processes (in this one when 1), in
    completion order, under a progress bar with the time remaining."""
    from tqdm.auto import tqdm

    results = []
    with tqdm(total=len(jobs), desc=desc, unit="run", smoothing=0) as bar:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(job())
                bar.update()
            return results
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker) as pool:
            for future in as_completed([pool.submit(job) for job in jobs]):
                results.append(future.result())
                bar.update()
    return results


def commit() -> str | None:
    """`git describe --always --dirty` of the source tree, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            check=False,
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with single_thread():
        return run_study(args)


def run_study(args: argparse.Namespace) -> int:
    from iftune.console import silence_libraries

    silence_libraries()
    start, source = time.perf_counter(), commit()  # the code the runs are made with
    s, work = settings_from(args), Path(args.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    check_resume(work, s, args.build_base)
    if args.report_only:
        bases = [json.loads(p.read_text()) for p in sorted((work / "bases").glob("base*.json"))]
        if not bases:
            raise UserError(f"--report-only: {work} holds no study yet")
    else:
        prepare_data(work, s)
        bases = sorted(
            execute(
                [partial(prepare_base, work, s, b, args.build_base) for b in range(s.bases)],
                min(args.workers, s.bases),
                "base models",
            ),
            key=lambda b: b["index"],
        )
        todo = [
            (b, m, seed)
            for seed in range(s.seeds)
            for b in bases
            for m in s.methods
            if not run_path(work, b["index"], m, seed).exists()
        ]
        print(f"{s.bases * s.seeds * len(s.methods) - len(todo)} runs already saved in {work}, {len(todo)} to go")
        execute([partial(run_job, work, s, b, m, seed) for b, m, seed in todo], args.workers, "fine-tuning and scoring")
    paths = [run_path(work, b["index"], m, seed) for seed in range(s.seeds) for b in bases for m in s.methods]
    runs = [json.loads(p.read_text()) for p in paths if p.exists()]
    report(
        work,
        s,
        bases,
        runs,
        time.perf_counter() - start,
        source,
        missing=s.bases * s.seeds * len(s.methods) - len(runs),
    )
    return 0


def report(
    work: Path,
    s: StudySettings,
    bases: list[dict],
    runs: list[dict],
    seconds: float,
    source: str | None,
    missing: int = 0,
) -> dict:
    """Write study.json and study.png, print the tables; returns study.json's content."""
    analysis = analyse(runs, list(s.methods), s.n_boot)
    answer = primary(analysis)
    out = {
        "settings": {
            **asdict(s),
            "task_steps": [TASK_MIN_STEPS, TASK_MAX_STEPS],
            "data_seed": DATA_SEED,
            "methods": {m: [asdict(st) for st in METHODS[m]] for m in s.methods},
        },
        "commit": source,
        "answer": answer,
        "runs_missing": missing,
        "bases": bases,
        **analysis,
        "runs": runs,
        "seconds_this_invocation": round(seconds, 1),
    }
    save_json(out, work / "study.json")
    forest_plot(analysis, work / "study.png")
    print(
        f"\n{s.bases} bases x {s.seeds} seeds, {s.steps} steps per run; held-out: {s.n_heldout} problems "
        f"of {TASK_MIN_STEPS}-{TASK_MAX_STEPS} steps, greedy"
    )
    if missing:
        print(
            f"INCOMPLETE: {missing} of the study's runs are not saved yet; these numbers use the {len(runs)} that are"
        )
    print(table(analysis))
    print(
        f"\nmean ± sample std over all runs; a - b: mean over bases of the per-base mean paired difference, "
        f"95% hierarchical bootstrap interval.\nPre-registered answer (docs/study.md): {answer}. "
        f"{seconds:.0f} s.\nwrote {work / 'study.json'} and {work / 'study.png'}"
    )
    return out
