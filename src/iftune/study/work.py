"""What the tuning and the comparison share: the data files, the base models, the process pool
with its progress bar, and the provenance check (the commit and `git status` of the code)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from iftune.demo.base import BaseSpec, base_model
from iftune.demo.data import make_splits, write_jsonl
from iftune.errors import UserError
from iftune.study.runs import read_jsonl, save_json
from iftune.study.settings import StudySettings

QUICK_BASE = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "intermediate_size": 32,
    "num_attention_heads": 2,
    "corpus_docs": 300,
    "batch_size": 8,
    "pretrain_steps": 3,
}


def base_spec(s: StudySettings, seed: int) -> BaseSpec:
    return BaseSpec(**QUICK_BASE, seed=seed) if s.quick else BaseSpec(seed=seed)


def prepare_data(work: Path, s: StudySettings) -> None:
    """One draw of training + validation + held-out problems (data seed 1234): the first n_train
    are trained on, the next n_valid score the tuning runs, the last n_heldout the comparison."""
    train, heldout = make_splits(s.n_train + s.n_valid, s.n_heldout)
    write_jsonl(train[: s.n_train], work / "data" / "train.jsonl")
    write_jsonl(train[s.n_train :], work / "data" / "valid.jsonl")
    write_jsonl(heldout, work / "data" / "heldout.jsonl")


def read_split(work: Path, name: str) -> list[dict]:
    return read_jsonl(work / "data" / f"{name}.jsonl")


def prepare_base(work: Path, s: StudySettings, seed: int) -> dict:
    """The base model pre-trained with `seed` (built and cached when missing); its record is
    cached in `bases/base<seed>.json`."""
    path = work / "bases" / f"base{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    spec = base_spec(s, seed)
    info = {"index": seed, "path": str(base_model(spec, build=True)), "spec": asdict(spec)}
    return json.loads(save_json(info, path).read_text())


def init_worker() -> None:
    """A pool process: one torch thread, quiet libraries, nothing downloaded."""
    import torch

    from iftune.console import silence_libraries

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(1)
    silence_libraries()


def execute(jobs: list[Callable], workers: int, desc: str, unit: str = "run") -> list:
    """Results of the jobs (callables), run in `workers` processes (in this one when 1), in
    completion order, under a progress bar with the time remaining."""
    from tqdm.auto import tqdm

    results = []
    with tqdm(total=len(jobs), desc=desc, unit=unit, smoothing=0) as bar:
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


def bases(work: Path, s: StudySettings, seeds: list[int], workers: int) -> list[dict]:
    """The records of the base models `seeds`, built in parallel where missing."""
    from functools import partial

    jobs = [partial(prepare_base, work, s, seed) for seed in seeds]
    return sorted(execute(jobs, min(workers, len(jobs)), "base models", "base"), key=lambda b: b["index"])


def git_state() -> dict:
    """{"commit": `git describe --always --dirty`, "status": `git status --porcelain` lines} of the
    source tree; both None when it is not a git checkout."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], check=True, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=20
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout

    commit, status = git("describe", "--always", "--dirty"), git("status", "--porcelain")
    return {
        "commit": commit.strip() if commit else None,
        "status": None if status is None else status.splitlines(),
    }


def check_clean(state: dict, allow_dirty: bool, quick: bool) -> None:
    """Refuse to make a result that will be published from code no commit holds: a tree with
    uncommitted changes, or no git checkout at all (--allow-dirty overrides; --quick is never
    published, so it is not checked)."""
    if allow_dirty or quick:
        return
    if state["commit"] is None:
        raise UserError(
            "the iftune source is not a git checkout, so no commit can name this study; --allow-dirty runs it anyway"
        )
    if state["status"]:
        raise UserError(
            f"the git tree has {len(state['status'])} uncommitted change(s) ({state['status'][0].strip()}, ...): "
            "commit them first (a published study must come from a clean commit) or pass --allow-dirty"
        )
