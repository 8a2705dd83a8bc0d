"""One run of the study: a method fine-tuned from a base (or from the `sft` run of the same base
and seed) with one seed and one set of values, then scored.

Each finished run is saved as a JSON file (written under a temporary name, then renamed), so an
interrupted study continues from the runs already saved. A model is trained into a temporary
folder and renamed when complete; the `sft` models are kept while a sequential method may still
start from them, every other model is deleted once scored: the result is the JSON.
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
from iftune.study.settings import FLAG, METHODS, StudySettings
from iftune.study.validity import mean_validity


def save_json(data: dict, path: Path) -> Path:
    """Write `data` to `path` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def values_key(values: dict) -> str:
    """A run's values as part of a file name: `learning_rate=0.001,max_lambda=0.2`."""
    return ",".join(f"{k}={values[k]:g}" for k in sorted(values))


def sft_dir(work: Path, base: int, seed: int, values: dict) -> Path:
    """Where the `sft` model of (base, seed, values) is kept for the sequential methods."""
    return work / "models" / f"base{base}-sft-seed{seed}-{values_key(values)}"


def method_flags(method: str, values: dict) -> tuple[str, ...]:
    """The method's own flags plus a flag per tuned value (the learning rate is passed apart);
    a value the method's own flags already set (ift_prop's --max_lambda 0) is left out."""
    own = METHODS[method].flags
    extra = [(FLAG[k], f"{v:g}") for k, v in sorted(values.items()) if k != "learning_rate" and FLAG[k] not in own]
    return (*own, *(item for pair in extra for item in pair))


def score_model(model_dir: Path, examples: list[dict]) -> dict:
    """Step validity, validity after the first error, exact match, step accuracy, teacher-forced
    NLL and three samples of the model on `examples`."""
    result = evaluate(model_dir, examples)
    generated = result.pop("generated")
    return {**mean_validity(generated, [e["messages"][0]["content"] for e in examples]), **result}


def make_pairs(model_dir: Path, examples: list[dict], path: Path) -> dict:
    """Preference pairs from `model_dir`'s own answers (chat template) to `examples`, written to
    `path` (JSONL); returns the counts of `build_pairs`."""
    generated = answers(model_dir, [e["messages"][0]["content"] for e in examples], True)
    rows, counts = build_pairs(examples, generated)
    os.replace(write_jsonl(rows, path.with_suffix(".tmp")), path)
    return counts


def train(
    work: Path, s: StudySettings, method: str, start: Path, values: dict, seed: int, out: Path
) -> tuple[Path, dict | None, float | None]:
    """Fine-tune `method`'s stage from `start` into `out` (renamed into place when complete);
    returns (out, pair counts or None, last logged training loss)."""
    m = METHODS[method]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted attempt left: this run starts afresh
    data, counts = work / "data" / "train.jsonl", None
    if m.pairs:
        data = tmp.with_name(tmp.name + "-pairs.jsonl")  # beside the folder: training wants it empty
        counts = make_pairs(start, read_jsonl(work / "data" / "train.jsonl")[: s.pair_prompts()], data)
    history = fine_tune(
        m.command,
        start,
        data,
        tmp,
        s.extra_steps if m.after_sft else s.steps,
        seed,
        method_flags(method, values),
        learning_rate=values["learning_rate"],
        batch_size=s.batch_size,
        logging_steps=10,
    )
    if m.pairs:
        data.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    losses = [h["loss"] for h in history if "loss" in h and "step" in h]
    return out, counts, losses[-1] if losses else None


def ensure_sft(work: Path, s: StudySettings, base: int, base_dir: Path, seed: int, values: dict) -> Path:
    """The kept `sft` model of (base, seed, values), trained again when missing (training is
    deterministic on one machine, so it is the model the `sft` run scored)."""
    out = sft_dir(work, base, seed, values)
    if not (out / "config.json").exists():
        train(work, s, "sft", base_dir, values, seed, out)
    return out


def run_one(
    work: Path,
    s: StudySettings,
    base: int,
    base_dir: Path,
    method: str,
    seed: int,
    values: dict,
    examples: list[dict],
    path: Path,
    sft_values: dict | None = None,
) -> dict:
    """Train `method` with `values` and `seed` from the base (or, for a sequential method, from
    the `sft` model made with `sft_values`), score it on `examples`, save the result at `path`."""
    start = time.perf_counter()
    m = METHODS[method]
    if method == "sft":
        out = sft_dir(work, base, seed, values)
        model, counts, loss = train(work, s, method, base_dir, values, seed, out)
    else:
        source = ensure_sft(work, s, base, base_dir, seed, sft_values or {}) if m.after_sft else base_dir
        out = work / "models" / f"base{base}-{method}-seed{seed}-{values_key(values)}"
        model, counts, loss = train(work, s, method, source, values, seed, out)
    train_seconds = time.perf_counter() - start
    result = {
        "base": base,
        "seed": seed,
        "method": method,
        "values": values,
        **score_model(model, examples),
        "pairs": counts,
        "final_train_loss": loss,
        "train_seconds": round(train_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if method != "sft":
        shutil.rmtree(out, ignore_errors=True)
    save_json(result, path)
    return result
