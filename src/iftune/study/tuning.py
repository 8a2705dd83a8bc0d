"""`iftune study --tune`: each method's learning rate (IFT's lam, DPO's beta) chosen on the
validation split, on the tuning bases only, by the pre-registered coordinate search (docs/study.md).

Each step of `StudySettings.grid` trains its method at every grid value on every tuning base
(fine-tuning seed 0), scores it on the validation problems and keeps the value with the highest
mean step validity (ties: the value listed first). Later steps hold what earlier steps chose; the
sequential methods start from the tuning base's `sft` model at SFT's chosen values. A pilot then
runs SFT and IFT at their chosen values with more seeds, for the seed variation of IFT - SFT.
Every run is saved as it finishes, so an interrupted tuning continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

from iftune.errors import UserError
from iftune.stats import mean_std, minimal_detectable_effect, variance_components
from iftune.study.runs import run_one, save_json, values_key
from iftune.study.settings import DEFAULTS, FLAG, METHODS, PRIMARY, StudySettings
from iftune.study.work import bases, execute, read_split

# Settings a tuning file must share with the comparison that reads it.
MATCHING = ("steps", "extra_steps", "batch_size", "n_train", "n_valid", "quick")


def tuning_path(work: Path, base: int, method: str, seed: int, values: dict, sft_values: dict | None) -> Path:
    after = f"-after-{values_key(sft_values)}" if METHODS[method].after_sft else ""
    return work / "runs" / f"base{base}" / f"{method}-seed{seed}-{values_key(values)}{after}.json"


def start_values(method: str, chosen: dict) -> dict:
    """The values `method` holds before its next step: what it chose so far, else its defaults
    ("ift" stands for IFT's chosen value)."""
    if method in chosen:
        return dict(chosen[method])
    return {k: chosen["ift"][k] if v == "ift" else v for k, v in DEFAULTS.get(method, {}).items()}


def run_grid(
    work: Path, s: StudySettings, records: list[dict], method: str, candidates: list[dict], seeds: tuple[int, ...],
    sft_values: dict | None, workers: int, desc: str,
) -> dict[str, list[dict]]:  # fmt: skip
    """Every candidate on every tuning base and seed (saved runs are read, not repeated):
    {values_key: [run, ...]}."""
    valid = read_split(work, "valid")
    todo, paths = [], {}
    for values in candidates:
        for b in records:
            for seed in seeds:
                path = tuning_path(work, b["index"], method, seed, values, sft_values)
                paths.setdefault(values_key(values), []).append(path)
                if not path.exists():
                    args = (work, s, b["index"], Path(b["path"]), method, seed, values, valid, path, sft_values)
                    todo.append(partial(run_one, *args))
    execute(todo, workers, desc)
    return {key: [json.loads(p.read_text()) for p in ps] for key, ps in paths.items()}


def tune(work: Path, s: StudySettings, workers: int, state: dict) -> dict:
    """Run the coordinate search and the pilot; write and return tuning.json."""
    records = bases(work, s, list(s.tuning_bases), workers)
    chosen: dict[str, dict] = {}
    steps, all_runs = [], []
    metric = PRIMARY[2]
    for i, step in enumerate(s.grid):
        held = start_values(step.method, chosen)
        candidates = [{**held, step.param: v} for v in step.values]
        sft_values = chosen.get("sft") if METHODS[step.method].after_sft else None
        if METHODS[step.method].after_sft and sft_values is None:
            raise UserError(f"tuning grid: step {i + 1} ({step.method}) needs SFT's step before it")
        runs = run_grid(
            work, s, records, step.method, candidates, (0,), sft_values, workers,
            f"tuning {i + 1}/{len(s.grid)}: {step.method} {step.param}",
        )  # fmt: skip
        scores = [mean_std([r[metric] for r in runs[values_key(c)]])[0] for c in candidates]
        best = max(range(len(candidates)), key=lambda j: (round(scores[j], 4), -j))
        chosen[step.method] = candidates[best]
        steps.append(
            {
                "method": step.method,
                "param": step.param,
                "grid": list(step.values),
                "held": held,
                "from_sft": sft_values,
                "validation": [
                    {"values": c, metric: sc, "per_base": {str(r["base"]): r[metric] for r in runs[values_key(c)]}}
                    for c, sc in zip(candidates, scores)
                ],
                "chosen": step.values[best],
                "at_edge": len(step.values) > 1 and best in (0, len(step.values) - 1),
            }
        )
        all_runs += [r for rs in runs.values() for r in rs]
    # an ablation takes its parent's values, less those its own flags fix (ift_prop: lam 0)
    values = {
        m: {k: v for k, v in chosen[METHODS[m].tuned_as or m].items() if FLAG[k] not in METHODS[m].flags}
        for m in s.methods
    }
    pilot = run_pilot(work, s, records, chosen, workers)
    out = {
        "settings": {k: getattr(s, k) for k in (*MATCHING, "tuning_bases", "pilot_seeds")},
        "grid": [{"method": g.method, "param": g.param, "values": list(g.values)} for g in s.grid],
        "steps": steps,
        "values": values,
        "learning_rates": {m: v["learning_rate"] for m, v in values.items()},
        "at_edge": [f"{st['method']} {st['param']}" for st in steps if st["at_edge"]],
        "pilot": pilot,
        "commit": state["commit"],
        "git_status": state["status"],
        "bases": records,
        "runs": all_runs,
    }
    save_json(out, work / "tuning.json")
    shutil.rmtree(work / "models", ignore_errors=True)  # the kept sft models: the results are the JSON
    return out


def run_pilot(work: Path, s: StudySettings, records: list[dict], chosen: dict, workers: int) -> dict:
    """SFT and IFT at their chosen values with seed 0 (already run) and the pilot seeds, on the
    tuning bases' validation split: the seed and base SD of IFT - SFT in the primary metric and
    the minimal detectable effect they give the comparison's design (informational)."""
    a, b, metric = PRIMARY
    seeds = (0, *s.pilot_seeds)
    runs = {
        m: run_grid(work, s, records, m, [chosen[m]], seeds, None, workers, f"pilot: {m}")[values_key(chosen[m])]
        for m in (a, b)
    }
    xa = {(r["base"], r["seed"]): r[metric] for r in runs[a]}
    groups: dict[int, list[float]] = {}
    for r in runs[b]:
        groups.setdefault(r["base"], []).append(xa[(r["base"], r["seed"])] - r[metric])
    out: dict = {"metric": metric, "seeds": list(seeds), "differences": {str(k): v for k, v in groups.items()}}
    try:
        parts = variance_components(groups)
    except ValueError:  # fewer than 2 bases of 2 seeds (--quick)
        return {**out, "seed_sd": None, "base_sd": None, "mde": None}
    mde = minimal_detectable_effect(parts["seed_sd"], parts["base_sd"], s.bases, s.seeds)
    return {**out, **parts, "mde": mde, "design": [s.bases, s.seeds]}


def read_tuning(path: Path, s: StudySettings) -> dict:
    """The tuning file the comparison runs with, checked against its settings and methods."""
    if not path.is_file():
        raise UserError(f"--tuning {path}: no such file (`iftune study --tune` writes one as tuning.json)")
    try:
        tuning = json.loads(path.read_text())
        given = tuning["settings"]
        values = tuning["values"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"--tuning {path}: not a tuning file written by `iftune study --tune` ({err})") from None
    differ = [k for k in MATCHING if given.get(k) != getattr(s, k)]
    if differ:
        raise UserError(
            f"--tuning {path}: tuned with other settings ({', '.join(f'{k}={given.get(k)}' for k in differ)}); "
            f"this study has {', '.join(f'{k}={getattr(s, k)}' for k in differ)}"
        )
    missing = [m for m in s.methods if m not in values]
    if missing:
        raise UserError(f"--tuning {path}: no tuned values for {', '.join(missing)}")
    return tuning
