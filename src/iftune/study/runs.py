"""One run of the study: a method fine-tuned from one base with one seed, then scored.

Each finished run is saved as `runs/base<b>/<method>-seed<s>.json` (written under a temporary
name, then renamed), so an interrupted study continues from the runs already saved. The model
folders are deleted once scored: the result is the JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from iftune.demo import fine_tune
from iftune.demo.data import write_jsonl
from iftune.demo.evaluate import answers, evaluate
from iftune.study.pairs import build_pairs
from iftune.study.settings import METHODS, Stage, StudySettings


def save_json(data: dict, path: Path) -> Path:
    """Write `data` to `path` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
    return path


def run_path(work: Path, base: int, method: str, seed: int) -> Path:
    return work / "runs" / f"base{base}" / f"{method}-seed{seed}.json"


def base_pairs_path(work: Path, base: int) -> Path:
    return work / "pairs" / f"base{base}.jsonl"


def make_pairs(model_dir: Path, examples: list[dict], chat: bool, path: Path) -> dict:
    """Preference pairs from `model_dir`'s own answers to `examples`, written to `path` (JSONL);
    returns the counts of `build_pairs`."""
    generated = answers(model_dir, [e["messages"][0]["content"] for e in examples], chat)
    rows, counts = build_pairs(examples, generated)
    tmp = write_jsonl(rows, path.with_suffix(".tmp"))
    os.replace(tmp, path)
    save_json(counts, path.with_suffix(".counts.json"))
    return counts


def stage_data(
    stage: Stage, steps: int, model: Path, out: Path, work: Path, base: int, examples: list[dict], s: StudySettings
) -> tuple[Path, dict | None]:
    """(training file of the stage, pair counts when it uses pairs). "self" pairs are made here,
    from `model`'s own answers to the first steps x batch problems of `examples`."""
    if stage.pairs is None:
        return work / "data" / "train.jsonl", None
    if stage.pairs == "base":
        path = base_pairs_path(work, base)
        return path, json.loads(path.with_suffix(".counts.json").read_text())
    path = out.with_name(out.name + "-pairs.jsonl")  # beside the stage's folder: training wants it empty
    return path, make_pairs(model, examples[: s.pair_prompts(steps)], True, path)


def run_one(
    work: Path,
    s: StudySettings,
    base: int,
    base_dir: Path,
    method: str,
    seed: int,
    pair_examples: list[dict],
    heldout: list[dict],
) -> dict:
    """Train `method` from `base_dir` with `seed`, score it, save and return the result."""
    start = time.perf_counter()
    model, out, pairs, losses = base_dir, work / "models" / f"base{base}-{method}-seed{seed}", None, []
    shutil.rmtree(out, ignore_errors=True)  # what an interrupted attempt left: this run starts afresh
    for i, stage in enumerate(METHODS[method]):
        stage_out, steps = out / f"stage{i}", max(1, round(stage.share * s.steps))
        data, counts = stage_data(stage, steps, model, stage_out, work, base, pair_examples, s)
        pairs = counts or pairs
        beta = ("--beta", str(s.beta)) if stage.command in ("dpo", "orpo") else ()
        history = fine_tune(
            stage.command,
            model,
            data,
            stage_out,
            steps,
            seed,
            (*beta, *stage.flags),
            learning_rate=s.learning_rate,
            batch_size=s.batch_size,
            logging_steps=10,
        )
        losses += [h["loss"] for h in history if "loss" in h and "step" in h]
        model = stage_out
    train_seconds = time.perf_counter() - start
    result = {
        "base": base,
        "seed": seed,
        "method": method,
        **evaluate(model, heldout),
        "pairs": pairs,
        "final_train_loss": losses[-1] if losses else None,
        "train_seconds": round(train_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
    }
    shutil.rmtree(out, ignore_errors=True)
    save_json(result, run_path(work, base, method, seed))
    return result
