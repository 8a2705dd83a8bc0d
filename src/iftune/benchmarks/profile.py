"""Where an IFT step's time goes, next to the same-path SFT step (`iftune bench --profile`).

Each phase of `iftune.objective.ift_loss` is timed by wrapping the functions it calls (the
body forward, the intuition head, the mixing, the training head, the relation weights);
the backward and the optimizer step are timed around their calls. A torch.profiler run of
one IFT step gives the operators that dominate.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Any

import iftune.objective as objective

# Functions of iftune.objective that ift_loss calls, and the phase each one is.
_WRAPPED = {
    # The intuition or the training body forward, told apart by grad mode (the path-SFT
    # baseline calls this and token_logprobs through the module too).
    "_hidden_states": None,
    "intuition_from_hidden": "intuition head: argmax + teacher-forced log-prob",
    "intuitive_tokens": "intuitive tokens + mixing",
    "mix_embeddings": "intuitive tokens + mixing",
    "token_logprobs": "training head forward",
    "relation_weights": "relation weights",
}


@contextlib.contextmanager
def _phase_timers(totals: dict[str, float]):
    """Wrap the objective's helpers so that each call adds its wall time to its phase."""
    import torch

    originals = {name: getattr(objective, name) for name in _WRAPPED}

    def wrap(name, fn):
        def timed(*args, **kwargs):
            phase = _WRAPPED[name] or ("training body forward" if torch.is_grad_enabled()
                                       else "intuition body forward (no grad)")
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[phase] += time.perf_counter() - start
        return timed

    for name, fn in originals.items():
        setattr(objective, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(objective, name, fn)


def _one_step(trainer, batch, totals: dict[str, float]) -> None:
    model = trainer.model
    start = time.perf_counter()
    loss = trainer.compute_loss(model, batch)
    totals["forward total"] += time.perf_counter() - start
    mark = time.perf_counter()
    loss.backward()
    totals["backward"] += time.perf_counter() - mark
    mark = time.perf_counter()
    trainer.optimizer.step()
    model.zero_grad()
    totals["optimizer step"] += time.perf_counter() - mark
    totals["step"] += time.perf_counter() - start


def profile_steps(sizes, opt, steps: int = 3, top: int = 10) -> dict[str, Any]:
    """Median seconds per phase of `steps` IFT and same-path SFT steps (alternated, after one
    warm-up each), and the `top` operators of one IFT step by self CPU time."""
    import torch

    from iftune.benchmarks.trainers import build_trainer, make_model

    phases: dict[str, dict[str, list[float]]] = {"ift": defaultdict(list), "sft": defaultdict(list)}
    with tempfile.TemporaryDirectory() as out:
        trainers, batches = {}, {}
        for method in phases:
            trainer = build_trainer(method, sizes, make_model(sizes, opt.seed, sizes.seq), steps + 2, opt, out)
            trainer.create_optimizer_and_scheduler(num_training_steps=steps + 2)
            trainer.model.train()
            trainers[method] = trainer
            batches[method] = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        with _phase_timers(defaultdict(float)):
            for method, trainer in trainers.items():
                _one_step(trainer, batches[method], defaultdict(float))  # warm-up
        for _ in range(steps):
            for method, trainer in trainers.items():
                totals: dict[str, float] = defaultdict(float)
                with _phase_timers(totals):
                    _one_step(trainer, batches[method], totals)
                for phase, seconds in totals.items():
                    phases[method][phase].append(seconds)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _one_step(trainers["ift"], batches["ift"], defaultdict(float))
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) or 1.0
    return {
        "phases_s": {m: {p: statistics.median(v) for p, v in ph.items()} for m, ph in phases.items()},
        "ift_top_ops": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
                         "calls": e.count} for e in ops[:top]],
    }


def format_profile(prof: dict[str, Any]) -> str:
    ift, sft = prof["phases_s"]["ift"], prof["phases_s"]["sft"]
    lines = [f"{'phase (median s)':<52} {'ift':>7} {'sft':>7}"]
    for phase in sorted(set(ift) | set(sft), key=lambda p: (p == "step", p)):
        lines.append(f"{phase:<52} {ift.get(phase, 0.0):>7.3f} {sft.get(phase, 0.0):>7.3f}")
    lines.append("")
    lines.append(f"{'top operators of one IFT step':<40} {'self s':>7} {'share':>6} {'calls':>6}")
    for op in prof["ift_top_ops"]:
        lines.append(f"{op['op'][:40]:<40} {op['self_s']:>7.3f} {op['share']:>6.1%} {op['calls']:>6}")
    return "\n".join(lines)


__all__ = ["format_profile", "profile_steps"]
