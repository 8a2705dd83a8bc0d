"""summary.json, the paper's Table 3 layout in Markdown, and several runs side by side."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iftune.errors import UserError


@dataclass(frozen=True)
class Column:
    """One benchmark column of the paper's Table 3: lm-eval task, shots and headline metric."""

    title: str
    task: str
    num_fewshot: int
    metric: str


# The paper's Table 3 (Open LLM Leaderboard settings, chat template on, few-shot as multi-turn).
LEADERBOARD: tuple[Column, ...] = (
    Column("ARC", "arc_challenge", 25, "acc_norm,none"),
    Column("ARC-Gen", "arc_gen", 25, "exact_match,extract-letter"),
    Column("MMLU", "mmlu", 5, "acc,none"),
    Column("TruthfulQA", "truthfulqa_mc2", 0, "acc,none"),
    Column("WinoGrande", "winogrande", 5, "acc,none"),
    Column("GSM8K", "gsm8k", 5, "exact_match,strict-match"),
)
BY_TASK = {c.task: c for c in LEADERBOARD}


def main_metric(task: str, scores: dict[str, Any]) -> str | None:
    """The headline metric of `task` in lm-eval's results: the paper's for its columns,
    otherwise the first metric the task reports (lm-eval keeps the YAML's order)."""
    known = BY_TASK.get(task)
    if known and known.metric in scores:
        return known.metric
    for key, value in scores.items():
        if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
            return key
    return None


def summarize(results: dict[str, Any], tasks: list[str], model: str, adapter: str | None) -> dict[str, Any]:
    """summary.json: task -> {metric, value, column} for each requested task or group."""
    scores = {**results.get("results", {}), **results.get("groups", {})}
    summary: dict[str, Any] = {"model": model, "adapter": adapter, "tasks": {}}
    for task in tasks:
        metric = main_metric(task, scores.get(task, {}))
        if metric is None:
            continue
        column = BY_TASK[task].title if task in BY_TASK else task
        summary["tasks"][task] = {"metric": metric, "value": scores[task][metric], "column": column}
    return summary


def row_label(summary: dict[str, Any]) -> str:
    model = Path(str(summary["model"])).name or str(summary["model"])
    adapter = summary.get("adapter")
    return f"{model} + {Path(adapter).name}" if adapter else model


# The paper's Avg. is the mean of the five Open LLM Leaderboard columns: ARC-Gen, a second
# reading of the ARC questions, is left out (Table 3, e.g. Mistral-7B: 54.79).
NOT_AVERAGED = {"ARC-Gen"}


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    """One row per run, columns in Table 3 order first, then any other task; scores x100."""
    present = {t["column"] for s in summaries for t in s["tasks"].values()}
    columns = [c.title for c in LEADERBOARD if c.title in present]
    columns += sorted(present - set(columns))
    averaged = [c for c in columns if c not in NOT_AVERAGED]
    header = ["Model", *columns] + (["Avg."] if len(averaged) > 1 else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    for summary in summaries:
        values = {t["column"]: 100 * float(t["value"]) for t in summary["tasks"].values()}
        cells = [f"{values[c]:.2f}" if c in values else "–" for c in columns]
        if len(averaged) > 1:
            # an average over fewer columns than the table has would not be comparable
            full = all(c in values for c in averaged)
            cells.append(f"{sum(values[c] for c in averaged) / len(averaged):.2f}" if full else "–")
        lines.append("| " + " | ".join([row_label(summary), *cells]) + " |")
    return "\n".join(lines) + "\n"


def load_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise UserError(f"--compare: {path} not found (expected an `iftune eval` output dir)")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"--compare: {path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("tasks"), dict):
        raise UserError(f"--compare: {path} has no 'tasks' mapping")
    return summary


def compare(run_dirs: list[str]) -> str:
    """Markdown table with one row per `iftune eval` output directory."""
    return markdown_table([load_summary(Path(d)) for d in run_dirs])
