"""`iftune bench`: the cost of an IFT training step against SFT, DPO and ORPO, side by side.

Every method runs through its real trainer (TRL's SFTTrainer, DPOTrainer and ORPOTrainer,
iftune's IFTTrainer) on one Llama-style model with random weights and token sequences of
fixed lengths. Two more trainers isolate what IFT itself costs:

- `sft`: a true single-pass SFT on the LM-head path IFT uses (one forward for the final
  hidden states, then `iftune.lm_head.token_logprobs` at trained positions only). IFT's own
  overhead is measured against it; `trl_sft` (the stock SFTTrainer) is what a user compares to.
- `naive_ift`: the same objective computed the way the reference code does it, with the full
  (B, T, V) float32 logits in both passes, to show what the chunked head saves.
- `ift_trl_head`: IFT with `lm_head="trl"` (TRL's fused LM head in the training pass); with
  `ift` and `naive_ift` it picks the faster head path on the device, by measurement.

How it is timed: each trainer runs its own `trainer.train()` in a thread; a callback lets
exactly one thread run between `on_step_begin` and its next `on_step_begin`, in a fixed
order (A B C D A B C D ...), so drift hits all methods alike and no method's data loading or
logging overlaps another's timed step. A step's time is `on_step_begin` -> `on_step_end`:
forward, backward, clipping and the optimizer step of one batch (collation is not timed).
Peak memory is measured in a forked process per method (its own heap, nothing shared).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import multiprocessing
import os
import random
import statistics
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

from iftune.errors import UserError

METHODS = ("trl_sft", "sft", "ift", "ift_trl_head", "naive_ift", "dpo", "orpo")
SWEEP_METHODS = ("sft", "ift")
_SFT_LIKE = ("trl_sft", "sft", "ift", "ift_trl_head", "naive_ift")  # prompt/completion data
# IFT's LM-head paths, compared to pick the faster one on the device.
HEAD_PATHS = {"chunked": "ift", "trl_fused": "ift_trl_head", "full_logits": "naive_ift"}
# Targets of issue 6, as (ratio key, comparison, bound).
TARGETS = {
    "ift_over_sft_time": ("<=", 1.40),
    "ift_over_sft_memory": ("<=", 1.10),
    "ift_over_trl_sft_time": ("<=", 1.40),
    "ift_over_dpo_time_per_example": ("<=", 0.55),
    "ift_over_orpo_time_per_example": ("<=", 0.75),
    "naive_over_ift_memory": (">=", 1.5),
    "naive_over_ift_time": (">", 0.0),
}


@dataclass(frozen=True)
class Sizes:
    """Model and batch sizes. Defaults: issue 6 (Mistral's vocabulary, a small Llama body)."""

    vocab: int = 32000
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 896  # Mistral's 3.5 x hidden
    batch: int = 4
    seq: int = 512
    prompt: int = 128

    def check(self) -> None:
        for name, value in asdict(self).items():
            if value < 1:
                raise UserError(f"--{name}={value} is not valid; expected an integer >= 1")
        if self.vocab < 8:
            raise UserError(f"--vocab={self.vocab} is not valid; expected an integer >= 8")
        if self.hidden % self.heads:
            raise UserError(f"--hidden={self.hidden} is not a multiple of --heads={self.heads}")
        if self.prompt >= self.seq - 1:
            raise UserError(f"--prompt={self.prompt} leaves no completion; expected --prompt < --seq - 1")


@dataclass(frozen=True)
class Options:
    """How the trainers run: seed, device, and activation checkpointing (off for all by default)."""

    seed: int = 0
    cuda: bool = False
    checkpointing: bool = False


QUICK = Sizes(vocab=256, hidden=32, layers=2, heads=2, intermediate=64, batch=2, seq=48, prompt=12)

# --------------------------------------------------------------------------- model and data

_SPECIAL = ("<pad>", "</s>", "<unk>")


def make_tokenizer(vocab: int):
    """A word-level tokenizer whose words are `t<id>`: text of n words is exactly n tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {tok: i for i, tok in enumerate(_SPECIAL)}
    words.update({f"t{i}": i for i in range(len(_SPECIAL), vocab)})
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def make_model(sizes: Sizes, seed: int, max_positions: int):
    """A Llama-style causal LM with random weights, float32, untied head (as Mistral)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=sizes.vocab, hidden_size=sizes.hidden, num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads, num_key_value_heads=sizes.heads,
        intermediate_size=sizes.intermediate, max_position_embeddings=max_positions,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )
    return LlamaForCausalLM(config).to(torch.float32)


def _words(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(f"t{rng.randrange(len(_SPECIAL), vocab)}" for _ in range(n))


def make_dataset(method: str, sizes: Sizes, rows: int, seed: int):
    """Rows of text that tokenize to `seq` tokens with a `prompt`-token prompt (EOS included).

    SFT-style methods get prompt/completion; DPO and ORPO get prompt/chosen/rejected with
    chosen and rejected of the same length, so each of their sequences is as long as SFT's.
    """
    from datasets import Dataset

    rng = random.Random(seed)
    completion = sizes.seq - sizes.prompt - 1  # the trainers append EOS
    answers = ("completion",) if method in _SFT_LIKE else ("chosen", "rejected")
    data: dict[str, list[str]] = {key: [] for key in ("prompt", *answers)}
    for _ in range(rows):
        data["prompt"].append(_words(rng, sizes.prompt, sizes.vocab))
        for key in answers:
            data[key].append(" " + _words(rng, completion, sizes.vocab))
    return Dataset.from_dict(data)


# --------------------------------------------------------------------------- the two extra trainers


def _path_sft_class():
    import iftune.modeling as modeling  # looked up at call time, so the profiler's timers see it
    from iftune.trainer import IFTTrainer

    class PathSFTTrainer(IFTTrainer):
        """Single-pass SFT, per-sequence mean, on IFT's head path: the spec's lam = 0, gamma = 0
        objective without the intuition pass (a baseline for IFT's own overhead)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            position_ids = inputs.get("position_ids")
            targets, mask = modeling.trained_targets(inputs["labels"], position_ids)
            logp = modeling.trained_logprobs(model, targets, mask, inputs.get("attention_mask"), position_ids,
                                              input_ids=inputs["input_ids"])
            loss_sum = (-logp.sum(-1) / mask.sum(-1).clamp_min(1)).sum()
            loss = self.window_mean(loss_sum, mask.any(-1).sum(), num_items_in_batch)
            return (loss, None) if return_outputs else loss

    return PathSFTTrainer


def _wide(logits):
    """float32 copy of half-precision logits, as the reference code makes (float64 stays)."""
    import torch

    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _naive_ift_class():
    import torch

    from iftune.modeling import IGNORE_INDEX, unwrap_model
    from iftune.objective import intuitive_tokens, mix_embeddings, relation_weights
    from iftune.trainer import IFTTrainer

    class NaiveIFTTrainer(IFTTrainer):
        """IFT computed with the full (B, T, V) float32 logits in both passes (the reference
        code's way): argmax over all logits, then log-softmax over all logits."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            args = self.args
            ids, labels, attn = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
            lam = args.lambda_at(self.state.global_step)
            with torch.no_grad():
                preds = _wide(model(input_ids=ids, attention_mask=attn, use_cache=False).logits).argmax(-1)
            table = unwrap_model(model).get_input_embeddings()
            x = mix_embeddings(table(ids), table(intuitive_tokens(ids, labels, preds)), lam)
            logits = _wide(model(inputs_embeds=x, attention_mask=attn, use_cache=False).logits)
            targets = labels[:, 1:]
            mask = targets != IGNORE_INDEX
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
            logp = torch.where(mask, logp, torch.zeros_like(logp))
            w = relation_weights(logp, mask, args.gamma, args.propagation, args.side, args.norm,
                                 detach=args.detach_weights)
            loss_sum = ((-(logp * w)).sum(-1) / mask.sum(-1).clamp_min(1)).sum()
            loss = self.window_mean(loss_sum, mask.any(-1).sum(), num_items_in_batch)
            return (loss, None) if return_outputs else loss

    return NaiveIFTTrainer


# --------------------------------------------------------------------------- building trainers


def _common_args(sizes: Sizes, steps: int, opt: Options, out_dir: str) -> dict[str, Any]:
    return dict(
        output_dir=out_dir, per_device_train_batch_size=sizes.batch, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=1e-5, lr_scheduler_type="constant", seed=opt.seed,
        logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=not opt.cuda, bf16=False, fp16=False, dataloader_num_workers=0, max_length=sizes.seq,
        # TRL's configs turn it on by default, the ORPO one does not: one setting for all.
        activation_checkpointing=opt.checkpointing,
    )


def build_trainer(method: str, sizes: Sizes, model, steps: int, opt: Options, out_dir: str):
    """The real trainer of `method` on `model` (trained in place) and its own dataset."""
    from transformers import PrinterCallback

    from iftune.train import trainer_classes

    common = _common_args(sizes, steps, opt, out_dir)
    dataset = make_dataset(method, sizes, sizes.batch * steps, opt.seed)
    tokenizer = make_tokenizer(sizes.vocab)
    kwargs: dict[str, Any] = {}
    if method in _SFT_LIKE:
        config_cls, trainer_cls = trainer_classes("sft" if method == "trl_sft" else "ift")
        if method == "sft":
            trainer_cls = _path_sft_class()
        elif method == "naive_ift":
            trainer_cls = _naive_ift_class()
        elif method == "ift_trl_head":
            common["lm_head"] = "trl"
    elif method == "dpo":
        config_cls, trainer_cls = trainer_classes("dpo")
        kwargs["ref_model"] = copy.deepcopy(model)  # an in-memory model has no path to reload it from
    elif method == "orpo":
        config_cls, trainer_cls = trainer_classes("orpo")
        common["remove_unused_columns"] = False  # its collator needs every column (it says so otherwise)
    else:
        raise UserError(f"unknown method '{method}'; expected one of {', '.join(METHODS)}")
    trainer = trainer_cls(model=model, args=config_cls(**common), train_dataset=dataset,
                          processing_class=tokenizer, **kwargs)
    trainer.remove_callback(PrinterCallback)  # no log lines in the benchmark's output
    return trainer


def tokens_per_step(trainer) -> int:
    """Tokens of one batch that the policy model runs on (chosen + rejected for DPO/ORPO)."""
    batch = next(iter(trainer.get_train_dataloader()))
    masks = [v for k, v in batch.items() if k.endswith("attention_mask") and not k.startswith("prompt")]
    return int(sum(int(m.sum()) for m in masks))


# --------------------------------------------------------------------------- interleaved timing


class Relay:
    """Trainers in threads take turns, one training step each, in a fixed order.

    A thread holds the turn from its `on_step_begin` until its next `on_step_begin` (or the end
    of its training), so whatever it does between steps never overlaps another's timed step.
    """

    def __init__(self, names: list[str], warmup: int, cuda: bool) -> None:
        self.order = list(names)
        self.holder: str | None = self.order[0] if self.order else None
        self.cond = threading.Condition()
        self.warmup, self.cuda = warmup, cuda
        self.times: dict[str, list[float]] = {n: [] for n in names}

    def _next(self, name: str) -> str | None:
        if len(self.order) <= 1:
            return None
        return self.order[(self.order.index(name) + 1) % len(self.order)]

    def take(self, name: str, held: bool) -> None:
        with self.cond:
            if held and self.holder == name:
                self.holder = self._next(name) or name
                self.cond.notify_all()
            self.cond.wait_for(lambda: self.holder == name)

    def leave(self, name: str) -> None:
        with self.cond:
            if self.holder == name:
                self.holder = self._next(name)
            if name in self.order:
                self.order.remove(name)
            self.cond.notify_all()

    def callback(self, name: str):
        from transformers import TrainerCallback

        relay = self

        class _Timer(TrainerCallback):
            held, start = False, 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                relay.take(name, self.held)
                self.held = True
                relay.sync()
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                relay.sync()
                if state.global_step > relay.warmup:
                    relay.times[name].append(time.perf_counter() - self.start)

        return _Timer()

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def time_interleaved(trainers: dict[str, Any], warmup: int, cuda: bool) -> dict[str, list[float]]:
    """Run every trainer's `train()` at once, one step at a time in turn; seconds per timed step."""
    relay = Relay(list(trainers), warmup, cuda)
    errors: dict[str, BaseException] = {}
    # No thread exits (and tears down its OpenMP workers) while another one is being timed.
    finished = threading.Barrier(len(trainers))

    def run(name: str, trainer) -> None:
        try:
            trainer.train()
        except BaseException as err:  # reported after the join, the other threads go on
            errors[name] = err
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
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        gc.enable()
    if errors:
        name, err = next(iter(errors.items()))
        raise RuntimeError(f"bench: the {name} trainer failed: {err!r}") from err
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


def measure_memory(method: str, sizes: Sizes, steps: int, opt: Options) -> dict[str, float]:
    """Peak memory of `steps` training steps of `method`, in this process (MiB).

    `step_peak_mb`: the peak above what the built trainer already holds (model, reference
    model, data): gradients, optimizer state, activations and logits. `process_peak_mb`: the
    whole process (CPU: peak RSS, libraries included; CUDA: peak allocated tensors).
    """
    import resource

    import torch

    with tempfile.TemporaryDirectory() as out:
        model = make_model(sizes, opt.seed, sizes.seq)
        trainer = build_trainer(method, sizes, model, steps, opt, out)
        if opt.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            trainer.train()
            peak = torch.cuda.max_memory_allocated()
            return {"process_peak_mb": peak / 2**20, "step_peak_mb": (peak - base) / 2**20}
        exact = _reset_peak_rss()
        base = _status_kb("VmRSS") or 0
        trainer.train()
        peak = _status_kb("VmHWM") if exact else None
        if peak is None:  # no resettable mark: the lifetime peak bounds it from above
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"process_peak_mb": peak / 1024, "step_peak_mb": (peak - base) / 1024}


def quiet() -> None:
    """No progress bars, deprecation warnings or info logs from the libraries."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.simplefilter("ignore", FutureWarning)


def _memory_child(conn, method: str, sizes: Sizes, steps: int, opt: Options) -> None:
    try:
        quiet()
        conn.send(("ok", measure_memory(method, sizes, steps, opt)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


_PRELOAD = ("torch", "datasets", "transformers.models.llama.modeling_llama", "trl.trainer.sft_trainer",
            "trl.trainer.dpo_trainer", "trl.experimental.orpo.orpo_trainer", "iftune.trainer",
            "iftune.benchmarks.trainers")


def memory_per_process(methods: list[str], sizes: Sizes, steps: int, opt: Options, parallel: int) -> dict[str, dict[str, float]]:
    """`measure_memory` for each method in its own process, `parallel` at a time.

    The processes fork from a fork server that has imported the libraries once but never run a
    torch op: a process forked after OpenMP ran hangs, and a fresh interpreter per method would
    re-import everything. Memory does not depend on timing, so running two at once only
    shortens the wall time. A script calling this must guard its entry point with
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


# --------------------------------------------------------------------------- the whole benchmark


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def time_methods(methods: list[str], sizes: Sizes, warmup: int, steps: int,
                 opt: Options) -> dict[str, dict[str, Any]]:
    """Per method: its timed steps, median seconds per step and per example, tokens per second."""
    with tempfile.TemporaryDirectory() as out:
        base = make_model(sizes, opt.seed, sizes.seq)
        trainers = {m: build_trainer(m, sizes, copy.deepcopy(base), warmup + steps, opt, os.path.join(out, m))
                    for m in methods}
        del base
        tokens = {m: tokens_per_step(t) for m, t in trainers.items()}
        times = time_interleaved(trainers, warmup, opt.cuda)
    rows = {}
    for m in methods:
        step = _median(times[m])
        rows[m] = {"step_times_s": [round(t, 5) for t in times[m]], "step_s": step,
                   "example_s": step / sizes.batch, "tokens_per_step": tokens[m],
                   "tokens_per_s": tokens[m] / step if step > 0 else math.nan}
    return rows


def sweep(lengths: list[int], sizes: Sizes, warmup: int, steps: int, opt: Options) -> list[dict]:
    """SFT (same head path) and IFT at several sequence lengths, prompt a quarter of each."""
    points = []
    for length in lengths:
        at = replace(sizes, seq=length, prompt=max(1, length // 4))
        rows = time_methods(list(SWEEP_METHODS), at, warmup, steps, opt)
        points.append({"seq": length, "prompt": at.prompt,
                       **{f"{m}_step_s": rows[m]["step_s"] for m in SWEEP_METHODS},
                       **{f"{m}_step_times_s": rows[m]["step_times_s"] for m in SWEEP_METHODS},
                       "ift_over_sft_time": rows["ift"]["step_s"] / rows["sft"]["step_s"]})
    return points


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The ratios of issue 6. Memory ratios use the step peak (above the built trainer)."""

    def r(a: str, b: str, key: str) -> float:
        return rows[a][key] / rows[b][key] if rows[b].get(key) else math.nan

    return {
        "ift_over_sft_time": r("ift", "sft", "step_s"),
        "ift_over_sft_memory": r("ift", "sft", "step_peak_mb"),
        "ift_over_trl_sft_time": r("ift", "trl_sft", "step_s"),
        "ift_over_dpo_time_per_example": r("ift", "dpo", "example_s"),
        "ift_over_orpo_time_per_example": r("ift", "orpo", "example_s"),
        "naive_over_ift_memory": r("naive_ift", "ift", "step_peak_mb"),
        "naive_over_ift_time": r("naive_ift", "ift", "step_s"),
    }


def machine() -> dict[str, Any]:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()
            or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        import transformers
        import trl

        info.update(transformers=transformers.__version__, trl=trl.__version__)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_bench(sizes: Sizes, opt: Options, warmup: int, steps: int, lengths: list[int], sweep_steps: int,
              memory_steps: int, parallel: int, profile: bool = False, log=print) -> dict[str, Any]:
    """Memory (one process per method) first, then interleaved timing, the sweep, the profile."""
    load_start, wall, mark = _loadavg(), {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        wall[name] = round(time.perf_counter() - mark, 1)
        mark = time.perf_counter()

    log(f"bench: peak memory, one process per method ({', '.join(METHODS)})")
    memory = memory_per_process(list(METHODS), sizes, memory_steps, opt, parallel)
    lap("memory")
    log(f"bench: timing {warmup} warm-up + {steps} steps per method, interleaved")
    rows = time_methods(list(METHODS), sizes, warmup, steps, opt)
    lap("timing")
    for m in METHODS:
        rows[m].update(memory[m])
    points = []
    if lengths:
        log(f"bench: sequence-length sweep {lengths} for {', '.join(SWEEP_METHODS)}")
        points = sweep(lengths, sizes, 1, sweep_steps, opt)
        lap("sweep")
    prof = None
    if profile:
        from iftune.benchmarks.profile import profile_steps

        log("bench: profile of IFT and same-path SFT steps")
        prof = profile_steps(sizes, opt)
        lap("profile")
    wall["total"] = round(sum(wall.values()), 1)
    rat = ratios(rows)
    return {
        "sizes": asdict(sizes), "device": "cuda" if opt.cuda else "cpu", "machine": machine(),
        "gradient_checkpointing": opt.checkpointing,
        "warmup_steps": warmup, "timed_steps": steps, "memory_steps": memory_steps,
        "methods": rows, "ratios": rat,
        "process_peak_ratios": {
            "ift_over_sft_memory": rows["ift"]["process_peak_mb"] / rows["sft"]["process_peak_mb"],
            "naive_over_ift_memory": rows["naive_ift"]["process_peak_mb"] / rows["ift"]["process_peak_mb"]},
        "targets": {k: {"bound": f"{op} {v}", "met": _meets(rat[k], op, v)} for k, (op, v) in TARGETS.items()},
        "faster_head_path": min(HEAD_PATHS, key=lambda path: rows[HEAD_PATHS[path]]["step_s"]),
        "sweep": points, "profile": prof, "wall_s": wall,
        # Other work on the same cores slows every method; the interleaving spreads it evenly.
        "loadavg_1min": {"start": load_start, "end": _loadavg()},
    }


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _meets(value: float, op: str, bound: float) -> bool:
    return bool(value <= bound) if op == "<=" else bool(value >= bound) if op == ">=" else bool(value > bound)


def format_table(result: dict[str, Any]) -> str:
    s = result["sizes"]
    lines = [f"iftune bench: {s['layers']} layers, hidden {s['hidden']}, vocab {s['vocab']}, batch {s['batch']} x "
             f"{s['seq']} tokens (prompt {s['prompt']}), {result['device']}, {result['timed_steps']} timed steps",
             f"{'method':<10} {'s/step':>8} {'s/example':>10} {'tokens/s':>9} {'step peak MiB':>14} "
             f"{'process MiB':>12}"]
    for m, row in result["methods"].items():
        lines.append(f"{m:<10} {row['step_s']:>8.3f} {row['example_s']:>10.4f} {row['tokens_per_s']:>9.0f} "
                     f"{row['step_peak_mb']:>14.0f} {row['process_peak_mb']:>12.0f}")
    lines.append("")
    lines.append(f"{'ratio':<32} {'value':>7}  target")
    for key, value in result["ratios"].items():
        t = result["targets"][key]
        lines.append(f"{key:<32} {value:>7.3f}  {t['bound']:<7} {'met' if t['met'] else 'NOT met'}")
    if result["sweep"]:
        lines.append("")
        lines.append(f"{'seq':>6} {'sft s/step':>11} {'ift s/step':>11} {'ift/sft':>8}")
        for p in result["sweep"]:
            lines.append(f"{p['seq']:>6} {p['sft_step_s']:>11.3f} {p['ift_step_s']:>11.3f} "
                         f"{p['ift_over_sft_time']:>8.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def make_parser() -> argparse.ArgumentParser:
    d = Sizes()
    p = argparse.ArgumentParser(prog="iftune bench", description=__doc__.splitlines()[0])
    for name in ("vocab", "hidden", "layers", "heads", "intermediate", "batch", "seq", "prompt"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"default {getattr(d, name)} ({getattr(QUICK, name)} "
                                                                  f"with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per method first (default 2; 1 quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per method (default 4; 2 quick)")
    p.add_argument("--sweep", type=int, nargs="*", default=None, metavar="LEN",
                   help="sequence lengths of the sft/ift sweep (default 256 512 1024 2048; 24 48 quick)")
    p.add_argument("--no-sweep", action="store_true", help="skip the sequence-length sweep")
    p.add_argument("--sweep-steps", type=int, default=None, help="timed steps per sweep point, after one "
                                                                  "warm-up (default 2; 1 quick)")
    p.add_argument("--memory-steps", type=int, default=2, help="steps run by each memory process (default 2)")
    p.add_argument("--parallel", type=int, default=2, help="memory processes at once (default 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="activation checkpointing in every trainer (default: off in all)")
    p.add_argument("--profile", action="store_true", help="also time each phase of an IFT and an SFT step")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (seconds)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    return p


def _settings(ns: argparse.Namespace) -> tuple[Sizes, dict[str, Any]]:
    base = QUICK if ns.quick else Sizes()
    sizes = replace(base, **{k: getattr(ns, k) for k in asdict(base) if getattr(ns, k) is not None})
    sizes.check()
    pick = lambda v, full, quick: v if v is not None else (quick if ns.quick else full)  # noqa: E731
    lengths = [] if ns.no_sweep else pick(ns.sweep, [256, 512, 1024, 2048], [24, 48])
    opts = dict(warmup=pick(ns.warmup, 2, 1), steps=pick(ns.steps, 4, 2), lengths=lengths,
                sweep_steps=pick(ns.sweep_steps, 2, 1), memory_steps=ns.memory_steps, parallel=ns.parallel,
                profile=ns.profile)
    for key in ("steps", "sweep_steps", "memory_steps", "parallel"):
        if opts[key] < 1:
            raise UserError(f"--{key.replace('_', '-')}={opts[key]} is not valid; expected an integer >= 1")
    if opts["warmup"] < 0:
        raise UserError(f"--warmup={opts['warmup']} is not valid; expected an integer >= 0")
    bad = [n for n in lengths if n < 8]
    if bad:
        raise UserError(f"--sweep {bad[0]} is not valid; expected sequence lengths >= 8")
    return sizes, opts


def main(argv: list[str]) -> int:
    ns = make_parser().parse_args(argv)
    sizes, opts = _settings(ns)
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
    if ns.json:
        parent = os.path.dirname(os.path.abspath(ns.json))
        if not os.path.isdir(parent):
            raise UserError(f"--json: no such directory '{parent}'")
    with warnings.catch_warnings():
        quiet()
        result = run_bench(sizes, Options(ns.seed, cuda, ns.gradient_checkpointing), **opts)
    print(format_table(result))
    if result["profile"]:
        from iftune.benchmarks.profile import format_profile

        print()
        print(format_profile(result["profile"]))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


__all__ = ["METHODS", "Sizes", "build_trainer", "format_table", "main", "make_model", "make_tokenizer",
           "measure_memory", "ratios", "run_bench", "time_interleaved"]
