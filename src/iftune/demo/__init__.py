"""`iftune demo`: an offline study of IFT against SFT on a task where an early error propagates.

It builds (once, then caches) a tiny pre-trained base model, writes the chained-arithmetic data
set, fine-tunes the base with `iftune sft`, `iftune ift` and `iftune ift --gamma 0` (the very
commands a user runs) for the same steps, learning rate and seeds, scores every fine-tuned model
by greedy generation on the held-out split, and reports mean, std and the paired difference
over seeds as a table, `demo.json` and `demo.png`. docs/demo.md explains the choices.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from iftune.console import quiet
from iftune.demo.base import SHIPPED_BASE, BaseSpec, base_dir, base_model, single_thread
from iftune.demo.data import (
    DATA_SEED,
    TASK_MAX_STEPS,
    TASK_MIN_STEPS,
    make_splits,
    write_jsonl,
)
from iftune.demo.evaluate import evaluate
from iftune.errors import UserError
from iftune.stats import mean_std

# Fixed before any IFT/SFT comparison was run; docs/demo.md says why.
DEFAULT_STEPS = 150
DEFAULT_SEEDS = 3
LEARNING_RATE = 3e-3
BATCH_SIZE = 16
N_TRAIN, N_HELDOUT = 2000, 200
BASE_SPEC = BaseSpec()

# label -> (iftune command, extra flags); SFT first: the paired differences are against it.
METHODS: dict[str, tuple[str, list[str]]] = {
    "sft": ("sft", []),
    "ift": ("ift", []),
    "ift_gamma0": ("ift", ["--gamma", "0"]),
}


@dataclass
class RunResult:
    method: str
    seed: int
    exact_match: float
    step_accuracy: float
    train_seconds: float
    loss: list[list[float]] = field(default_factory=list)  # [step, logged training loss]
    teacher_forced_nll: list[list[float]] = field(default_factory=list)  # comparable across methods
    samples: list[dict] = field(default_factory=list)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="iftune demo", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="fine-tuning seeds per method")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps per fine-tuning run")
    parser.add_argument(
        "--output-dir",
        "--output_dir",
        dest="output_dir",
        default="outputs/demo",
        help="where demo.json, demo.png and the runs go (runs/ is rewritten)",
    )
    parser.add_argument(
        "--build-base",
        action="store_true",
        help="pre-train the base model with the builder (cached) instead of using the copy "
        "shipped with iftune; its weights, and so the results, depend on the machine",
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise UserError(f"--seeds={args.seeds}: expected an integer >= 1")
    if args.steps < 1:
        raise UserError(f"--steps={args.steps}: expected an integer >= 1")
    return args


def fine_tune(
    command: str,
    base: Path,
    train_file: Path,
    out: Path,
    steps: int,
    seed: int,
    extra: list[str] | tuple[str, ...] = (),
    *,
    learning_rate: float = LEARNING_RATE,
    batch_size: int = BATCH_SIZE,
    logging_steps: int = 1,
) -> list[dict]:
    """Fine-tune `base` through `iftune.train` with the arguments a user would give `iftune <command>`,
    quietly; returns its log history (a `UserError` reaches the caller as it is)."""
    from iftune.train import parse, train

    flags = {
        "model_name_or_path": base, "dataset_name": train_file, "output_dir": out, "max_steps": steps,
        "learning_rate": learning_rate, "per_device_train_batch_size": batch_size, "seed": seed,
        "report_to": "none", "logging_steps": logging_steps, "use_cpu": "true", "disable_tqdm": "true",
        "save_strategy": "no",
    }  # fmt: skip
    argv = [item for key, value in flags.items() for item in (f"--{key}", str(value))]
    with quiet():
        trainer = train(command, *parse(command, [*argv, *extra]))
    return trainer.state.log_history


def curves(history: list[dict]) -> tuple[list[list[float]], list[list[float]]]:
    """(logged loss, teacher-forced NLL) per step. SFT's loss is the teacher-forced NLL; IFT
    logs its objective as `loss` and the NLL of its intuition pass as `sft_loss`."""
    rows = [h for h in history if "loss" in h and "step" in h]
    loss = [[h["step"], h["loss"]] for h in rows]
    nll = [[h["step"], h.get("sft_loss", h["loss"])] for h in rows]
    return loss, nll


def summarize(runs: list[RunResult]) -> dict:
    """Per method mean/std over seeds, and per-seed paired differences against SFT."""
    summary: dict = {}
    for method in METHODS:
        mine = sorted((r for r in runs if r.method == method), key=lambda r: r.seed)
        if not mine:
            continue
        row = {"n_seeds": len(mine)}
        for metric in ("exact_match", "step_accuracy"):
            row[metric] = dict(zip(("mean", "std"), mean_std([getattr(r, metric) for r in mine])))
        if method != "sft":
            sft = {r.seed: r for r in runs if r.method == "sft"}
            for metric in ("exact_match", "step_accuracy"):
                diffs = [getattr(r, metric) - getattr(sft[r.seed], metric) for r in mine if r.seed in sft]
                row[f"{metric}_minus_sft"] = dict(zip(("mean", "std"), mean_std(diffs)), per_seed=diffs)
        summary[method] = row
    return summary


def format_table(summary: dict, base_score=None) -> str:
    def cell(stat: dict) -> str:
        return f"{100 * stat['mean']:6.1f} ± {100 * stat['std']:4.1f}"

    lines = [f"{'method':<12} {'exact match %':>15} {'step accuracy %':>16} {'EM - SFT':>14} {'step - SFT':>14}"]
    if base_score is not None:
        lines.append(
            f"{'base':<12} {100 * base_score['exact_match']:>15.1f} {100 * base_score['step_accuracy']:>16.1f}"
        )
    for method, row in summary.items():
        diff = [cell(row[k]) if k in row else "" for k in ("exact_match_minus_sft", "step_accuracy_minus_sft")]
        lines.append(
            f"{method:<12} {cell(row['exact_match']):>15} {cell(row['step_accuracy']):>16} {diff[0]:>14} {diff[1]:>14}"
        )
    return "\n".join(lines)


def plot(runs: list[RunResult], summary: dict, path: Path) -> Path:
    """Left: teacher-forced training NLL per method (mean over seeds); right: held-out scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"sft": "tab:blue", "ift": "tab:red", "ift_gamma0": "tab:orange"}
    for method in summary:
        mine = [r for r in runs if r.method == method]
        steps = [s for s, _ in mine[0].teacher_forced_nll]
        mean = [sum(r.teacher_forced_nll[i][1] for r in mine) / len(mine) for i in range(len(steps))]
        ax_loss.plot(steps, mean, label=method, color=colors.get(method))
    ax_loss.set(
        xlabel="optimizer step", ylabel="teacher-forced NLL (train batch)", title="training loss (mean over seeds)"
    )
    ax_loss.legend()
    width = 0.38
    for j, metric in enumerate(("exact_match", "step_accuracy")):
        xs = [i + (j - 0.5) * width for i in range(len(summary))]
        ax_score.bar(
            xs,
            [100 * summary[m][metric]["mean"] for m in summary],
            width,
            yerr=[100 * summary[m][metric]["std"] for m in summary],
            capsize=3,
            label=metric.replace("_", " "),
            alpha=0.8,
        )
        for x, m in zip(xs, summary):  # individual seeds
            ys = [100 * getattr(r, metric) for r in runs if r.method == m]
            ax_score.scatter([x] * len(ys), ys, color="black", s=8, zorder=3)
    ax_score.set_xticks(range(len(summary)), list(summary))
    ax_score.set(ylabel="% on held-out split (greedy)", title="held-out score per method")
    ax_score.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def prepare_data(out_dir: Path) -> tuple[Path, list[dict]]:
    train, heldout = make_splits(N_TRAIN, N_HELDOUT)
    train_file = write_jsonl(train, out_dir / "data" / "train.jsonl")
    write_jsonl(heldout, out_dir / "data" / "heldout.jsonl")
    return train_file, heldout


def get_base(tqdm, build: bool) -> Path:
    """The base model: the copy shipped with iftune, or (`build`) the cached build, pre-trained
    first (with a progress bar) when it is missing."""
    spec = BASE_SPEC
    if not build or (base_dir(spec) / "config.json").exists():
        return base_model(spec, build=build)
    with tqdm(
        total=spec.pretrain_steps, desc="pre-training the base model (first run only)", unit="step", mininterval=0.5
    ) as bar:

        def progress(loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update()

        with quiet():
            return base_model(spec, build=True, progress=progress)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with single_thread():
        return run_demo(args)


def run_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = get_base(tqdm, args.build_base)
    train_file, heldout = prepare_data(out_dir)
    base_score = evaluate(base, heldout)
    runs: list[RunResult] = []
    jobs = [(seed, method) for seed in range(args.seeds) for method in METHODS]
    with tqdm(jobs, desc="fine-tuning and evaluating", unit="run") as bar:
        for seed, method in bar:
            bar.set_postfix_str(f"{method} seed {seed}")
            runs.append(run_one(method, seed, args.steps, base, train_file, heldout, out_dir))
    summary = summarize(runs)
    seconds = time.perf_counter() - start
    table = format_table(summary, base_score)
    write_report(out_dir, args, base, base_score, runs, summary, seconds)
    print(
        f"\nheld-out split: {len(heldout)} chained mod-10 problems of {TASK_MIN_STEPS}-{TASK_MAX_STEPS} "
        f"steps, greedy decoding; "
        f"{args.steps} steps, lr {LEARNING_RATE}, batch {BATCH_SIZE}, {args.seeds} seed(s)"
    )
    print(table)
    print(f"\nmean ± std over seeds; '- SFT' columns are paired by seed. {seconds:.0f} s in all.")
    print(f"wrote {out_dir / 'demo.json'} and {out_dir / 'demo.png'}")
    return 0


def run_one(
    method: str, seed: int, steps: int, base: Path, train_file: Path, heldout: list[dict], out_dir: Path
) -> RunResult:
    command, extra = METHODS[method]
    run_dir = out_dir / "runs" / f"{method}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own model from an earlier run: rebuilt
    t0 = time.perf_counter()
    history = fine_tune(command, base, train_file, run_dir, steps, seed, extra)
    train_seconds = time.perf_counter() - t0
    result = evaluate(run_dir, heldout)
    loss, nll = curves(history)
    return RunResult(
        method, seed, result["exact_match"], result["step_accuracy"], train_seconds, loss, nll, result["samples"]
    )


def write_report(
    out_dir: Path, args, base: Path, base_score, runs: list[RunResult], summary: dict, seconds: float
) -> None:
    report = {
        "settings": {
            "steps": args.steps,
            "seeds": args.seeds,
            "learning_rate": LEARNING_RATE,
            "per_device_train_batch_size": BATCH_SIZE,
            "n_train": N_TRAIN,
            "n_heldout": N_HELDOUT,
            "task_steps": [TASK_MIN_STEPS, TASK_MAX_STEPS],
            "data_seed": DATA_SEED,
            "methods": {m: ["iftune", c, *e] for m, (c, e) in METHODS.items()},
            "base_model": "shipped" if base == SHIPPED_BASE else str(base),
        },
        "base": {k: base_score[k] for k in ("exact_match", "step_accuracy", "heldout_nll")},
        "summary": summary,
        "runs": [asdict(r) for r in runs],
        "seconds": round(seconds, 1),
    }
    (out_dir / "demo.json").write_text(json.dumps(report, indent=2))
    plot(runs, summary, out_dir / "demo.png")
