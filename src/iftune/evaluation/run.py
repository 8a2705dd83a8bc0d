"""`iftune eval`: the paper's benchmarks (Table 3) through lm-evaluation-harness.

Everything that can fail on user input (unknown task, missing data offline, tokenizer without
chat template) is checked before the model is loaded, and reported as one line.
"""

from __future__ import annotations

import argparse
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from iftune.errors import UserError, usage_error
from iftune.evaluation import data as data_mod
from iftune.evaluation.report import LEADERBOARD, compare, markdown_table, summarize

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iftune eval",
        description="Evaluate a model (full or LoRA) with lm-evaluation-harness; "
        "`--tasks leaderboard` gives the paper's Table 3 row.",
    )
    p.add_argument("--model", help="model directory or hub id (the base model for --adapter)")
    p.add_argument("--adapter", help="PEFT (LoRA) adapter directory applied on top of --model")
    p.add_argument(
        "--tasks",
        default="leaderboard",
        help="`leaderboard` (ARC 25-shot, ARC-Gen 25, MMLU 5, TruthfulQA 0, "
        "WinoGrande 5, GSM8K 5) or comma-separated lm-eval task/group names",
    )
    p.add_argument("--limit", type=float, help="examples per task (a fraction if < 1); for quick checks only")
    p.add_argument("--num-fewshot", type=int, help="override every task's shot count (tasks fixed at 0 shots stay 0)")
    p.add_argument("--output-dir", help="where results go (default: eval/<model name>); --output_dir works too")
    p.add_argument(
        "--no-chat-template",
        action="store_true",
        help="plain-text prompts; by default the chat template is applied and "
        "few-shot examples are given as a multi-turn conversation",
    )
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="folder of your own lm-eval task YAMLs (repeatable)",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="local copies of hub data sets laid out as on the hub, "
        "e.g. DIR/allenai/ai2_arc/ARC-Challenge/test-00000-of-00001.parquet",
    )
    p.add_argument("--batch-size", default="8", help="int or `auto` (default 8)")
    p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="model dtype (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=1234, help="random and few-shot sampling seed")
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="DIR",
        help="print (and with --output-dir write) a table of earlier runs; no model is loaded",
    )
    return p


def main(argv: list[str]) -> int:
    """Entry point of `iftune eval`."""
    parser = build_parser()
    parser.error = usage_error("eval")
    args = parser.parse_args(argv)
    if args.compare:
        return run_compare(args.compare, args.output_dir)
    if not args.model:
        raise UserError("--model is required (or use --compare DIR1 DIR2 ...)")
    _check_counts(args)
    chat = not args.no_chat_template
    plan = task_plan(args.tasks)
    out = Path(args.output_dir or Path("eval") / Path(args.model.rstrip("/")).name)
    manager = task_manager_for(list(plan), [Path(p) for p in args.include_path])
    leaves = {name: data_mod.leaf_configs(manager.task_index, name) for name in plan}
    specs = task_specs(plan, leaves, manager, args.data_dir)
    tokenizer_src = tokenizer_source(args.model, args.adapter)
    if chat:
        check_chat_template(tokenizer_src)
    tracker = make_tracker(out)
    results = evaluate(args, specs, manager, tokenizer_src, chat, tracker)
    names = summary_names(leaves, results)
    write_outputs(out, results, tracker, names, args.model, args.adapter)
    return 0


def _check_counts(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit: expected a count >= 1 or a fraction in (0, 1), got {args.limit}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot: expected a count >= 0, got {args.num_fewshot}")
    if args.batch_size != "auto" and (not args.batch_size.isdigit() or int(args.batch_size) < 1):
        raise UserError(f"--batch-size: expected a positive integer or `auto`, got {args.batch_size!r}")


def summary_names(leaves: dict[str, list[tuple[str, dict]]], results: dict[str, Any]) -> list[str]:
    """The requested tasks and groups; a tag has no score of its own, so its tasks stand in."""
    scored = {**results.get("results", {}), **results.get("groups", {})}
    names: list[str] = []
    for name, members in leaves.items():
        names += [name] if name in scored else [t for t, _ in members if t in scored]
    return names


def run_compare(run_dirs: list[str], output_dir: str | None) -> int:
    table = compare(run_dirs)
    print(table, end="")
    if output_dir:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "compare.md").write_text(table)
    return 0


def task_plan(tasks: str) -> dict[str, dict[str, Any]]:
    """task name -> config overrides; `leaderboard` expands to the paper's columns and shots."""
    plan: dict[str, dict[str, Any]] = {}
    for name in (t.strip() for t in tasks.split(",")):
        if name == "leaderboard":
            plan.update({c.task: {"num_fewshot": c.num_fewshot} for c in LEADERBOARD})
        elif name:
            plan.setdefault(name, {})
    if not plan:
        raise UserError("--tasks: expected `leaderboard` or comma-separated task names")
    return plan


@lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=defaults)


def task_manager_for(names: list[str], include: list[Path]):
    """A TaskManager that knows `names`; lm-eval's ~15k built-in YAMLs are indexed only when
    a name is not among iftune's and the user's own tasks (indexing them takes seconds)."""
    for path in include:
        if not path.is_dir():
            raise UserError(f"--include-path: {path} is not a directory")
    paths = tuple(str(p.resolve()) for p in [TASKS_DIR, *include])
    manager = _manager(paths, False)
    if any(n not in manager.task_index for n in names):
        manager = _manager(paths, True)
    unknown = [n for n in names if n not in manager.task_index]
    if unknown:
        raise UserError(
            f"--tasks: unknown lm-eval task or group {', '.join(unknown)} (add its YAML folder with --include-path DIR)"
        )
    return manager


def task_specs(
    plan: dict[str, dict[str, Any]], leaves: dict[str, list[tuple[str, dict]]], manager, data_dir: str | None
) -> list:
    """What lm-eval runs: plain task names, or tasks/groups built from lm-eval's registered
    YAMLs with `num_fewshot` / `dataset_path` overridden (the YAMLs are not rewritten)."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"--data-dir: {data_dir} is not a directory")
    needed = data_mod.hub_datasets([leaf for group in leaves.values() for leaf in group])
    local = data_mod.resolve_local_data(needed, Path(data_dir) if data_dir else None)
    specs: list = []
    for name, overrides in plan.items():
        overrides = dict(overrides)
        paths = {cfg.get("dataset_path") for _, cfg in leaves[name]} & set(local)
        if len(paths) > 1:
            raise UserError(
                f"--data-dir: {name} mixes data sets {', '.join(sorted(paths))}; evaluate its tasks one by one"
            )
        if paths:
            overrides["dataset_path"] = local[paths.pop()]
        if not overrides:
            specs.append(name)
        else:
            built = build_with_overrides(manager, name, overrides)
            specs += built if isinstance(built, list) else [built]
    return specs


def build_with_overrides(manager, name: str, overrides: dict[str, Any]):
    """Task, Group or list of Tasks (a tag) for `name`, with `overrides` applied to every
    task under it, the way lm-eval applies a group file's settings to its members.

    lm-eval's public specs cannot do this for groups (an inline dict group leaks its own
    `task:` list into nested groups such as mmlu), so this uses the TaskManager's factory.
    """
    factory = getattr(manager, "_factory", None)
    if factory is None:
        raise UserError("--tasks leaderboard and --data-dir need lm-eval >= 0.4.13 (pip install -U 'lm-eval[hf]')")
    return factory.build(manager.task_index[name], overrides=overrides, registry=manager.task_index)


def tokenizer_source(model: str, adapter: str | None) -> str:
    """The adapter's own tokenizer when it ships one (it may carry the trained chat template)."""
    if adapter and (Path(adapter) / "tokenizer_config.json").is_file():
        return adapter
    return model


def check_chat_template(source: str) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(f"--model: cannot load the tokenizer of {source} ({str(err).splitlines()[0]})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"the tokenizer of {source} has no chat template; add one "
            f"(tokenizer.chat_template) or pass --no-chat-template"
        )


def evaluate(args: argparse.Namespace, specs: list, manager, tokenizer_src: str, chat: bool, tracker) -> dict[str, Any]:
    """Load the model (with its adapter) and run lm-eval; returns lm-eval's results dict."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    try:
        lm = HFLM(
            pretrained=args.model,
            peft=args.adapter,
            tokenizer=tokenizer_src,
            batch_size=batch,
            device=args.device or default_device(),
            dtype=args.dtype,
        )
    except OSError as err:
        raise UserError(
            f"--model/--adapter: cannot load {args.model}"
            f"{' + ' + args.adapter if args.adapter else ''} "
            f"({str(err).splitlines()[0]})"
        ) from None
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    results = lm_eval.simple_evaluate(
        model=lm,
        model_args={"pretrained": args.model, "peft": args.adapter},
        tasks=specs,
        task_manager=manager,
        limit=limit,
        num_fewshot=args.num_fewshot,
        log_samples=True,
        apply_chat_template=chat,
        fewshot_as_multiturn=chat,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
        evaluation_tracker=tracker,
    )
    return results


def default_device() -> str:
    """`cuda` when torch sees a GPU, else `cpu` (lm-eval's own default is `cuda`, which fails
    on a machine without one)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_tracker(out: Path):
    from lm_eval.loggers import EvaluationTracker

    # an output path ending in .json makes lm-eval write results_<date>.json and
    # samples_<task>_<date>.jsonl flat in `out`, not in a folder named after the model path
    return EvaluationTracker(output_path=str(out.resolve() / "results.json"))


def write_outputs(
    out: Path, results: dict[str, Any], tracker, tasks: list[str], model: str, adapter: str | None
) -> None:
    """lm-eval's results and samples files, summary.json and results.md in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", {})
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results.get("configs", {}):
        tracker.save_results_samples(task_name=task, samples=samples[task])
    summary = summarize(results, tasks, model, adapter)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown_table([summary])
    (out / "results.md").write_text(table)
    print(table, end="")
    print(f"iftune eval: results in {out}/ (summary.json, results.md, lm-eval results_*.json and samples_*.jsonl)")
