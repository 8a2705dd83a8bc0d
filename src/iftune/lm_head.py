"""The LM head applied chunk by chunk to hidden states, so that no (B, T, V) float32 tensor
is ever built. Pure torch: works with any module that maps hidden states to logits.

`head` is the model's output embedding module (it is called, so a bias, a LoRA adapter on the
head, or tied weights all apply). `scale` and `softcap` reproduce models that rescale or cap
their final logits (see `logit_transform`). Hidden states may have any leading shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Positions per chunk so that one chunk of float32 logits stays near 128 MiB.
_CHUNK_ELEMENTS = 1 << 25


def chunk_positions(vocab_size: int, chunk_elements: int = _CHUNK_ELEMENTS) -> int:
    """Positions per chunk so that one chunk of logits holds about `chunk_elements` values."""
    return max(1, chunk_elements // max(1, vocab_size))


# How each family rescales its LM head's output, as its forward in transformers does it:
# model_type -> (config field, power), the logits times `field ** power`. HyperCLOVA X multiplies
# by `logits_scaling` where Granite divides; MiniCPM3 divides the hidden states, the same through
# a linear head. A family missing here gets no scale, which `families.check_head_matches` catches.
LOGIT_SCALES: dict[str, tuple[str, int]] = {
    "cohere": ("logit_scale", 1),
    "cohere2": ("logit_scale", 1),
    "cohere2_moe": ("logit_scale", 1),
    "falcon_h1": ("lm_head_multiplier", 1),
    "granite": ("logits_scaling", -1),
    "granite_swa": ("logits_scaling", -1),
    "granitemoe": ("logits_scaling", -1),
    "granitemoe_swa": ("logits_scaling", -1),
    "granitemoehybrid": ("logits_scaling", -1),
    "granitemoeshared": ("logits_scaling", -1),
    "hyperclovax": ("logits_scaling", 1),
    "minicpm3": ("logits_scaling", -1),
    "muse_glimmer_text": ("output_multiplier", 1),
    "muse_spark_text": ("output_multiplier", 1),
}
# Vision-language models whose forward caps nothing although their text config has a
# `final_logit_softcapping` (Gemma3ForConditionalGeneration; Gemma3ForCausalLM caps).
UNCAPPED = frozenset({"gemma3"})


def logit_transform(config: object) -> tuple[float, float | None]:
    """(scale, softcap) that a model applies to its LM head's output, from its (text) config:
    the scale of `LOGIT_SCALES` for its model_type, then Gemma-style `final_logit_softcapping`
    (none for the models in `UNCAPPED`)."""
    outer = getattr(config, "model_type", "")
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    if (entry := LOGIT_SCALES.get(getattr(config, "model_type", ""))) is not None:
        name, power = entry
        scale = float(getattr(config, name)) ** power
    return scale, (None if outer in UNCAPPED else getattr(config, "final_logit_softcapping", None))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision logits, the logits' own dtype when wider (float64 tests)."""
    return torch.promote_types(dtype, torch.float32)


def _logits(forward: Callable, hidden: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    logits = forward(hidden)
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def head_call(head: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(forward, *args)` run as ONE call of the `head` module; `forward` is the head's own
    forward, to apply to each chunk without the module's hooks.

    Wrappers act through hooks on the head module: ZeRO-3 gathers its weight before the call,
    releases it after, and gathers it again before the backward of the call's output; FSDP
    unshards around it. Running the whole chunk loop inside one call makes the number of those
    collectives one per pass on every rank, whatever the number of positions (zero included).

    Why the forward is swapped for the call instead of using a library's gather: ZeRO-3's
    `GatheredParameters` gives the full weight outside a module call, but its backward neither
    re-gathers the weight nor routes the gradient to the partition (TRL uses it without grad
    only); FSDP2's `DTensor.full_tensor()` would serve FSDP2 alone. The module call is the one
    mechanism that every wrapper (ZeRO-3, FSDP2, PEFT's LoRA on the head, accelerate's device
    hooks) honours. The swap lasts one call, on the instance; a training step is single-threaded.
    """
    own = head.__dict__.get("forward")  # accelerate's device hooks set an instance forward
    forward = own if own is not None else type(head).forward.__get__(head)
    head.forward = lambda *a: fn(forward, *a)
    try:
        return head(*args)
    finally:
        if own is not None:
            head.forward = own
        else:
            del head.forward


def intuition_from_hidden(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    *,
    intuition: str = "greedy",
    k: int = 1,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    with_logp: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's choice of next token at every position, and the teacher-forced log-prob of
    `targets` (the next tokens; any id where -100), from (..., H) hidden states, without grad.

    Returns `(predictions (...) long, target_logp (...))`, log-probs in float32 or wider, or
    None without `with_logp` (the log-sum-exp over the vocabulary is most of the head's cost
    beyond its matmul). One call of `head` whatever the number of positions.
    """

    def run(forward, flat, tgt):
        n = tgt.numel()
        preds = torch.empty(n, dtype=torch.long, device=flat.device)
        logp = torch.empty(n, dtype=_acc_dtype(flat.dtype), device=flat.device)
        for sl in _chunks(n, chunk_size or chunk_positions(vocab_size(head))):
            logits = _logits(forward, flat[sl], scale, softcap)
            if intuition == "greedy" or (intuition == "rank" and k == 1):
                preds[sl] = logits.argmax(-1)
            elif intuition == "rank":
                preds[sl] = logits.topk(k, dim=-1).indices[:, -1]
            else:  # sample
                probs = torch.softmax(logits.to(logp.dtype) / temperature, dim=-1)
                preds[sl] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            if with_logp:
                logits = logits.to(logp.dtype)
                logp[sl] = logits.gather(-1, tgt[sl, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return preds, logp

    shape, n = targets.shape, targets.numel()
    with torch.no_grad():
        preds, logp = head_call(head, run, hidden.reshape(n, hidden.shape[-1]), targets.reshape(n).clamp_min(0))
    return preds.view(shape), (logp.view(shape) if with_logp else None)


def _token_logp(
    forward: Callable, hidden: torch.Tensor, targets: torch.Tensor, scale: float, softcap: float | None
) -> torch.Tensor:
    logits = _logits(forward, hidden, scale, softcap)
    logits = logits.to(_acc_dtype(logits.dtype))
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """What autocast would give a matmul operand: float32 tensors in the autocast dtype."""
    return t if t is None or dtype is None or t.dtype != torch.float32 else t.to(dtype)


class _LinearChunkLogProb(torch.autograd.Function):
    """log p(target) through a plain linear head, storing only the log-sum-exp: the backward
    recomputes the chunk's logits once, `d logit = g * (onehot - softmax)`, and applies the
    two matmuls itself (checkpointing would recompute the log-sum-exp and its graph too).
    `dtype` is the autocast dtype of the forward (None: none), which the backward reuses."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, dtype=None):
        logits = nn.functional.linear(_cast(hidden, dtype), _cast(weight, dtype), _cast(bias, dtype))
        logits = logits.to(_acc_dtype(logits.dtype)) * scale
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.scale, ctx.dtype = scale, dtype
        return logits.gather(-1, targets[:, None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        h, w = _cast(hidden, ctx.dtype), _cast(weight, ctx.dtype)
        logits = nn.functional.linear(h, w, _cast(bias, ctx.dtype))
        logits = logits.to(_acc_dtype(logits.dtype)) * ctx.scale
        dlogits = torch.exp(logits.sub_(lse[:, None])).mul_(-grad[:, None])
        dlogits.scatter_add_(-1, targets[:, None], grad[:, None].to(dlogits.dtype))
        dz = (dlogits * ctx.scale).to(w.dtype)
        grad_hidden = (dz @ w).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (dz.T @ h.to(w.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = dz.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _fused_chunks_ok(head: nn.Module, softcap: float | None) -> bool:
    """The hand-written backward covers a plain nn.Linear head without softcap; anything else
    (LoRA on the head, a sharded weight type) is checkpointed chunk by chunk."""
    return type(head) is nn.Linear and not softcap and type(head.weight) is nn.Parameter


def token_logprobs(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    *,
    scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log p(targets | hidden) per position, shaped like `targets`, float32 (or wider), with gradient.

    Each chunk's logits are recomputed in the backward pass instead of being stored, which
    keeps peak memory at one chunk of logits; `chunk_size=None` picks ~128 MiB chunks. One
    call of `head` whatever the number of positions, under the caller's autocast.
    """

    def run(forward, flat, tgt):
        n = tgt.numel()
        size = chunk_size or chunk_positions(vocab_size(head))
        if n <= size:
            # One chunk: its stored logits are within the chunk budget, so skip the recompute.
            return _token_logp(forward, flat, tgt, scale, softcap)
        if not torch.is_grad_enabled():
            parts = [_token_logp(forward, flat[sl], tgt[sl], scale, softcap) for sl in _chunks(n, size)]
        elif _fused_chunks_ok(head, softcap):
            dtype = _autocast_dtype(flat.device)
            parts = [
                _LinearChunkLogProb.apply(flat[sl], head.weight, head.bias, tgt[sl], float(scale), dtype)
                for sl in _chunks(n, size)
            ]
        else:
            parts = [
                checkpoint(_token_logp, forward, flat[sl], tgt[sl], scale, softcap, use_reentrant=False)
                for sl in _chunks(n, size)
            ]
        return torch.cat(parts)

    shape, n = targets.shape, targets.numel()
    return head_call(head, run, hidden.reshape(n, hidden.shape[-1]), targets.reshape(n).clamp_min(0)).view(shape)


def vocab_size(head: nn.Module) -> int:
    """Output size of the LM head; under ZeRO-3 the partitioned weight's full shape (`ds_shape`)."""
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(getattr(weight, "ds_shape", weight.shape)[0])
    size = getattr(head, "out_features", None)
    if size is None:
        raise ValueError(
            f"LM head {type(head).__name__}: no `weight` or `out_features` to read the vocabulary size from; "
            f"give the chunk size (head_chunk_size)"
        )
    return int(size)


__all__ = ["chunk_positions", "head_call", "intuition_from_hidden", "logit_transform", "token_logprobs", "vocab_size"]
