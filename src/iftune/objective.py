"""The Intuitive Fine-Tuning objective (Hua et al., section 4, eq. 17-22), in pure torch.

`shared/ift-spec.md` is the contract this module implements; the step numbers in the
comments refer to it. Nothing here imports Hugging Face: `ift_loss` only needs a causal LM
with the usual interface (`get_input_embeddings`, `get_output_embeddings`, a forward that
takes `inputs_embeds` and returns `hidden_states`), plain, PEFT-wrapped or DDP-wrapped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from iftune.errors import UserError
from iftune.lm_head import intuition_from_hidden, logit_transform
from iftune.modeling import (
    IGNORE_INDEX,
    hidden_states,
    per_document,
    trained_logprobs,
    trained_targets,
    unwrap_model,
)

PROPAGATIONS = ("loss", "logps", "mask")
SIDES = ("left", "right")
NORMS = ("L1", "L2", "softmax", "log")
INTUITIONS = ("greedy", "rank", "sample")

# Value given to untrained positions on the "right" side before inversion (reference code).
_RIGHT_FILL = 1e6


def check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(f"{name}={value!r} is not valid; expected one of {', '.join(map(repr, allowed))}")


def check_unit(name: str, value: float) -> None:
    v = float(value)
    if not (0.0 <= v <= 1.0) or math.isnan(v):
        raise UserError(f"{name}={value!r} is out of range; expected a number in [0, 1]")


def check_relation_options(gamma: float, propagation: str, side: str, norm: str) -> None:
    check_unit("gamma", gamma)
    check_choice("propagation", propagation, PROPAGATIONS)
    check_choice("side", side, SIDES)
    check_choice("norm", norm, NORMS)


# --------------------------------------------------------------------------- discounting


def discounted_cumsum(x: torch.Tensor, gamma: float, reverse: bool = False) -> torch.Tensor:
    """`y_t = sum_{s<=t} gamma^(t-s) x_s` along the last axis (`reverse`: `sum_{s>=t} gamma^(s-t) x_s`).

    Vectorized and differentiable: the axis is cut into ~sqrt(T) blocks; a block's own sums are
    one matmul with a (C, C) decay matrix, and the carries between blocks another with a
    (T/C, T/C) one. No power of 1/gamma is ever formed, so it stays exact for any gamma in [0, 1].
    """
    check_unit("gamma", gamma)
    if reverse:
        return discounted_cumsum(x.flip(-1), gamma).flip(-1)
    t = x.shape[-1]
    if t == 0:
        return x.clone()
    c = max(1, math.isqrt(t - 1) + 1)  # block length, ceil(sqrt(T))
    n = -(-t // c)
    xc = nn.functional.pad(x, (0, n * c - t)).reshape(*x.shape[:-1], n, c)
    local = xc @ _decay_matrix(gamma, c, 1, x).T  # sums inside each block
    ends = local[..., -1] @ _decay_matrix(gamma, n, c, x).T  # y at each block's last position
    carry = nn.functional.pad(ends[..., :-1], (1, 0))  # y at the previous block's end
    pows = torch.pow(torch.tensor(float(gamma), dtype=torch.float64), torch.arange(1, c + 1, dtype=torch.float64))
    y = local + carry[..., None] * pows.to(dtype=x.dtype, device=x.device)
    return y.reshape(*x.shape[:-1], n * c)[..., :t]


def _decay_matrix(gamma: float, size: int, stride: int, like: torch.Tensor) -> torch.Tensor:
    """M[i, j] = gamma^(stride * (i - j)) for i >= j, else 0 (computed in float64)."""
    i = torch.arange(size, dtype=torch.float64)
    diff = i[:, None] - i[None, :]
    g = torch.tensor(float(gamma), dtype=torch.float64)
    m = torch.where(diff >= 0, torch.pow(g, diff.clamp_min(0) * stride), torch.zeros(()))
    return m.to(dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------- eq. 19-22


def relation_weights(
    logps: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 0.95,
    propagation: str = "loss",
    side: str = "left",
    norm: str = "L1",
    detach: bool = False,
) -> torch.Tensor:
    """Dynamic relation propagation (eq. 19-22): one weight per trained token, (B, T).

    Each row's weights are zero where `mask` is 0 and sum to the row's token count n_b, so a
    weighted per-sequence mean stays on the scale of SFT's. `gamma == 0` gives plain SFT weights.
    """
    check_relation_options(gamma, propagation, side, norm)
    m = mask.to(logps.dtype)
    n = m.sum(-1, keepdim=True)
    if float(gamma) == 0.0:
        return m.clone()
    lp = logps.detach() if detach else logps
    if propagation == "mask":
        item = m
    elif propagation == "loss":
        item = -lp / n.clamp_min(1)
    else:
        item = -lp
    item = torch.where(m > 0, item, torch.zeros_like(item))
    if side == "left":
        w = discounted_cumsum(item, gamma, reverse=True) * m
        w = {"L1": lambda v: v, "L2": torch.square, "softmax": lambda v: torch.softmax(v, -1),
             "log": torch.log1p}[norm](w)
    else:
        w = discounted_cumsum(item, gamma)
        w = torch.where(m > 0, w, torch.full_like(w, _RIGHT_FILL))
        nonzero = torch.where(w != 0, w, torch.full_like(w, math.inf)).min()
        w = w + torch.where(torch.isfinite(nonzero), nonzero, torch.zeros_like(nonzero))
        w = {"L1": torch.reciprocal, "L2": lambda v: v.square().reciprocal(),
             "softmax": lambda v: torch.softmax(v.reciprocal(), -1),
             "log": lambda v: torch.log1p(v).reciprocal()}[norm](w)
    w = w * m
    total = w.sum(-1, keepdim=True)
    # A row whose weights all vanish (e.g. every log-prob is exactly 0) falls back to uniform.
    ok = total > 0
    return torch.where(ok, w * n / torch.where(ok, total, torch.ones_like(total)), m)


# --------------------------------------------------------------------------- eq. 17


def intuitive_tokens(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    predictions: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step 2: at each trained position t, the token the model predicted from position t-1.

    `predictions[b, t]` is the model's choice for token t+1. Untrained positions (labels -100),
    the first position and, with packed sequences, each document's first token keep their id.
    """
    further = input_ids.clone()
    further[:, 1:] = predictions[:, :-1].to(input_ids.dtype)
    keep = labels == IGNORE_INDEX
    keep[:, 0] = True
    if position_ids is not None:
        keep |= position_ids == 0
    return torch.where(keep, input_ids, further)


def mix_embeddings(embeds: torch.Tensor, intuitive_embeds: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Temporal residual connection, eq. 17: `(1 - lam) * E[s_i] + lam * E[pi(s_{i-1})]`."""
    if not torch.is_tensor(lam):
        check_unit("lam", lam)
    return (1 - lam) * embeds + lam * intuitive_embeds


# --------------------------------------------------------------------------- the loss


@dataclass
class IFTOutput:
    """What one IFT step computes. `loss` carries the gradient; the rest are detached metrics.

    `loss_sum` (sum of per-sequence losses) and `n_sequences` let a trainer divide by the
    number of sequences of a whole accumulation window instead of one micro-batch.
    """

    loss: torch.Tensor
    sft_loss: torch.Tensor
    intuitive_nll: torch.Tensor
    intuition_accuracy: torch.Tensor
    n_tokens: torch.Tensor
    loss_sum: torch.Tensor
    n_sequences: torch.Tensor


def ift_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    lam: float | torch.Tensor = 0.2,
    gamma: float = 0.95,
    propagation: str = "loss",
    side: str = "left",
    norm: str = "L1",
    intuition: str = "greedy",
    detach_weights: bool = False,
    position_ids: torch.Tensor | None = None,
    intuition_k: int = 1,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    embeddings: nn.Module | None = None,
    chunk_size: int | None = None,
    train_logprobs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    with_sft_loss: bool = True,
) -> IFTOutput:
    """One IFT step (spec steps 1-6): a no-grad intuition pass, then a training pass on the
    mixed embeddings, weighted by relation propagation.

    `labels` are unshifted (-100 = not trained). `embeddings` overrides the table E used for
    mixing (the reference's frozen copy); by default it is the model's live input embedding.
    `chunk_size` bounds the positions whose logits exist at once (default: ~128 MiB of them).
    `train_logprobs(inputs_embeds, labels)`, if given, replaces iftune's head in the training
    pass: it must return log p(labels[:, t+1]) as (B, T-1), e.g. TRL's fused LM head.
    `with_sft_loss=False` skips the teacher-forced NLL of the intuition pass (`sft_loss` is
    then NaN): on a CPU its log-sum-exp over the vocabulary is a few percent of a step.
    """
    if not torch.is_tensor(lam):
        check_unit("lam", lam)
    check_relation_options(gamma, propagation, side, norm)
    check_choice("intuition", intuition, INTUITIONS)
    if intuition == "rank" and int(intuition_k) < 1:
        raise UserError(f"intuition_k={intuition_k!r} is not valid; expected an integer >= 1")
    if intuition == "sample" and not float(temperature) > 0:
        raise UserError(f"temperature={temperature!r} is not valid; expected a number > 0")

    if position_ids is not None:
        # Hugging Face takes (1, T) position ids for a whole batch; the per-row logic needs (B, T).
        position_ids = position_ids.expand_as(input_ids)
        if attention_mask is not None and ((position_ids[:, 1:] == 0) & (attention_mask[:, 1:] != 0)).any():
            # Transformers separates packed documents only when no attention mask is given.
            raise UserError("attention_mask must be None for packed rows (position_ids restarting at 0): "
                            "with a mask the model attends across documents")
    base = unwrap_model(model)
    head = base.get_output_embeddings()
    table = embeddings if embeddings is not None else base.get_input_embeddings()
    targets, mask = trained_targets(labels, position_ids)
    # The head runs only where a target is trained: prompts and padding cost no logits.
    scale, softcap = logit_transform(base.config)
    head_kw = dict(scale=scale, softcap=softcap, chunk_size=chunk_size)

    # Step 1: intuition pass, no graph kept, in eval mode (no dropout) like inference. Not
    # inference_mode: models that cache tensors on first use (rotary tables) would hand
    # inference tensors to the training pass.
    training = model.training
    with torch.no_grad():
        model.eval()
        try:
            hidden = hidden_states(model, base, attention_mask, position_ids, input_ids=input_ids)
        finally:
            model.train(training)
        picked, tf_picked = intuition_from_hidden(
            hidden[:, :-1][mask], head, targets[mask], intuition=intuition, k=int(intuition_k),
            temperature=float(temperature), generator=generator, with_logp=with_sft_loss, **head_kw)
        del hidden
        preds = torch.zeros_like(input_ids).masked_scatter(nn.functional.pad(mask, (0, 1)), picked)
    # Steps 2-3: intuitive tokens and the temporal residual connection.
    further = intuitive_tokens(input_ids, labels, preds, position_ids)
    x = _mixed_inputs(table, input_ids, further, lam)
    # Step 4: training pass.
    if train_logprobs is None:
        logp = trained_logprobs(model, targets, mask, attention_mask, position_ids, chunk_size=chunk_size,
                                inputs_embeds=x)
    else:
        trained = torch.cat([labels[:, :1], torch.where(mask, targets, IGNORE_INDEX)], dim=1)
        logp = train_logprobs(x, trained)
        logp = torch.where(mask, logp, torch.zeros_like(logp))
    tf_logp = torch.zeros_like(logp)
    if tf_picked is not None:
        tf_logp = tf_logp.masked_scatter(mask, tf_picked.to(logp.dtype))

    # Steps 5-6, per document: rows of a padded batch, or the documents of packed rows.
    logp_d, mask_d, tf_d = per_document(mask, position_ids, logp, tf_logp)
    w = relation_weights(logp_d, mask_d, gamma, propagation, side, norm, detach=detach_weights)
    n = mask_d.sum(-1)
    n_seq = (n > 0).sum()  # sequences without a trained token add 0 and are not counted
    denom = n.clamp_min(1).to(logp.dtype)
    per_seq = (-(logp_d * w)).sum(-1) / denom
    loss_sum = per_seq.sum()
    loss = loss_sum / n_seq.clamp_min(1)
    with torch.no_grad():
        sft = ((-tf_d * mask_d).sum(-1) / denom).sum() / n_seq.clamp_min(1)
        if tf_picked is None:
            sft = torch.full_like(sft, math.nan)
        nll = ((-logp_d.detach()).sum(-1) / denom).sum() / n_seq.clamp_min(1)
        n_tok = mask.sum()
        hits = (picked == targets[mask]).sum()
        acc = hits.to(torch.float32) / n_tok.clamp_min(1)
    return IFTOutput(loss=loss, sft_loss=sft, intuitive_nll=nll, intuition_accuracy=acc,
                     n_tokens=n_tok, loss_sum=loss_sum, n_sequences=n_seq)


def _mixed_inputs(table: nn.Module, input_ids: torch.Tensor, further: torch.Tensor,
                  lam: float | torch.Tensor) -> torch.Tensor:
    """Eq. 17, looking up E[further] only where it differs from the input token (elsewhere the
    mix is E[input] itself): one embedding lookup of the whole batch instead of two."""
    embeds = table(input_ids)
    where = (further != input_ids).nonzero(as_tuple=True)
    if where[0].numel() == 0:
        return embeds
    return embeds.index_put(where, mix_embeddings(embeds[where], table(further[where]), lam))


__all__ = [
    "IFTOutput",
    "discounted_cumsum",
    "ift_loss",
    "intuitive_tokens",
    "mix_embeddings",
    "relation_weights",
]
