"""Where an IFT step's time goes, next to the same-path SFT step (`iftune bench --profile`).

Both trainers run their own `train()` (their data, their autocast) under `torch.profiler`, one
profile per step after a warm-up step. The phases are the `record_function` ranges that
`iftune.objective.ift_loss` opens (`ift.*`; the training pass's two are those of
`iftune.modeling.trained_logprobs`, which the SFT baseline calls too) and the optimizer's own
range; what is left of the step is the backward, clipping and the trainer.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from typing import Any

# The ranges of `ift_loss`, in the order they run; the intuition pass is the first two.
IFT_RANGES = (
    "ift.intuition_forward",
    "ift.intuition_head",
    "ift.mix",
    "ift.training_forward",
    "ift.training_head",
    "ift.relation_weights",
)
INTUITION = ("ift.intuition_forward", "ift.intuition_head")
OPTIMIZER = "optimizer step"
# Parts of the backward, by the autograd node that runs them (a part of "backward and the rest").
BACKWARD_NODES = {
    "embedding backward (lookups)": "EmbeddingBackward0",
    "LM head backward": "_LinearChunkLogProbBackward",
}


def _phases(prof, seconds: float) -> dict[str, float]:
    """Seconds per range of one profiled step, the optimizer step and the rest of the step."""
    phases: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key in IFT_RANGES:
            phases[event.key] += event.cpu_time_total / 1e6
        elif event.key.startswith("Optimizer.step#"):
            phases[OPTIMIZER] += event.cpu_time_total / 1e6
    phases["step"] = seconds
    phases["backward and the rest"] = seconds - sum(v for k, v in phases.items() if k != "step")
    for event in prof.key_averages():
        for name, node in BACKWARD_NODES.items():
            if event.key == f"autograd::engine::evaluate_function: {node}":
                phases[name] += event.cpu_time_total / 1e6
    return dict(phases)


def _profiler_callback(warmup: int, keep: dict[str, Any]):
    import torch
    from transformers import TrainerCallback

    class Profiled(TrainerCallback):
        """Profiles every step after `warmup`: its phases into keep["steps"], its profiler into keep["last"]."""

        prof, start = None, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step >= warmup:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None:
                seconds = time.perf_counter() - self.start
                self.prof.__exit__(None, None, None)
                keep["steps"].append(_phases(self.prof, seconds))
                keep["last"], self.prof = self.prof, None

    return Profiled()


def profile_steps(sizes, opt, steps: int = 3, top: int = 10) -> dict[str, Any]:
    """Median seconds per phase of `steps` IFT and same-path SFT steps (after one warm-up
    each), the intuition pass's share of the IFT step, and the `top` operators of one IFT step
    by self CPU time."""
    from iftune.benchmarks.setup import shared_trainers

    kept = {m: {"steps": [], "last": None} for m in ("ift", "sft")}
    with tempfile.TemporaryDirectory() as out:
        trainers = shared_trainers(list(kept), sizes, steps + 1, opt, out)
        for method, trainer in trainers.items():
            trainer.add_callback(_profiler_callback(1, kept[method]))
            trainer.train()
    phases = {}
    for method, keep in kept.items():
        names = {k for step in keep["steps"] for k in step}
        phases[method] = {k: statistics.median(step.get(k, 0.0) for step in keep["steps"]) for k in names}
    ift = phases["ift"]
    ops = sorted(kept["ift"]["last"].key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [e for e in ops if not e.key.startswith(("ift.", "Optimizer.", "ProfilerStep"))]
    total = sum(e.self_cpu_time_total for e in ops) or 1.0
    return {
        "phases_s": phases,
        "intuition_share": sum(ift.get(k, 0.0) for k in INTUITION) / ift["step"],
        "ift_top_ops": [
            {
                "op": e.key,
                "self_s": e.self_cpu_time_total / 1e6,
                "share": e.self_cpu_time_total / total,
                "calls": e.count,
            }
            for e in ops[:top]
        ],
    }


def format_profile(prof: dict[str, Any]) -> str:
    """The profile as a text table."""
    ift, sft = prof["phases_s"]["ift"], prof["phases_s"]["sft"]
    order = [*IFT_RANGES, OPTIMIZER, "backward and the rest", *BACKWARD_NODES, "step"]
    lines = [f"{'phase (median s)':<32} {'ift':>7} {'sft':>7}"]
    for phase in order:
        if phase in ift or phase in sft:
            cells = [f"{d[phase]:>7.3f}" if phase in d else f"{'-':>7}" for d in (ift, sft)]
            label = f"  of which {phase}" if phase in BACKWARD_NODES else phase
            lines.append(f"{label:<32} {' '.join(cells)}")
    lines.append(f"intuition pass share of the IFT step: {prof['intuition_share']:.1%}")
    lines.append("")
    lines.append(f"{'top operators of one IFT step':<40} {'self s':>7} {'share':>6} {'calls':>6}")
    for op in prof["ift_top_ops"]:
        lines.append(f"{op['op'][:40]:<40} {op['self_s']:>7.3f} {op['share']:>6.1%} {op['calls']:>6}")
    return "\n".join(lines)


__all__ = ["BACKWARD_NODES", "IFT_RANGES", "format_profile", "profile_steps"]
