"""`iftune bench --gpu-check`: what matters on one CUDA device, in minutes, as one JSON and a table.

The Qwen2.5-0.5B and Llama-3.2-1B shapes at their full depth (random weights built from their
numbers: nothing is downloaded), bf16 mixed precision, batch 4 x 1,024 tokens (prompt 256),
transformers' sdpa attention; flash-attention's padding-free path too where `flash_attn` is
installed. Per shape two groups, each timed interleaved in one process on shared weights:

- `methods`: TRL's stock SFTTrainer, the same-path SFT and IFT (IFT's overhead and its cost
  against what a user runs today);
- `heads`: IFT on iftune's chunked LM head, on TRL's fused one (`--lm_head trl`) and on full
  float32 logits (naive IFT, the reference code's way), beside TRL's SFTTrainer: IFT on TRL's
  head against TRL's own SFT is the cost of IFT on the fastest path.

5 warm-up and 20 timed steps by default: at batch 4 a step of these shapes is ~0.1 s, where
fewer steps left medians that moved by up to 25% between groups on an H200.

Per method: median step seconds (CUDA events), tokens per second, the peak allocation of a
step, and its activation memory (that peak above what the step began with, less its
gradients). The device and the library versions come first. Each group is written to the JSON
as soon as it ends; one that fails is recorded with its error and the others still run; no
group starts once the time budget is spent.
"""

from __future__ import annotations

import gc
import importlib.metadata
import json
import math
import statistics
import tempfile
import time
import traceback
from dataclasses import replace
from typing import Any

from iftune.benchmarks.measure import Clock, time_interleaved
from iftune.benchmarks.setup import PRESETS, Options, shared_trainers, tokens_per_step

SHAPES = ("qwen2.5-0.5b", "llama-3.2-1b")
GROUPS = {"methods": ("trl_sft", "sft", "ift"), "heads": ("ift", "ift_trl_head", "trl_sft", "naive_ift")}
WARMUP, STEPS, BATCH = 5, 20, 4
# Each ratio of a group: (numerator method, denominator method, measurement).
GROUP_RATIOS = {
    "ift_over_sft_time": ("ift", "sft", "step_s"),
    "ift_over_sft_memory": ("ift", "sft", "step_peak_mb"),
    "ift_over_trl_sft_time": ("ift", "trl_sft", "step_s"),
    "ift_over_trl_sft_memory": ("ift", "trl_sft", "step_peak_mb"),
    "trl_head_over_iftune_head_time": ("ift_trl_head", "ift", "step_s"),
    "trl_head_over_iftune_head_memory": ("ift_trl_head", "ift", "step_peak_mb"),
    "ift_trl_head_over_trl_sft_time": ("ift_trl_head", "trl_sft", "step_s"),
    "ift_trl_head_over_trl_sft_memory": ("ift_trl_head", "trl_sft", "step_peak_mb"),
    "naive_over_ift_time": ("naive_ift", "ift", "step_s"),
    "naive_over_ift_activation_memory": ("naive_ift", "ift", "activation_mb"),
    "naive_over_ift_trl_head_time": ("naive_ift", "ift_trl_head", "step_s"),
}
LIBRARIES = ("torch", "transformers", "trl", "accelerate", "peft", "flash-attn", "liger-kernel", "triton")


def versions() -> dict[str, str | None]:
    """Installed version of each of `LIBRARIES` (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(cuda: Any) -> dict[str, Any]:
    """The device (name, capability, memory) and the library versions; `cuda` is `torch.cuda`."""
    import torch

    props = cuda.get_device_properties(0)
    return {
        "device": cuda.get_device_name(0),
        "capability": ".".join(map(str, cuda.get_device_capability(0))),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "device_count": cuda.device_count(),
        "cuda": torch.version.cuda,
        "versions": versions(),
    }


def plan(shapes: tuple[str, ...] = SHAPES, flash: bool = False) -> list[dict[str, Any]]:
    """The groups to run, in order: every shape's two groups with sdpa, then (with `flash`)
    every shape's `methods` group on flash-attention's padding-free path."""
    rows = [
        {"shape": s, "group": g, "attention": "sdpa", "padding_free": False, "methods": list(GROUPS[g])}
        for s in shapes
        for g in GROUPS
    ]
    if flash:
        rows += [
            {
                "shape": s,
                "group": "methods",
                "attention": "flash_attention_2",
                "padding_free": True,
                "methods": list(GROUPS["methods"]),
            }
            for s in shapes
        ]
    return rows


def run_group(
    row: dict[str, Any], cuda: Any, warmup: int, steps: int, batch: int, on_cuda: bool = True
) -> dict[str, Any]:
    """One group: its methods timed interleaved on shared weights; per method and its ratios.
    `on_cuda` False trains on the CPU (the tests', with a stand-in `cuda`)."""
    preset = PRESETS[row["shape"]]
    sizes = replace(preset, layers=preset.full_layers or preset.layers, batch=batch)
    opt = Options(seed=0, cuda=on_cuda, precision="bf16", attn=row["attention"], padding_free=row["padding_free"])
    methods = row["methods"]
    cpu: dict[str, list[float]] = {}
    memory: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as out:
        trainers = shared_trainers(methods, sizes, warmup + steps, opt, out)
        tokens = {m: tokens_per_step(t) for m, t in trainers.items()}
        try:
            times = time_interleaved(trainers, warmup, Clock(cuda), cpu, memory)
        finally:
            del trainers
            gc.collect()
            cuda.empty_cache()
    per: dict[str, dict[str, Any]] = {}
    for m in methods:
        step = statistics.median(times[m]) if times[m] else math.nan
        peaks = memory.get(m, [])
        per[m] = {
            "step_s": step,
            "step_times_s": [round(t, 5) for t in times[m]],
            "tokens_per_step": tokens[m],
            "tokens_per_s": tokens[m] / step if step > 0 else math.nan,
            "step_peak_mb": max((p["process_peak_mb"] for p in peaks), default=math.nan),
            "activation_mb": max((p["activation_mb"] for p in peaks), default=math.nan),
            "grad_mb": max((p["grad_mb"] for p in peaks), default=math.nan),
        }
    ratios = {k: per[a][f] / per[b][f] for k, (a, b, f) in GROUP_RATIOS.items() if a in per and b in per and per[b][f]}
    return {"label": sizes.label(), "batch": sizes.batch, "seq": sizes.seq, "per_method": per, "ratios": ratios}


def run_gpu_check(
    cuda: Any,
    path: str,
    *,
    shapes: tuple[str, ...] = SHAPES,
    flash: bool | None = None,
    warmup: int = WARMUP,
    steps: int = STEPS,
    batch: int = BATCH,
    budget_s: float = 420.0,
    on_cuda: bool = True,
    log=print,
) -> dict[str, Any]:
    """Run `plan(shapes, flash)` on the device `cuda` (`torch.cuda` or a stand-in), writing the
    result to `path` after each group; a group that fails is recorded and the rest run; no
    group starts after `budget_s` seconds. `flash` None: where `flash_attn` is installed.
    `on_cuda` False: the trainers run on the CPU, timed by `cuda` (the tests' stand-in)."""
    env = environment(cuda)
    log(
        f"gpu-check: {env['device']} (compute {env['capability']}, {env['memory_gib']} GiB, "
        f"{env['device_count']} device(s)), CUDA {env['cuda']}"
    )
    log("gpu-check: " + ", ".join(f"{k} {v or '-'}" for k, v in env["versions"].items()))
    if flash is None:
        flash = env["versions"]["flash-attn"] is not None
    result: dict[str, Any] = {
        "environment": env,
        "precision": "bf16",
        "warmup_steps": warmup,
        "timed_steps": steps,
        "groups": [],
    }
    start = time.perf_counter()
    for row in plan(shapes, flash):
        name = f"{row['shape']} {row['group']} ({row['attention']}{', padding-free' if row['padding_free'] else ''})"
        if time.perf_counter() - start > budget_s:
            result["groups"].append({**row, "skipped": f"time budget of {budget_s:.0f} s spent"})
            log(f"gpu-check: {name}: skipped, the time budget is spent")
            continue
        log(f"gpu-check: {name}: {', '.join(row['methods'])}")
        began = time.perf_counter()
        try:
            got = {**row, **run_group(row, cuda, warmup, steps, batch, on_cuda)}
        except Exception as err:  # recorded; the other groups still run
            got = {**row, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
            log(f"gpu-check: {name}: FAILED: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        got["wall_s"] = round(time.perf_counter() - began, 1)
        result["groups"].append(got)
        result["wall_s"] = round(time.perf_counter() - start, 1)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


def format_gpu_check(result: dict[str, Any]) -> str:
    """The groups as one table (a failed or skipped group as one line), then the ratios."""
    lines = [
        f"{'shape':<14} {'attention':<24} {'method':<13} {'s/step':>8} {'tokens/s':>9} {'peak MiB':>9} "
        f"{'activ. MiB':>10}"
    ]
    for g in result["groups"]:
        attention = g["attention"] + (" padding-free" if g["padding_free"] else "")
        if "per_method" not in g:
            lines.append(f"{g['shape']:<14} {attention:<24} {g['group']}: {g.get('error') or g.get('skipped')}")
            continue
        for m, r in g["per_method"].items():
            lines.append(
                f"{g['shape']:<14} {attention:<24} {m:<13} {r['step_s']:>8.4f} {r['tokens_per_s']:>9.0f} "
                f"{r['step_peak_mb']:>9.0f} {r['activation_mb']:>10.0f}"
            )
    lines.append("")
    for g in result["groups"]:
        attention = g["attention"] + (" padding-free" if g["padding_free"] else "")
        for k, v in g.get("ratios", {}).items():
            lines.append(f"{g['shape']:<14} {attention:<24} {k:<34} {v:>7.3f}")
    return "\n".join(lines)


__all__ = [
    "BATCH",
    "GROUPS",
    "SHAPES",
    "STEPS",
    "WARMUP",
    "environment",
    "format_gpu_check",
    "plan",
    "run_gpu_check",
    "run_group",
    "versions",
]
