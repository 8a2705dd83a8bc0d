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
# Logits per block of the elementwise work on a chunk: 8 MiB of float32, which stays in cache.
_BLOCK_ELEMENTS = 1 << 21
# MiB of logits the training pass may keep for its backward instead of recomputing them. 512 keeps
# every trained position of one 1k-token Qwen2.5 sequence (V = 151,936: 445 MiB) and about a
# quarter of a batch of four, where IFT's activation memory then stays under a third of
# full-logits IFT's (`iftune bench --preset qwen2.5-0.5b --batch 4`).
DEFAULT_LOGITS_BUDGET_MB = 512.0


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


def budget_positions(budget_mb: float | None, vocab_size: int, element_size: int = 4) -> int:
    """Positions whose logits (`element_size` bytes each) fit `budget_mb` MiB (None: the default)."""
    budget = DEFAULT_LOGITS_BUDGET_MB if budget_mb is None else budget_mb
    return int(budget * 2**20 // (max(1, vocab_size) * element_size))


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
    logits_budget_mb: float | None = None,
    with_logp: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's choice of next token at every position, and the teacher-forced log-prob of
    `targets` (the next tokens; any id where -100), from (..., H) hidden states, without grad.

    Returns `(predictions (...) long, target_logp (...))`, log-probs in float32 or wider, or
    None without `with_logp` (the log-sum-exp over the vocabulary is most of the head's cost
    beyond its matmul). One call of `head` whatever the number of positions. Without
    `chunk_size`, a chunk is ~128 MiB of float32 logits or `logits_budget_mb` (None: the
    default budget), whichever is larger: nothing is kept, so the training pass's budget is free here.
    """

    def run(forward, flat, tgt):
        n = tgt.numel()
        preds = torch.empty(n, dtype=torch.long, device=flat.device)
        logp = torch.empty(n, dtype=_acc_dtype(flat.dtype), device=flat.device)
        if chunk_size is None:
            vocab = vocab_size(head)
            size = max(chunk_positions(vocab), budget_positions(logits_budget_mb, vocab))
        else:
            size = chunk_size
        greedy = intuition == "greedy" or (intuition == "rank" and k == 1)
        for sl in _chunks(n, size):
            logits = _logits(forward, flat[sl], scale, softcap)
            if intuition == "rank" and not greedy:
                preds[sl] = logits.topk(k, dim=-1).indices[:, -1]
            elif intuition == "sample":
                probs = torch.softmax(logits.to(logp.dtype) / temperature, dim=-1)
                preds[sl] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            if not (greedy or with_logp):
                continue
            # A block widened once serves the argmax (CPU argmax over bf16 is several times slower
            # than over float32; widening is exact, so the first maximum is the same) and the metric.
            for r in _row_blocks(sl.stop - sl.start, logits.shape[-1]):
                at = slice(sl.start + r.start, sl.start + r.stop)
                block = logits[r].to(logp.dtype)
                if greedy:
                    preds[at] = block.argmax(-1)
                if with_logp:
                    logp[at] = block.gather(-1, tgt[at, None]).squeeze(-1) - torch.logsumexp(block, dim=-1)
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


def _linear_into(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """`nn.functional.linear(h, w, b)` (the same addmm or mm) written into `out`."""
    return torch.addmm(b, h, w.T, out=out) if b is not None else torch.mm(h, w.T, out=out)


def _block_rows(n: int, vocab: int) -> int:
    """Rows (at most `n`) whose logits fill about `_BLOCK_ELEMENTS`: the elementwise work on a block stays in cache."""
    return min(n, max(1, _BLOCK_ELEMENTS // max(1, vocab)))


def _row_blocks(n: int, vocab: int):
    """Slices of `n` rows, `_block_rows` at a time."""
    return _chunks(n, max(1, _block_rows(n, vocab)))


def _widened(raw: torch.Tensor, scale: float, buffer: torch.Tensor) -> torch.Tensor:
    """`raw.to(buffer.dtype) * scale`, the same values, written into the first rows of `buffer`."""
    wide = buffer[: raw.shape[0]].copy_(raw)
    return wide.mul_(scale) if scale != 1.0 else wide


def _add_widened(total: torch.Tensor, part: torch.Tensor) -> None:
    """`total += part` for a narrower `part`, a block of rows at a time: the widened copy that the
    mixed-dtype add would make of all of `part` is one block, reused."""
    n, width = part.shape[0], part[0].numel()
    block = part.new_empty(_block_rows(n, width), *part.shape[1:], dtype=total.dtype)
    for sl in _row_blocks(n, width):
        total[sl] += block[: sl.stop - sl.start].copy_(part[sl])


class _LinearChunkLogProb(torch.autograd.Function):
    """log p(target) through a plain linear head, chunk by chunk (`chunk` positions; None: one
    chunk), storing only the log-sum-exp: the backward recomputes a chunk's logits once,
    `d logit = g * (onehot - softmax)`, and applies the two matmuls itself (checkpointing would
    recompute the log-sum-exp and its graph too). The chunks within the first `kept` positions
    keep their logits (the head's output dtype) for the backward instead: the same values
    without the recomputing matmul. `dtype` is the autocast dtype of the forward (None: none),
    which the backward reuses. The weight's gradient is accumulated over the chunks in place.

    Memory traffic, not arithmetic, is what the elementwise work costs: each pass allocates its
    chunk-sized tensors once and reuses them (on a CPU a fresh one is a page fault per page), and
    widens, reduces and differentiates a chunk's logits a cache-sized block of rows at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, dtype=None, chunk=None, kept=0):
        n, vocab = hidden.shape[0], weight.shape[0]
        w, b = _cast(weight, dtype), _cast(bias, dtype)
        acc = _acc_dtype(w.dtype)
        out, lses = hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc)
        wide = w.new_empty(_block_rows(n, vocab), vocab, dtype=acc)  # a block of logits widened
        spare = None  # a recomputed chunk's logits (none while every chunk is kept)
        keep = []
        for sl in _chunks(n, chunk or max(1, n)):
            h = _cast(hidden[sl], dtype)
            if sl.stop <= kept:
                raw = nn.functional.linear(h, w, b)
                keep.append(raw)
            else:
                spare = w.new_empty(sl.stop - sl.start, vocab) if spare is None else spare
                raw = _linear_into(h, w, b, spare[: sl.stop - sl.start])
            as_is = raw.dtype == acc and scale == 1.0  # only read here
            for r in _row_blocks(raw.shape[0], vocab):
                at = slice(sl.start + r.start, sl.start + r.stop)
                logits = raw[r] if as_is else _widened(raw[r], scale, wide)
                lses[at] = torch.logsumexp(logits, dim=-1)
                out[at] = logits.gather(-1, targets[at, None]).squeeze(-1) - lses[at]
        ctx.save_for_backward(hidden, weight, bias, targets, lses, *keep)
        ctx.scale, ctx.dtype, ctx.chunk = scale, dtype, chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lses, *keep = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w, b = _cast(weight, ctx.dtype), _cast(bias, ctx.dtype)
        n, vocab, scale = hidden.shape[0], weight.shape[0], ctx.scale
        acc = _acc_dtype(w.dtype)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = grad_bias = None
        rows = min(n, ctx.chunk or n)
        spare = w.new_empty(rows, vocab)  # a chunk's recomputed logits, then its dz
        wide = w.new_empty(_block_rows(rows, vocab), vocab, dtype=acc)  # a block of logits widened
        product = None  # a half-precision dz.T @ h
        for i, sl in enumerate(_chunks(n, ctx.chunk or max(1, n))):
            h = _cast(hidden[sl], ctx.dtype)
            dz = spare[: sl.stop - sl.start]
            raw = keep[i] if i < len(keep) else _linear_into(h, w, b, dz)
            in_place = raw is dz and raw.dtype == acc  # our own float32 buffer; a kept tensor stays intact
            for r in _row_blocks(raw.shape[0], vocab):
                at = slice(sl.start + r.start, sl.start + r.stop)
                logits = raw[r] if in_place else _widened(raw[r], 1.0, wide)
                if scale != 1.0:
                    logits.mul_(scale)
                dlogits = logits.sub_(lses[at, None]).exp_().mul_(-grad[at, None])
                dlogits.scatter_add_(-1, targets[at, None], grad[at, None].to(dlogits.dtype))
                if scale != 1.0:
                    dlogits.mul_(scale)
                if not in_place:
                    dz[r] = dlogits  # rows of raw already read when raw is dz
            if need_h:
                grad_hidden[sl] = dz @ w
            if need_w:
                h = h.to(w.dtype)
                if grad_weight is not None and grad_weight.dtype == dz.dtype:
                    grad_weight.addmm_(dz.T, h)  # no (V, H) temporary per chunk
                elif grad_weight is None and weight.dtype == dz.dtype:
                    grad_weight = dz.T @ h
                else:  # half-precision products, each rounded, summed in the weight's dtype
                    product = torch.mm(dz.T, h, out=product)
                    if grad_weight is None:
                        grad_weight = product.to(weight.dtype)
                    else:
                        _add_widened(grad_weight, product)
            if bias is not None and need_b:
                part = dz.sum(0)
                grad_bias = part.to(bias.dtype) if grad_bias is None else grad_bias.add_(part)
        if need_w and grad_weight is None:
            grad_weight = torch.zeros_like(weight)
        if need_b and bias is not None and grad_bias is None:
            grad_bias = torch.zeros_like(bias)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


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
    logits_budget_mb: float | None = None,
) -> torch.Tensor:
    """log p(targets | hidden) per position, shaped like `targets`, float32 (or wider), with gradient.

    The head runs chunk by chunk (`chunk_size` positions; None: ~128 MiB of float32 logits).
    The chunks whose logits fit `logits_budget_mb` MiB (None: `DEFAULT_LOGITS_BUDGET_MB`; 0:
    none) keep them for the backward; the others recompute them there instead of storing them,
    which bounds peak memory by the budget plus one chunk of logits. The gradients are the same
    either way. One call of `head` whatever the number of positions, under the caller's
    autocast. A head other than a plain `nn.Linear` (LoRA on the head) or a soft-capped one is
    checkpointed chunk by chunk and keeps nothing.
    """

    def run(forward, flat, tgt):
        n = tgt.numel()
        size = chunk_size or chunk_positions(vocab_size(head))  # a given chunk size needs no vocabulary
        if n <= size:
            # One chunk: its stored logits are within the chunk budget, so skip the recompute.
            return _token_logp(forward, flat, tgt, scale, softcap)
        if not torch.is_grad_enabled():
            parts = [_token_logp(forward, flat[sl], tgt[sl], scale, softcap) for sl in _chunks(n, size)]
        elif _fused_chunks_ok(head, softcap):
            dtype = _autocast_dtype(flat.device)
            out_dtype = dtype or torch.promote_types(flat.dtype, head.weight.dtype)
            kept = budget_positions(logits_budget_mb, vocab_size(head), out_dtype.itemsize)
            return _LinearChunkLogProb.apply(flat, head.weight, head.bias, tgt, float(scale), dtype, size, kept)
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


__all__ = [
    "DEFAULT_LOGITS_BUDGET_MB",
    "budget_positions",
    "chunk_positions",
    "head_call",
    "intuition_from_hidden",
    "logit_transform",
    "token_logprobs",
    "vocab_size",
]
