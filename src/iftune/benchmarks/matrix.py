"""`iftune bench --matrix`: every row of docs/performance.md's main table in one command.

Rows: each preset (qwen2.5-0.5b, llama-3.2-1b) at batch 1 and 4, in float32 and bf16 mixed
precision: IFT against the same-path SFT (time, CPU time, step peak and activation memory)
and, at qwen2.5-0.5b, against full-logits IFT; then DPO and ORPO per example against IFT at
qwen2.5-0.5b (batch 1, float32). Each row is one `run_bench` (memory in one process per
method, then the methods timed interleaved), `--steps` timed steps after `--warmup`. The JSON
is rewritten after each row (a failed row is recorded with its error and the others run), and
the table printed at the end is the one that goes in the docs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
import traceback
from dataclasses import replace
from typing import Any

from iftune.benchmarks.run import run_bench
from iftune.benchmarks.setup import PRESETS, Options

BATCHES = (1, 4)
PRECISIONS = ("fp32", "bf16")
# The methods of a row: full-logits IFT where its (B, T, V) logits fit this machine's memory.
WITH_NAIVE = {"qwen2.5-0.5b": ("sft", "ift", "naive_ift"), "llama-3.2-1b": ("sft", "ift")}
PREFERENCE = ("ift", "dpo", "orpo")
# Untimed steps per method before the timed ones. On a 2-core VM the first steps of a run's first
# row kept getting faster for about four steps (SFT at qwen batch 1, bf16: 4.15, 3.60, 3.03, 2.62,
# then 2.36-2.53 s), so one warm-up step left the ratio of that row to noise.
WARMUP = 3
STEPS = 5
COLUMNS = (
    ("IFT s/step", "ift", "step_s", ".2f"),
    ("SFT s/step", "sft", "step_s", ".2f"),
    ("IFT/SFT time", None, "ift_over_sft_time", ".3f"),
    ("IFT/SFT CPU time", None, "ift_over_sft_cpu_time", ".3f"),
    ("IFT/SFT memory", None, "ift_over_sft_memory", ".3f"),
    ("IFT/SFT activation", None, "ift_over_sft_activation_memory", ".3f"),
    ("naive/IFT time", None, "naive_over_ift_time", ".3f"),
    ("naive/IFT activation", None, "naive_over_ift_activation_memory", ".2f"),
)


def plan(presets: tuple[str, ...], batches: tuple[int, ...], precisions: tuple[str, ...]) -> list[dict[str, Any]]:
    """The rows, in order: every preset x batch x precision, then the preference row."""
    rows = [
        {"preset": p, "batch": b, "precision": x, "methods": list(WITH_NAIVE.get(p, ("sft", "ift")))}
        for p in presets
        for b in batches
        for x in precisions
    ]
    first = presets[0]
    rows.append({"preset": first, "batch": batches[0], "precision": precisions[0], "methods": list(PREFERENCE)})
    return rows


def commit() -> str | None:
    """The checked-out commit, with "+changes" when the tree is not clean (None outside git)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True)
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def run_matrix(
    rows: list[dict[str, Any]], path: str | None, *, warmup: int, steps: int, seed: int = 0, log=print
) -> dict[str, Any]:
    """Each row's `run_bench` (no sweep, no profile), the JSON rewritten after each row."""
    result: dict[str, Any] = {"commit": commit(), "warmup_steps": warmup, "timed_steps": steps, "rows": []}
    for row in rows:
        log(f"matrix: {row['preset']}, batch {row['batch']}, {row['precision']}: {', '.join(row['methods'])}")
        began = time.perf_counter()
        sizes = replace(PRESETS[row["preset"]], batch=row["batch"])
        try:
            got = run_bench(
                sizes,
                Options(seed, False, False, row["precision"]),
                warmup,
                steps,
                [],
                1,
                2,
                1,
                methods=tuple(row["methods"]),
                preset=row["preset"],
                log=log,
            )
        except Exception as err:  # recorded; the other rows still run
            got = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
            log(f"matrix: FAILED: {type(err).__name__}")
        result["rows"].append({**row, **got, "row_wall_s": round(time.perf_counter() - began, 1)})
        if path:
            with open(path, "w") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
    return result


def _cell(row: dict[str, Any], method: str | None, key: str, fmt: str) -> str:
    value = row.get("methods", {}).get(method, {}).get(key) if method else row.get("ratios", {}).get(key)
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def format_matrix(result: dict[str, Any]) -> str:
    """The rows as a Markdown table (the IFT/SFT rows, then the preference methods per example)."""
    head = ["preset", "batch", "precision", *(c[0] for c in COLUMNS)]
    lines = [f"commit {result['commit']}, {result['warmup_steps']} warm-up + {result['timed_steps']} timed steps"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    prefs = []
    for row in result["rows"]:
        if "dpo" in row["methods"]:
            prefs.append(row)
            continue
        cells = [row["preset"], str(row["batch"]), row["precision"]]
        if "error" in row:
            cells.append(f"failed: {row['error'].splitlines()[0][:80]}")
        else:
            cells += [_cell(row, *c[1:]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    for row in prefs:
        lines += [
            "",
            f"{row['preset']}, batch {row['batch']}, {row['precision']}: per example",
            "| method | s/example | step peak MiB |",
            "|---|---:|---:|",
        ]
        if "error" in row:
            lines.append(f"failed: {row['error'].splitlines()[0][:80]}")
            continue
        for m in row["methods"]:
            lines.append(f"| {m} | {_cell(row, m, 'example_s', '.3f')} | {_cell(row, m, 'step_peak_mb', '.0f')} |")
        for key in ("ift_over_dpo_time_per_example", "ift_over_orpo_time_per_example"):
            lines.append(f"{key}: {_cell(row, None, key, '.3f')}")
    loads = [r.get("loadavg_1min") for r in result["rows"] if r.get("loadavg_1min")]
    if loads:
        lines.append("")
        lines.append("1-minute load average at each row's start: " + ", ".join(str(load["start"]) for load in loads))
    return "\n".join(lines)


__all__ = ["BATCHES", "PRECISIONS", "commit", "format_matrix", "plan", "run_matrix"]
