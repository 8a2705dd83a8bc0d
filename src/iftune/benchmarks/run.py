"""The whole benchmark: memory (one process per method), interleaved timing, the sequence-length
sweep and the profile, and the ratios against their targets."""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from typing import Any

from iftune.benchmarks.measure import Clock, memory_per_process, time_interleaved
from iftune.benchmarks.setup import METHODS, Options, Sizes, shared_trainers, tokens_per_step

SWEEP_METHODS = ("sft", "ift", "naive_ift")
# Methods that build the (B, T, V) logits of every position on a CPU (TRL's head without Triton).
FULL_LOGITS = ("trl_sft", "ift_trl_head", "naive_ift")
# IFT's LM-head paths, compared to pick the faster one on the device.
HEAD_PATHS = {"chunked": "ift", "trl_fused": "ift_trl_head", "full_logits": "naive_ift"}
# Each ratio: (numerator method, denominator method, measurement).
RATIOS = {
    "ift_over_sft_time": ("ift", "sft", "step_s"),
    "ift_over_sft_cpu_time": ("ift", "sft", "step_cpu_s"),
    "ift_over_sft_memory": ("ift", "sft", "step_peak_mb"),
    "ift_over_trl_sft_time": ("ift", "trl_sft", "step_s"),
    "ift_over_trl_sft_cpu_time": ("ift", "trl_sft", "step_cpu_s"),
    "ift_over_dpo_time_per_example": ("ift", "dpo", "example_s"),
    "ift_over_orpo_time_per_example": ("ift", "orpo", "example_s"),
    "naive_over_ift_memory": ("naive_ift", "ift", "step_peak_mb"),
    "naive_over_ift_time": ("naive_ift", "ift", "step_s"),
    # The same peaks once the optimizer state exists (steps after the first): no target.
    "ift_over_sft_later_memory": ("ift", "sft", "later_step_peak_mb"),
    "naive_over_ift_later_memory": ("naive_ift", "ift", "later_step_peak_mb"),
    # Activations and logits only (the later steps' peak minus weights, gradients, optimizer state).
    "ift_over_sft_activation_memory": ("ift", "sft", "activation_mb"),
    "naive_over_ift_activation_memory": ("naive_ift", "ift", "activation_mb"),
}
# What each ratio should be for IFT to be worth its cost, as (comparison, bound): the extra no-grad
# forward may cost at most 40% over SFT on the same head path (30% at real shapes), no extra memory,
# less per example than the preference methods, and full-logits IFT must need clearly more memory.
TARGETS = {
    "ift_over_sft_time": ("<=", 1.40),
    "ift_over_sft_memory": ("<=", 1.10),
    "ift_over_trl_sft_time": ("<=", 1.40),
    "ift_over_dpo_time_per_example": ("<=", 0.55),
    "ift_over_orpo_time_per_example": ("<=", 0.75),
    "naive_over_ift_memory": (">=", 1.5),
    "naive_over_ift_time": (">", 0.0),
}
# At a preset: IFT at most 1.25x the same-path SFT's time and 1.05x its memory, never slower
# than full-logits IFT, and (from batch 4 on, where logits rather than the optimizer state
# dominate) a third of its activation memory or less.
PRESET_TARGETS = {
    "ift_over_sft_time": ("<=", 1.25),
    "ift_over_sft_memory": ("<=", 1.05),
    "naive_over_ift_time": (">=", 0.95),
    "ift_over_trl_sft_time": ("<=", 1.0),
}
PRESET_BATCH_TARGETS = {"naive_over_ift_activation_memory": (4, ">=", 3.0)}


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def time_methods(
    methods: list[str], sizes: Sizes, warmup: int, steps: int, opt: Options, clock: Clock | None = None
) -> dict[str, dict[str, Any]]:
    """Per method: its timed steps, median seconds per step and per example, tokens per second."""
    with tempfile.TemporaryDirectory() as out:
        trainers = shared_trainers(methods, sizes, warmup + steps, opt, out)
        tokens = {m: tokens_per_step(t) for m, t in trainers.items()}
        cpu: dict[str, list[float]] = {}
        times = time_interleaved(trainers, warmup, clock, cpu)
    rows = {}
    for m in methods:
        step = _median(times[m])
        rows[m] = {
            "step_times_s": [round(t, 5) for t in times[m]],
            "step_s": step,
            "step_cpu_times_s": [round(t, 5) for t in cpu[m]],
            "step_cpu_s": _median(cpu[m]),
            "example_s": step / sizes.batch,
            "tokens_per_step": tokens[m],
            "tokens_per_s": tokens[m] / step if step > 0 else math.nan,
        }
    return rows


def full_logits_gib(sizes: Sizes) -> float:
    """GiB of three float32 (B, T, V) tensors: about what a full-logits step holds at its peak."""
    return 3 * sizes.batch * sizes.seq * sizes.vocab * 4 / 2**30


def sweep(
    lengths: list[int], methods: list[str], sizes: Sizes, steps: int, opt: Options, max_logits_gib: float = 6.0
) -> list[dict]:
    """`methods` at several sequence lengths (prompt a quarter of each), each in its own process
    (`measure_memory`): 1 warm-up and `steps` timed steps (median seconds; not interleaved) and
    the step peak memory. A method that builds full logits is not run (None) where
    `full_logits_gib` exceeds `max_logits_gib`."""
    points = []
    for length in lengths:
        at = replace(sizes, seq=length, prompt=max(1, length // 4))
        skip = {m for m in methods if m in FULL_LOGITS and full_logits_gib(at) > max_logits_gib}
        measured = memory_per_process([m for m in methods if m not in skip], at, 1 + steps, opt, 1)
        point: dict[str, Any] = {"seq": length, "prompt": at.prompt}
        for m in methods:
            row = measured.get(m, {})
            times = row.get("step_times_s", [])[1:]
            point.update(
                {
                    f"{m}_step_s": _median(times) if times else None,
                    f"{m}_step_times_s": times,
                    f"{m}_step_peak_mb": row.get("step_peak_mb"),
                    f"{m}_later_step_peak_mb": row.get("later_step_peak_mb"),
                }
            )
        if point.get("ift_step_s") and point.get("sft_step_s"):
            point["ift_over_sft_time"] = point["ift_step_s"] / point["sft_step_s"]
        points.append(point)
    return points


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Every ratio of `RATIOS` whose two methods were measured (memory: the step peak)."""
    out = {}
    for key, (a, b, field) in RATIOS.items():
        if a in rows and b in rows and rows[b].get(field):
            out[key] = rows[a][field] / rows[b][field]
    return out


def targets_for(preset: bool, batch: int) -> dict[str, tuple[str, float]]:
    """The ratios judged, as (comparison, bound): the default sizes' or a preset's at `batch`."""
    if not preset:
        return dict(TARGETS)
    extra = {k: (op, v) for k, (least, op, v) in PRESET_BATCH_TARGETS.items() if batch >= least}
    return {**PRESET_TARGETS, **extra}


def meets(value: float, op: str, bound: float) -> bool:
    """Whether `value op bound` holds."""
    return bool(value <= bound) if op == "<=" else bool(value >= bound) if op == ">=" else bool(value > bound)


def machine() -> dict[str, Any]:
    """Python, torch, transformers and TRL versions, the CPU, cores and threads, the GPU if any."""
    import platform

    import torch
    import transformers
    import trl

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def loadavg() -> float | None:
    """The 1-minute load average, if the system has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_bench(
    sizes: Sizes,
    opt: Options,
    warmup: int,
    steps: int,
    lengths: list[int],
    sweep_steps: int,
    memory_steps: int,
    parallel: int,
    profile: bool = False,
    methods: tuple[str, ...] = METHODS,
    preset: str | None = None,
    max_logits_gib: float = 6.0,
    main_table: bool = True,
    log=print,
) -> dict[str, Any]:
    """Memory (one process per method) first, then interleaved timing (both skipped without
    `main_table`), the sweep, the profile."""
    load_start, wall, mark = loadavg(), {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        wall[name] = round(time.perf_counter() - mark, 1)
        mark = time.perf_counter()

    rows: dict[str, dict[str, Any]] = {}
    if main_table:
        log(f"bench: peak memory, one process per method ({', '.join(methods)})")
        memory = memory_per_process(list(methods), sizes, memory_steps, opt, parallel)
        lap("memory")
        log(f"bench: timing {warmup} warm-up + {steps} steps per method, interleaved")
        import torch

        rows = time_methods(list(methods), sizes, warmup, steps, opt, Clock(torch.cuda if opt.cuda else None))
        lap("timing")
        for m in methods:
            rows[m].update({k: v for k, v in memory[m].items() if k.endswith("_mb")})
    points = []
    if lengths:
        swept = [m for m in SWEEP_METHODS if m in methods]
        log(f"bench: sequence-length sweep {lengths} for {', '.join(swept)}")
        points = sweep(lengths, swept, sizes, sweep_steps, opt, max_logits_gib)
        lap("sweep")
    prof = None
    if profile:
        from iftune.benchmarks.profile import profile_steps

        log("bench: profile of IFT and same-path SFT steps")
        prof = profile_steps(sizes, opt, steps)
        lap("profile")
    wall["total"] = round(sum(wall.values()), 1)
    rat = ratios(rows)
    targets = targets_for(preset is not None, sizes.batch)
    faster = {path: m for path, m in HEAD_PATHS.items() if m in rows}
    return {
        "preset": preset,
        "label": sizes.label(),
        "sizes": asdict(sizes),
        "precision": opt.precision,
        "device": "cuda" if opt.cuda else "cpu",
        "machine": machine(),
        "gradient_checkpointing": opt.checkpointing,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "memory_steps": memory_steps,
        "methods": rows,
        "ratios": rat,
        "targets": {
            k: {"bound": f"{op} {v}", "met": meets(rat[k], op, v)} for k, (op, v) in targets.items() if k in rat
        },
        "faster_head_path": min(faster, key=lambda p: rows[faster[p]]["step_s"]) if faster else None,
        "sweep": points,
        "profile": prof,
        "wall_s": wall,
        # Other work on the same cores slows every method; the interleaving spreads it evenly.
        "loadavg_1min": {"start": load_start, "end": loadavg()},
    }


__all__ = [
    "HEAD_PATHS",
    "PRESET_BATCH_TARGETS",
    "PRESET_TARGETS",
    "RATIOS",
    "SWEEP_METHODS",
    "TARGETS",
    "loadavg",
    "machine",
    "meets",
    "ratios",
    "run_bench",
    "sweep",
    "targets_for",
    "time_methods",
]
