"""Run under `torchrun --nproc_per_node 2`: the IFT objective on a sharded tiny Llama (FSDP2 or
DeepSpeed ZeRO-3, gloo on CPU), each rank on its own micro-batch, against one unsharded process
on the whole batch. Rank 0 writes a JSON report to `--out`; a collective mismatch raises or
times out instead.

Each step gives the ranks data that used to change the number of embedding/head calls:
a batch the model predicts perfectly (every intuitive token equals the input), a batch with no
trained token, and batches whose trained positions need different numbers of head chunks.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest's tiny model
from batches import empty_batch, normal_batch, perfect_batch
from conftest import build_model, build_tokenizer
from iftune.modeling import sequence_count
from iftune.objective import ift_loss
from iftune.tiny import moe
from iftune.trainer import IFTTrainer

ROWS = 2  # sequences per rank
AUX_COEF = 0.05  # the tiny MoE's router_aux_loss_coef


def tiny_moe(vocab: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny Qwen3-MoE (`iftune.tiny.TINY_MOE`) that returns its router aux loss."""
    return moe("qwen3_moe", vocab, seed, output_router_logits=True, router_aux_loss_coef=AUX_COEF, **overrides)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", choices=("fsdp2", "zero3"), required=True)
    p.add_argument("--tied", action="store_true", help="tie_word_embeddings=True")
    p.add_argument("--intuition_embeddings", default=None, help="e.g. 'detached'; None: ift_loss's default")
    p.add_argument("--chunk", type=int, default=None, help="head chunk size (positions)")
    p.add_argument(
        "--mixed_precision",
        choices=("no", "bf16"),
        default="no",
        help="bf16: the wrapper's bf16 mixed precision (and, for FSDP2, CPU autocast, as accelerate adds)",
    )
    p.add_argument("--init", type=float, default=0.02, help="initializer_range of the tiny Llama")
    p.add_argument("--moe", action="store_true", help="a tiny Qwen3-MoE with its router aux loss instead")
    p.add_argument("--steps", nargs="*", default=None, help="names of the steps to run (default: all)")
    p.add_argument("--out", required=True, help="JSON report; its folder also holds the saved reference model")
    return p.parse_args()


# ---------------------------------------------------------------- data


def steps(ref: torch.nn.Module, vocab: int) -> list[tuple[str, list[dict]]]:
    """(name, one batch per rank) for each step, the same on every rank."""
    return [
        ("normal+perfect", [normal_batch(vocab, 1), perfect_batch(ref, vocab, 2)]),
        ("perfect+no_trained_token", [perfect_batch(ref, vocab, 3), empty_batch(vocab, 4)]),
        ("many_chunks+one_chunk", [normal_batch(vocab, 5, (0, 0)), normal_batch(vocab, 6, (14, 15))]),
        ("no_trained_token+normal", [empty_batch(vocab, 7), normal_batch(vocab, 8, (2, 12))]),
    ]


def concat(batches: list[dict]) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


# ---------------------------------------------------------------- loss, as IFTTrainer scales it


def loss_kwargs(args) -> dict:
    kw = {"head_chunk_size": args.chunk}
    if args.intuition_embeddings is not None:
        kw["intuition_embeddings"] = args.intuition_embeddings
    return kw


def window_loss(model, batch: dict, world: int, kw: dict):
    """IFTTrainer's loss for one micro-batch: its per-sequence losses summed over the count of
    sequences with a trained token on all ranks (`_get_num_items_in_batch`), times the number
    of processes (the gradient reduction averages over ranks), plus the MoE router loss weighted
    as IFTTrainer weighs it (one micro-batch per step). Returns (loss, IFTOutput)."""
    count = torch.tensor([sequence_count(batch["labels"])])
    dist.all_reduce(count)
    out = ift_loss(model, batch["input_ids"], batch["labels"], torch.ones_like(batch["input_ids"]), **kw)
    stub = SimpleNamespace(
        accelerator=SimpleNamespace(num_processes=world), args=SimpleNamespace(average_tokens_across_devices=True)
    )  # TrainingArguments' default
    loss = IFTTrainer.window_mean(stub, out.loss_sum, out.n_sequences, count[0])
    return (loss if out.aux_loss is None else loss + AUX_COEF * out.aux_loss), out


def reference_grads(ref: torch.nn.Module, batches: list[dict], kw: dict, autocast: bool = False) -> dict:
    """One process, whole batch: the plain mean over sequences with a trained token; for a MoE
    model plus the mean over the ranks' micro-batches of their router loss (what averaging the
    ranks' gradients gives: the router loss is a per-micro-batch mean)."""
    ref.zero_grad(set_to_none=True)
    batch = concat(batches)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = ift_loss(ref, batch["input_ids"], batch["labels"], torch.ones_like(batch["input_ids"]), **kw)
        loss = out.loss
        if out.aux_loss is not None:
            for part in batches:
                own = ift_loss(ref, part["input_ids"], part["labels"], torch.ones_like(part["input_ids"]), **kw)
                loss = loss + AUX_COEF * own.aux_loss / len(batches)
    loss.backward()
    return {n: grad_or_zeros(p, p.grad) for n, p in ref.named_parameters()}


def relative_errors(got: dict, expected: dict) -> dict:
    """||got - expected|| / ||expected|| per parameter (0 where both are zero)."""
    return {n: ((got[n] - e).norm() / e.norm().clamp_min(1e-30)).item() for n, e in expected.items()}


def grad_or_zeros(param: torch.nn.Parameter, grad: torch.Tensor | None) -> torch.Tensor:
    """The gradient in float32; zeros for a parameter the loss does not reach (the untied
    input table with intuition_embeddings='detached')."""
    if grad is None:
        return torch.zeros(tuple(getattr(param, "ds_shape", param.shape)))
    return grad.detach().float().clone()


# ---------------------------------------------------------------- the two wrappers


def fsdp2_model(model: torch.nn.Module, mixed_precision: str) -> tuple[torch.nn.Module, Callable, Callable]:
    """(model, full gradients, backward) in the layout accelerate 1.15 builds (`fsdp2_prepare_model`,
    called as is, with recipes/accelerate/fsdp.yaml's settings: transformer-based wrap, reshard
    after forward, CPU-RAM-efficient loading from rank 0): fully_shard per decoder layer, the
    input embedding, [final norm, LM head] (tied: with the embedding), the root."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        cpu_ram_efficient_loading=True,
        mixed_precision_policy=None if mixed_precision == "no" else mixed_precision,
    )
    if dist.get_rank() != 0:  # as with cpu_ram_efficient_loading, only rank 0 holds the real weights
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin),
        mixed_precision=mixed_precision,
        is_main_process=dist.get_rank() == 0,
        device=torch.device("cpu"),
    )
    wrapped = fsdp2_prepare_model(accelerator, model)

    def full_grads() -> dict:
        return {
            n: grad_or_zeros(p, None if p.grad is None else p.grad.full_tensor()) for n, p in wrapped.named_parameters()
        }

    return wrapped, full_grads, torch.Tensor.backward


def zero3_model(
    ref: torch.nn.Module, mixed_precision: str, workdir: Path
) -> tuple[torch.nn.Module, Callable, Callable]:
    """(engine, full gradients, backward): `deepspeed.initialize` at stage 3 of the reference
    weights loaded the way the HF Trainer loads them under ZeRO-3: `from_pretrained` with an
    `HfDeepSpeedConfig` alive, which builds the model inside `deepspeed.zero.Init` (parameters
    partitioned from construction)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    config = {
        "train_micro_batch_size_per_gpu": ROWS,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": mixed_precision == "bf16"},
    }
    if dist.get_rank() == 0:
        ref.save_pretrained(workdir / "ref")
    dist.barrier()
    keep = HfDeepSpeedConfig(config)  # noqa: F841  (transformers reads it through a weak reference)
    model = AutoModelForCausalLM.from_pretrained(workdir / "ref", dtype=torch.float32)
    assert all(p.numel() == 0 for p in model.parameters()), "parameters are not partitioned"
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)

    def full_grads() -> dict:
        return {n: grad_or_zeros(p, safe_get_full_grad(p)) for n, p in engine.module.named_parameters()}

    return engine, full_grads, engine.backward


# ---------------------------------------------------------------- main


def compare(got: dict, expected: dict, single_bf16: dict | None) -> dict:
    """How far the sharded gradients are from one fp32 process (and one bf16 process's own error)."""
    diffs = {n: (got[n] - e).abs().max().item() for n, e in expected.items()}
    rel = relative_errors(got, expected)
    single = relative_errors(single_bf16, expected) if single_bf16 is not None else {}
    return {
        "max_abs_diff": max(diffs.values()),
        "worst_param": max(diffs, key=diffs.get),
        "max_rel_diff": max(rel.values()),
        "worst_rel_param": max(rel, key=rel.get),
        "single_process_max_rel_diff": max(single.values(), default=0.0),
        "max_abs_grad": max(g.abs().max().item() for g in expected.values()),
        "grad_shapes_match": all(got[n].shape == e.shape for n, e in expected.items()),
    }


def rank_stats(out, world: int) -> dict:
    """Every rank's intuition accuracy, sequence and trained-token counts (what its batch was)."""
    stats = torch.tensor([float(out.intuition_accuracy), float(out.n_sequences), float(out.n_tokens)])
    every = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(every, stats)
    return {
        "intuition_accuracy": [e[0].item() for e in every],
        "n_sequences": [int(e[1]) for e in every],
        "n_tokens": [int(e[2]) for e in every],
    }


def main() -> None:
    args = parse_args()
    if args.backend == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=90))
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run with --nproc_per_node 2"
    torch.set_num_threads(1)
    vocab = len(build_tokenizer())

    make = tiny_moe if args.moe else build_model
    ref = make(vocab, seed=0, tie_word_embeddings=args.tied, initializer_range=args.init)
    ref.train()
    kw = loss_kwargs(args)
    plan = [(n, b) for n, b in steps(ref, vocab) if args.steps is None or n in args.steps]
    if args.backend == "fsdp2":
        model, full_grads, backward = fsdp2_model(copy.deepcopy(ref), args.mixed_precision)
    else:
        model, full_grads, backward = zero3_model(ref, args.mixed_precision, Path(args.out).parent)
    model.train()

    # accelerate adds autocast under FSDP (native AMP), not under DeepSpeed (bf16 weights instead).
    autocast = args.mixed_precision == "bf16" and args.backend == "fsdp2"
    # bf16's own error: one process on the whole batch in the same precision, against fp32.
    low = None
    if args.mixed_precision == "bf16":
        low = copy.deepcopy(ref).to(torch.float32 if autocast else torch.bfloat16)
    report = {"backend": args.backend, "world_size": world, "steps": []}
    for name, batches in plan:
        for p in model.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, out = window_loss(model, batches[rank], world, kw)
        backward(loss)
        expected = reference_grads(ref, batches, kw)
        single = reference_grads(low, batches, kw, autocast) if low is not None else None
        report["steps"].append({"name": name, **compare(full_grads(), expected, single), **rank_stats(out, world)})
        if args.backend == "zero3":
            model.optimizer.zero_grad()
    if rank == 0:
        Path(args.out).write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
