"""Model plumbing shared by the IFT objective and the same-path baselines: which positions are
trained, one forward to the final hidden state, the LM head at trained positions, and the
regrouping of packed rows into documents. Pure torch; no Hugging Face import.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from iftune.lm_head import logit_transform, token_logprobs

IGNORE_INDEX = -100
# Forward keywords a padding-free collator adds (flash-attention varlen): passed on as they are.
FORWARD_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def trained_targets(
    labels: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, mask), both (B, T-1): the next token at each position and whether it is
    trained. With packing, a document's first token is never predicted from the previous one."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    if position_ids is not None:
        mask &= position_ids.expand_as(labels)[:, 1:] != 0
    return targets, mask


def trained_logprobs(
    model: nn.Module,
    targets: torch.Tensor,
    mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    head_chunk_size: int | None = None,
    head_logits_budget_mb: float | None = None,
    **inputs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(targets) where `mask`, 0 elsewhere, (B, T-1); the model's MoE router aux loss or
    None), from one forward with gradient on `inputs` (`input_ids` or `inputs_embeds`, plus extra
    forward keywords): the LM head runs at the trained positions only, in one call of the head
    module whatever their number, in chunks of `head_chunk_size` positions, keeping up to
    `head_logits_budget_mb` MiB of their logits for the backward (`lm_head.token_logprobs`; None:
    the defaults)."""
    base = unwrap_model(model)
    scale, softcap = logit_transform(base.config)
    with record_function("ift.training_forward"):
        hidden, outputs = forward_hidden(model, attention_mask, position_ids, **inputs)
    with record_function("ift.training_head"):
        picked = token_logprobs(
            hidden[:, :-1][mask],
            base.get_output_embeddings(),
            targets[mask],
            scale=scale,
            softcap=softcap,
            chunk_size=head_chunk_size,
            logits_budget_mb=head_logits_budget_mb,
        )
    return picked.new_zeros(mask.shape).masked_scatter(mask, picked), getattr(outputs, "aux_loss", None)


def per_document(mask: torch.Tensor, position_ids: torch.Tensor | None, *values: torch.Tensor):
    """Regroup (B, T-1) per-target values so that each row is one document.

    Without `position_ids` the rows already are documents. With packing, target t+1 belongs to
    the document that starts at the last `position_ids == 0` at or before t+1.
    """
    if position_ids is None:
        return (*values[:1], mask, *values[1:])
    doc, n_docs = target_documents(position_ids)
    offset = (position_ids[:, 1:] - 1).clamp_min(0)
    width = int(offset[mask].max()) + 1 if mask.any() else 1
    d, o = doc[mask], offset[mask]
    regroup = [v.new_zeros(n_docs, width).index_put((d, o), v[mask]) for v in values]
    mask_d = mask.new_zeros(n_docs, width).index_put((d, o), torch.ones_like(d, dtype=torch.bool))
    return (regroup[0], mask_d, *regroup[1:])


def target_documents(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Document index of each target position t+1 (B, T-1), and the number of documents."""
    starts = position_ids == 0
    starts[:, 0] = True
    doc = starts.reshape(-1).cumsum(0).view_as(position_ids) - 1
    return doc[:, 1:], int(doc[-1, -1]) + 1


def sequence_count(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> int:
    """Sequences with at least one trained target: the denominator of the IFT loss (step 6)."""
    _, mask = trained_targets(labels, position_ids)
    if position_ids is None:
        return int(mask.any(-1).sum())
    doc, _ = target_documents(position_ids.expand_as(labels))
    return int(doc[mask].unique().numel())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying Hugging Face model: strips DDP/FSDP-style `.module` and PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def forward_hidden(
    model: nn.Module,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **inputs: Any,
) -> tuple[torch.Tensor, Any]:
    """(B, T, H) final (normed) hidden states from one call of the model's own forward, and that
    call's output (its `aux_loss`, for mixture-of-experts models that return router logits).

    Through the (wrapped) forward, so that DDP, FSDP, PEFT, accelerate's autocast and gradient
    checkpointing all act as in any training step. The body's output is taken by a hook on the
    base transformer, which keeps neither every layer's hidden states nor accelerate's float32
    copies of them; the model's own LM head runs on one position only. `inputs` holds
    `input_ids` or `inputs_embeds`, plus any extra forward keyword from the collator.
    """
    base = unwrap_model(model)
    kwargs = dict(inputs, attention_mask=attention_mask, use_cache=False)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if accepts(base, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    body = getattr(base, "base_model", base)
    if body is base:  # no separate body to hook: every layer's hidden states it is
        outputs = model(**kwargs, output_hidden_states=True)
        return outputs.hidden_states[-1], outputs
    seen: list[torch.Tensor] = []
    handle = body.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    try:
        outputs = model(**kwargs)
    finally:
        handle.remove()
    return seen[0], outputs


@contextmanager
def intuition_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, as at inference) for the intuition pass, then the model's own mode.

    bitsandbytes' 4-bit layers stay in train mode: on a CPU, their first eval-mode no-grad call
    repacks the weight into a layout they cannot backpropagate through afterwards, which would
    leave every later training pass without gradient.
    """
    training = model.training
    model.eval()
    for module in model.modules():
        if type(module).__module__.startswith("bitsandbytes"):
            module.training = training
    try:
        yield
    finally:
        model.train(training)


def accepts(module: nn.Module, name: str) -> bool:
    """Whether `module.forward` takes a keyword `name`."""
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


__all__ = [
    "FORWARD_KEYS",
    "IGNORE_INDEX",
    "forward_hidden",
    "intuition_mode",
    "per_document",
    "sequence_count",
    "target_documents",
    "trained_logprobs",
    "trained_targets",
    "unwrap_model",
]
