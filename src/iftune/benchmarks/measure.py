"""Timing and peak memory of training steps, on the CPU or on CUDA.

Timing: each trainer runs its own `trainer.train()` in a thread; a callback lets exactly one
thread run between `on_step_begin` and its next `on_step_begin`, in a fixed order
(A B C D A B C D ...), so drift hits all methods alike and no method's data loading or logging
overlaps another's timed step. A step is `on_step_begin` -> `on_step_end`: forward, backward,
clipping and the optimizer step of one batch (collation is not timed), measured on the host
clock on a CPU and with CUDA events on a GPU.

Memory: each method in its own process forked from a fork server (its own heap); the peak
resident memory on a CPU, `max_memory_allocated` on CUDA.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import resource
import tempfile
import threading
import time
import traceback
from typing import Any

from iftune.benchmarks.setup import Options, Sizes, build_trainer, make_model
from iftune.console import silence_libraries


class Clock:
    """Seconds of a step: the host clock, or CUDA events when `cuda` (the `torch.cuda` module,
    or a stand-in with the same `Event`, `synchronize` API) is given."""

    def __init__(self, cuda: Any = None) -> None:
        self.cuda = cuda

    def sync(self) -> None:
        if self.cuda is not None:
            self.cuda.synchronize()

    def start(self) -> Any:
        """A start mark for `seconds_since`."""
        if self.cuda is None:
            return time.perf_counter()
        event = self.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds_since(self, mark: Any) -> float:
        """Seconds from `mark` to now (waits for the device's queued work)."""
        if self.cuda is None:
            return time.perf_counter() - mark
        end = self.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return mark.elapsed_time(end) / 1000.0


class Relay:
    """Trainers in threads take turns, one training step each, in a fixed order.

    A thread holds the turn from its `on_step_begin` until its next `on_step_begin` (or the end
    of its training), so whatever it does between steps never overlaps another's timed step.
    """

    def __init__(self, names: list[str], warmup: int, clock: Clock, memory: bool = False) -> None:
        self.order = list(names)
        # On CUDA, `memory`: each timed step's peak allocation (`reset_peak`/`read_peak` around
        # the step, which runs alone), what it began with and its gradients, per method.
        self.memory = memory and clock.cuda is not None
        self.peaks: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        self.holder: str | None = self.order[0] if self.order else None
        self.cond = threading.Condition()
        self.warmup, self.clock = warmup, clock
        self.times: dict[str, list[float]] = {n: [] for n in names}
        # CPU seconds of the whole process per step: only the turn holder runs, so on a loaded
        # machine they count the step's own work where the wall time also counts waiting.
        self.cpu_times: dict[str, list[float]] = {n: [] for n in names}
        # The trainers share one model: each one's set-up inside `train()` (moving and wrapping
        # the model) must not overlap another's step, so the threads start one after another,
        # each once the previous one is set up, and no step runs before all are.
        self.set_up = {n: threading.Event() for n in names}
        self.all_set_up = threading.Barrier(len(names))

    def _next(self, name: str) -> str | None:
        if len(self.order) <= 1:
            return None
        return self.order[(self.order.index(name) + 1) % len(self.order)]

    def take(self, name: str, held: bool) -> None:
        """Wait for `name`'s turn, passing the turn on first if `name` holds it."""
        with self.cond:
            if held and self.holder == name:
                self.holder = self._next(name) or name
                self.cond.notify_all()
            self.cond.wait_for(lambda: self.holder == name)

    def leave(self, name: str) -> None:
        """`name` has finished: drop it from the order and pass the turn on."""
        with self.cond:
            if self.holder == name:
                self.holder = self._next(name)
            if name in self.order:
                self.order.remove(name)
            self.cond.notify_all()

    def callback(self, name: str):
        """A `TrainerCallback` that times `name`'s steps in turn."""
        from transformers import TrainerCallback

        relay = self

        class _Timer(TrainerCallback):
            held, mark, cpu, base, held_grads, grads = False, None, 0.0, 0, 0, 0

            def on_step_begin(self, args, state, control, model=None, **kwargs):
                if not self.held:
                    relay.set_up[name].set()
                    with contextlib.suppress(threading.BrokenBarrierError):  # a failed one's set-up
                        relay.all_set_up.wait()
                relay.take(name, self.held)
                self.held = True
                relay.clock.sync()
                if relay.memory:
                    self.base, self.held_grads, self.grads = reset_peak(relay.clock.cuda), grad_bytes(model), 0
                self.mark, self.cpu = relay.clock.start(), time.process_time()

            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                if relay.memory:
                    self.grads = grad_bytes(model)

            def on_step_end(self, args, state, control, **kwargs):
                seconds = relay.clock.seconds_since(self.mark)
                if state.global_step > relay.warmup:
                    relay.times[name].append(seconds)
                    relay.cpu_times[name].append(time.process_time() - self.cpu)
                    if relay.memory:
                        peak = read_peak(relay.clock.cuda)
                        unheld = max(0, self.grads - self.held_grads)
                        relay.peaks[name].append(
                            {
                                "process_peak_mb": peak / 2**20,
                                "later_step_peak_mb": (peak - self.base) / 2**20,
                                "activation_mb": (peak - self.base - unheld) / 2**20,
                                "grad_mb": self.grads / 2**20,
                            }
                        )

        return _Timer()


def time_interleaved(
    trainers: dict[str, Any],
    warmup: int,
    clock: Clock | None = None,
    cpu_times: dict | None = None,
    memory: dict | None = None,
) -> dict[str, list[float]]:
    """Run every trainer's `train()` at once, one step at a time in turn; seconds per timed step
    (and, into `cpu_times` if given, the process's CPU seconds per timed step; into `memory`
    if given and the clock is CUDA's, each timed step's peak allocation, `Relay.peaks`)."""
    relay = Relay(list(trainers), warmup, clock or Clock(), memory is not None)
    errors: dict[str, BaseException] = {}
    # No thread exits (and tears down its OpenMP workers) while another one is being timed.
    finished = threading.Barrier(len(trainers))

    def run(name: str, trainer) -> None:
        try:
            trainer.train()
        except BaseException as err:  # reported after the join, the other threads go on
            errors[name] = err
            relay.all_set_up.abort()  # a trainer that failed in its set-up never reaches the barrier
        finally:
            relay.leave(name)
            finished.wait()

    for name, trainer in trainers.items():
        trainer.add_callback(relay.callback(name))
    threads = [threading.Thread(target=run, args=item, daemon=True) for item in trainers.items()]
    # A full garbage collection costs up to a second here (transformers and TRL hold millions of
    # objects) and would land in whichever step happens to trigger it: none while timing.
    gc.collect()
    gc.disable()
    try:
        for (name, _), t in zip(trainers.items(), threads, strict=True):
            t.start()
            while not relay.set_up[name].wait(0.1) and t.is_alive():
                pass  # the next trainer starts once this one is set up (or has failed)
        for t in threads:
            t.join()
    finally:
        gc.enable()
    if errors:
        name, err = next(iter(errors.items()))
        raise RuntimeError(f"bench: the {name} trainer failed: {err!r}") from err
    if cpu_times is not None:
        cpu_times.update(relay.cpu_times)
    if memory is not None and relay.memory:
        memory.update(relay.peaks)
    return relay.times


# --------------------------------------------------------------------------- peak memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def reset_peak(cuda: Any = None) -> int:
    """Reset the peak-memory mark to now; returns the bytes held now (CPU: resident memory,
    CUDA: allocated tensors). `cuda`: the `torch.cuda` module or a stand-in; None: the CPU."""
    if cuda is not None:
        cuda.synchronize()
        cuda.reset_peak_memory_stats()
        return cuda.memory_allocated()
    _reset_peak_rss()
    return (_status_kb("VmRSS") or 0) * 1024


def read_peak(cuda: Any = None) -> int:
    """Peak bytes since the last `reset_peak` (CPU without a resettable mark: since the start)."""
    if cuda is not None:
        cuda.synchronize()
        return cuda.max_memory_allocated()
    peak = _status_kb("VmHWM")
    if peak is None:  # no resettable mark: the lifetime peak bounds it from above
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * 1024


def peak_during(run, cuda: Any = None) -> dict[str, float]:
    """Peak memory (MiB) while `run()` runs: `process_peak_mb` (CPU: peak RSS, libraries
    included; CUDA: peak allocated tensors) and `step_peak_mb`, the peak above what was held
    before. `cuda`: the `torch.cuda` module or a stand-in; None measures the CPU process."""
    base = reset_peak(cuda)
    run()
    peak = read_peak(cuda)
    return {"process_peak_mb": peak / 2**20, "step_peak_mb": (peak - base) / 2**20}


def measure_memory(method: str, sizes: Sizes, steps: int, opt: Options) -> dict[str, Any]:
    """Peak memory (MiB) of `steps` training steps of `method` in this process, and the seconds
    of each step (`step_times_s`, and the process's CPU seconds `step_cpu_times_s`; not
    interleaved with other methods).

    `step_peak_mb`: the peak above what the built trainer (model, reference model, data) held:
    gradients, optimizer state, activations and logits. `later_step_peak_mb` (2 steps or more):
    the peak of the later steps above what was held as the second began (the weights and the
    optimizer state): what a step's activations, logits and gradients cost once training runs.
    `activation_mb` (2 steps or more): that peak minus the static floor, i.e. minus the
    gradients (`grad_mb`, their bytes at the optimizer step; those already held as the second
    step began are in the base): what activations and logits cost. `static_mb`: the floor
    above the built trainer, optimizer state and gradients, measured in the same run.
    """
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda if opt.cuda else None
    clock, times, cpu, marks = Clock(cuda), [], [], {"grads": 0}

    class Steps(TrainerCallback):
        mark = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                marks["first"], marks["second_base"] = read_peak(cuda), reset_peak(cuda)
                marks["held_grads"] = grad_bytes(model)
            clock.sync()
            self.mark, self.cpu = clock.start(), time.process_time()

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            marks["grads"] = max(marks["grads"], grad_bytes(model))

        def on_step_end(self, args, state, control, **kwargs):
            times.append(clock.seconds_since(self.mark))
            cpu.append(time.process_time() - self.cpu)

    with tempfile.TemporaryDirectory() as out:
        model = make_model(sizes, opt.seed, sizes.seq, opt.precision, opt.attn)
        trainer = build_trainer(method, sizes, model, steps, opt, out)
        trainer.add_callback(Steps())
        base = reset_peak(cuda)
        trainer.train()
        last = read_peak(cuda)
    peak = max(last, marks.get("first", 0))
    result = {
        "process_peak_mb": peak / 2**20,
        "step_peak_mb": (peak - base) / 2**20,
        "step_times_s": [round(t, 5) for t in times],
        "step_cpu_times_s": [round(t, 5) for t in cpu],
    }
    result["grad_mb"] = marks["grads"] / 2**20
    if "second_base" in marks:
        result["later_step_peak_mb"] = (last - marks["second_base"]) / 2**20
        result.update(floor_split(base, marks["second_base"], last, marks["grads"], marks["held_grads"]))
    return result


def grad_bytes(model: Any) -> int:
    """Bytes of the gradients `model`'s parameters hold now (0 without a model)."""
    if model is None:
        return 0
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def floor_split(base: int, second_base: int, later_peak: int, grads: int, held_grads: int) -> dict[str, float]:
    """The static floor above the built trainer (`base`: weights, data) and the activation
    memory above it, in MiB: the floor is what the second step began with (weights, optimizer
    state, gradients not freed) plus the gradients it had yet to allocate; activations are the
    later steps' peak above that floor."""
    unheld = max(0, grads - held_grads)
    return {
        "static_mb": (second_base - base + unheld) / 2**20,
        "activation_mb": (later_peak - second_base - unheld) / 2**20,
    }


def _memory_child(conn, method: str, sizes: Sizes, steps: int, opt: Options) -> None:
    try:
        silence_libraries()
        conn.send(("ok", measure_memory(method, sizes, steps, opt)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


_PRELOAD = (
    "torch",
    "datasets",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "trl.trainer.sft_trainer",
    "trl.trainer.dpo_trainer",
    "trl.experimental.orpo.orpo_trainer",
    "iftune.trainer",
    "iftune.benchmarks.baselines",
    "iftune.benchmarks.measure",
)


def memory_per_process(
    methods: list[str], sizes: Sizes, steps: int, opt: Options, parallel: int
) -> dict[str, dict[str, float]]:
    """`measure_memory` for each method in its own process, `parallel` at a time.

    The processes fork from a fork server that has imported the libraries once but never run a
    torch op: a process forked after OpenMP ran hangs, and a fresh interpreter per method would
    re-import everything. A script calling this must guard its entry point with
    `if __name__ == "__main__":`, as any multiprocessing code.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(_PRELOAD))
    else:
        ctx = multiprocessing.get_context("spawn")
    results: dict[str, dict[str, float]] = {}
    pending = list(methods)
    running: list[tuple[str, Any, Any]] = []
    while pending or running:
        while pending and len(running) < max(1, parallel):
            method = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_memory_child, args=(child, method, sizes, steps, opt))
            proc.start()
            child.close()
            running.append((method, proc, parent))
        method, proc, parent = running.pop(0)
        try:
            status, value = parent.recv()
        except EOFError:
            status, value = "error", f"process exited with code {proc.exitcode}"
        proc.join()
        if status != "ok":
            raise RuntimeError(f"bench: memory of {method} could not be measured:\n{value}")
        results[method] = value
    return results


__all__ = [
    "Clock",
    "Relay",
    "floor_split",
    "grad_bytes",
    "measure_memory",
    "memory_per_process",
    "peak_during",
    "read_peak",
    "reset_peak",
    "time_interleaved",
]
