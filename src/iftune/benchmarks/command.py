"""`iftune bench`: the cost of an IFT training step against SFT, DPO and ORPO, side by side.

Every method runs through its real trainer (TRL's SFTTrainer, DPOTrainer and ORPOTrainer,
iftune's IFTTrainer) on one model with random weights and token sequences of fixed lengths;
`sft` (single-pass SFT on IFT's head path) and `naive_ift` (full float32 logits) isolate what
IFT itself costs, `ift_trl_head` is IFT with TRL's fused LM head. `--preset` takes a real
model's shape (its vocabulary, hidden size and heads; fewer layers where needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from typing import Any

from iftune.benchmarks import gpu_check as gpu
from iftune.benchmarks import matrix as mx
from iftune.benchmarks.run import run_bench
from iftune.benchmarks.setup import INT_SIZES, METHODS, PRECISIONS, PRESETS, QUICK, Options, Sizes, with_sizes
from iftune.console import silence_libraries
from iftune.errors import UserError

# At a preset: the methods whose ratios have targets (DPO, ORPO and TRL's head path do not fit
# ~15 minutes there on 2 CPU cores; `--methods` adds them).
PRESET_METHODS = ("trl_sft", "sft", "ift", "naive_ift")


def _cell(value: float, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def format_table(result: dict[str, Any]) -> str:
    """The methods, the ratios against their targets and the sweep, as text."""
    s = result["sizes"]
    lines = [
        f"iftune bench: {result['label']}, hidden {s['hidden']}, vocab {s['vocab']}, batch {s['batch']}, "
        f"{result['precision']}, {result['device']}, 1-minute load average {result['loadavg_1min']['start']}"
    ]
    if result["methods"]:
        lines += [
            f"{s['seq']} tokens (prompt {s['prompt']}), {result['timed_steps']} timed steps, interleaved",
            f"{'method':<12} {'s/step':>8} {'CPU s/step':>10} {'s/example':>10} {'tokens/s':>9} {'step peak MiB':>14} "
            f"{'later MiB':>10} {'activ. MiB':>10} {'process MiB':>12}",
        ]
    for m, row in result["methods"].items():
        lines.append(
            f"{m:<12} {row['step_s']:>8.3f} {row['step_cpu_s']:>10.3f} {row['example_s']:>10.4f} "
            f"{row['tokens_per_s']:>9.0f} "
            f"{row['step_peak_mb']:>14.0f} {_cell(row.get('later_step_peak_mb'), '.0f'):>10} "
            f"{_cell(row.get('activation_mb'), '.0f'):>10} {row['process_peak_mb']:>12.0f}"
        )
    if result["ratios"]:
        lines += ["", f"{'ratio':<32} {'value':>7}  target"]
    for key, value in result["ratios"].items():
        t = result["targets"].get(key)
        verdict = f"{t['bound']:<7} {'met' if t['met'] else 'NOT met'}" if t else ""
        lines.append(f"{key:<32} {value:>7.3f}  {verdict}".rstrip())
    if result["sweep"]:
        methods = [m for m in METHODS if f"{m}_step_s" in result["sweep"][0]]
        lines += ["", f"{'seq':>6} " + " ".join(f"{m + ' s/step':>17} {m + ' MiB':>13}" for m in methods)]
        for p in result["sweep"]:
            cells = [
                f"{_cell(p[f'{m}_step_s'], '.3f'):>17} {_cell(p[f'{m}_step_peak_mb'], '.0f'):>13}" for m in methods
            ]
            lines.append(f"{p['seq']:>6} " + " ".join(cells))
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    """The `iftune bench` flags."""
    d = Sizes()
    p = argparse.ArgumentParser(prog="iftune bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="a real model's shape (sizes flags override it)")
    for name in INT_SIZES:
        p.add_argument(
            f"--{name}",
            type=int,
            default=None,
            help=f"default {getattr(d, name)} ({getattr(QUICK, name)} with --quick)",
        )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=None,
        help=f"default all; at a preset {' '.join(PRESET_METHODS)}",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="bf16: mixed precision (autocast); bf16-weights: bf16 weights too (default fp32; --matrix: fp32 and bf16)",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per method first (default 2; 1 quick or preset)"
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per method (default 4; 2 quick or preset)")
    p.add_argument(
        "--sweep",
        type=int,
        nargs="*",
        default=None,
        metavar="LEN",
        help="sequence lengths of the sweep (default 256 512 1024 2048; 24 48 quick)",
    )
    p.add_argument("--no-sweep", action="store_true", help="skip the sequence-length sweep")
    p.add_argument("--sweep-only", action="store_true", help="only the sweep (and --profile): no main table")
    p.add_argument(
        "--max-logits-gib",
        type=float,
        default=6.0,
        help="sweep: skip a full-logits method where 3 float32 (B, T, V) tensors exceed this (default 6)",
    )
    p.add_argument(
        "--sweep-steps",
        type=int,
        default=None,
        help="timed steps per sweep point, after one warm-up (default 2; 1 quick)",
    )
    p.add_argument(
        "--memory-steps",
        type=int,
        default=None,
        help="steps run by each memory process (default 2)",
    )
    p.add_argument("--parallel", type=int, default=None, help="memory processes at once (default 2; 1 at a preset)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="activation checkpointing in every trainer (default: off in all)",
    )
    p.add_argument("--profile", action="store_true", help="also time each phase of an IFT and an SFT step")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (seconds)")
    p.add_argument(
        "--matrix",
        action="store_true",
        help="the docs' main table: qwen2.5-0.5b and llama-3.2-1b at batch 1 and 4 in fp32 and bf16 (IFT, same-path "
        "SFT, full-logits IFT at qwen), then DPO and ORPO at qwen; --preset, --batch, --precision narrow it; "
        f"--steps (default {mx.STEPS}), --warmup ({mx.WARMUP}); JSON: --json or DIR/bench-matrix.json",
    )
    p.add_argument(
        "--gpu-check",
        action="store_true",
        help="on one CUDA device, in minutes: the qwen2.5-0.5b and llama-3.2-1b shapes at full depth, bf16, "
        "IFT against same-path SFT, TRL's SFTTrainer and TRL's LM head (JSON: --json, default gpu-check.json); "
        f"--batch (default {gpu.BATCH}), --warmup ({gpu.WARMUP}), --steps ({gpu.STEPS}) apply",
    )
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    p.add_argument("--plot", metavar="FILE", help="draw the sweep (time and memory against length) to FILE (PNG)")
    p.add_argument(
        "--output-dir",
        "--output_dir",
        dest="output_dir",
        metavar="DIR",
        help="write the results as JSON to DIR/bench[-PRESET][-PRECISION].json",
    )
    return p


def settings(ns: argparse.Namespace) -> tuple[Sizes, dict[str, Any]]:
    """The checked sizes and the `run_bench` keywords of parsed flags (a bad one: `UserError`)."""
    base = PRESETS[ns.preset] if ns.preset else QUICK if ns.quick else Sizes()
    sizes = with_sizes(base, **{k: getattr(ns, k) for k in INT_SIZES})
    # Defaults: full, --quick, or at a preset (where a step takes ~a minute on 2 CPU cores).
    pick = lambda v, full, quick, preset=None: (  # noqa: E731
        v if v is not None else quick if ns.quick else preset if ns.preset and preset is not None else full
    )
    lengths = [] if ns.no_sweep else pick(ns.sweep, [256, 512, 1024, 2048], [24, 48], [])
    methods = tuple(ns.methods or (PRESET_METHODS if ns.preset else METHODS))
    opts = dict(
        warmup=pick(ns.warmup, 2, 1, 1),
        steps=pick(ns.steps, 4, 2, 2),
        lengths=lengths,
        sweep_steps=pick(ns.sweep_steps, 2, 1),
        memory_steps=pick(ns.memory_steps, 2, 2),
        parallel=ns.parallel if ns.parallel is not None else (1 if ns.preset else 2),
        profile=ns.profile,
        methods=methods,
        max_logits_gib=ns.max_logits_gib,
        main_table=not ns.sweep_only,
        preset=ns.preset,
    )
    for key in ("steps", "sweep_steps", "memory_steps", "parallel"):
        if opts[key] < 1:
            raise UserError(f"--{key.replace('_', '-')}={opts[key]} is not valid; expected an integer >= 1")
    if opts["warmup"] < 0:
        raise UserError(f"--warmup={opts['warmup']} is not valid; expected an integer >= 0")
    bad = [n for n in lengths if n < 8]
    if bad:
        raise UserError(f"--sweep {bad[0]} is not valid; expected sequence lengths >= 8")
    if ns.sweep_only and not lengths:
        raise UserError("--sweep-only needs sequence lengths: --sweep LEN [LEN ...]")
    if ns.profile and not {"ift", "sft"} <= set(methods):
        raise UserError("--profile needs the methods ift and sft")
    return sizes, opts


def _outputs(ns: argparse.Namespace) -> list[str]:
    """The JSON files to write, their folders checked first (nothing is run for a bad path)."""
    files = [ns.json] if ns.json else []
    if ns.output_dir:
        if os.path.exists(ns.output_dir) and not os.path.isdir(ns.output_dir):
            raise UserError(f"--output-dir: '{ns.output_dir}' exists and is not a directory")
        os.makedirs(ns.output_dir, exist_ok=True)
        suffix = "".join(f"-{v}" for v in (ns.preset, ns.precision if ns.precision != "fp32" else None) if v)
        files.append(os.path.join(ns.output_dir, f"bench{suffix}.json"))
    for flag, path in [("--json", f) for f in files] + ([("--plot", ns.plot)] if ns.plot else []):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise UserError(f"{flag}: no such directory '{parent}'")
    if ns.plot and ns.no_sweep:
        raise UserError("--plot draws the sweep: it cannot go with --no-sweep")
    return files


def gpu_check(ns: argparse.Namespace) -> int:
    """`--gpu-check`: one line without a CUDA device; else the check's table, 1 if a group failed."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("--gpu-check: no CUDA device is available (it measures on one GPU)")
    for name, least in (("warmup", 0), ("steps", 1), ("batch", 1)):
        if getattr(ns, name) is not None and getattr(ns, name) < least:
            raise UserError(f"--{name}={getattr(ns, name)} is not valid; expected an integer >= {least}")
    path = ns.json or os.path.join(ns.output_dir or ".", "gpu-check.json")
    if ns.output_dir:
        os.makedirs(ns.output_dir, exist_ok=True)
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserError(f"--json: no such directory '{os.path.dirname(os.path.abspath(path))}'")
    with warnings.catch_warnings():
        silence_libraries()
        given = {k: getattr(ns, k) for k in ("warmup", "steps", "batch") if getattr(ns, k) is not None}
        result = gpu.run_gpu_check(torch.cuda, path, **given)
    print(gpu.format_gpu_check(result))
    print(f"gpu-check: written to {path}")
    return 1 if any("error" in g for g in result["groups"]) else 0


def matrix(ns: argparse.Namespace) -> int:
    """`--matrix`: every row in one command; the Markdown table; 1 if a row failed."""
    for name in ("steps", "batch"):
        if getattr(ns, name) is not None and getattr(ns, name) < 1:
            raise UserError(f"--{name}={getattr(ns, name)} is not valid; expected an integer >= 1")
    if ns.warmup is not None and ns.warmup < 0:
        raise UserError(f"--warmup={ns.warmup} is not valid; expected an integer >= 0")
    presets = (ns.preset,) if ns.preset else ("qwen2.5-0.5b", "llama-3.2-1b")
    batches = (ns.batch,) if ns.batch else mx.BATCHES
    precisions = (ns.precision,) if ns.precision else mx.PRECISIONS
    path = ns.json or (os.path.join(ns.output_dir, "bench-matrix.json") if ns.output_dir else None)
    if ns.output_dir:
        os.makedirs(ns.output_dir, exist_ok=True)
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserError(f"--json: no such directory '{os.path.dirname(os.path.abspath(path))}'")
    with warnings.catch_warnings():
        silence_libraries()
        result = mx.run_matrix(
            mx.plan(presets, batches, precisions),
            path,
            warmup=mx.WARMUP if ns.warmup is None else ns.warmup,
            steps=ns.steps or mx.STEPS,
            seed=ns.seed,
        )
    print(mx.format_matrix(result))
    return 1 if any("error" in r for r in result["rows"]) else 0


def main(argv: list[str]) -> int:
    """Run `iftune bench` with `argv`; print the tables; returns the exit status."""
    ns = make_parser().parse_args(argv)
    if ns.gpu_check or ns.matrix:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if ns.threads is not None:
            import torch

            torch.set_num_threads(max(1, ns.threads))
        return gpu_check(ns) if ns.gpu_check else matrix(ns)
    ns.precision = ns.precision or "fp32"
    sizes, opts = settings(ns)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if ns.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    cuda = ns.device == "cuda" or (ns.device == "auto" and torch.cuda.is_available())
    if ns.threads is not None:
        if ns.threads < 1:
            raise UserError(f"--threads={ns.threads} is not valid; expected an integer >= 1")
        torch.set_num_threads(ns.threads)
    files = _outputs(ns)
    with warnings.catch_warnings():
        silence_libraries()
        result = run_bench(sizes, Options(ns.seed, cuda, ns.gradient_checkpointing, ns.precision), **opts)
    print(format_table(result))
    if result["profile"]:
        from iftune.benchmarks.profile import format_profile

        print()
        print(format_profile(result["profile"]))
    if ns.plot:
        from iftune.benchmarks.plot import plot_sweep

        plot_sweep(result, ns.plot)
    for path in files:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


__all__ = ["PRESET_METHODS", "format_table", "gpu_check", "main", "make_parser", "matrix", "settings"]
