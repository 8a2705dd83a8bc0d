"""The Intuitive Fine-Tuning objective (Hua et al., section 4, eq. 17-22), in pure torch, in
the paper's order: the temporal residual connection (eq. 17), dynamic relation propagation
(eq. 19-22), then the loss of one step. `docs/objective.md` is the contract this module
implements; its steps 1-6 are the numbered comments in `ift_loss`.

Nothing here imports Hugging Face: `ift_loss` needs a causal LM with the usual interface
(`get_input_embeddings`, `get_output_embeddings`, a forward that takes `inputs_embeds`),
plain, PEFT-wrapped, DDP/FSDP2-wrapped or partitioned by DeepSpeed ZeRO-3. Every rank makes
the same calls of the embedding and head modules whatever its data, which sharded wrappers
need (each call is a collective there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from iftune.errors import UserError, check_choice, check_unit
from iftune.lm_head import intuition_from_hidden, logit_transform, vocab_size
from iftune.modeling import (
    FORWARD_KEYS,
    IGNORE_INDEX,
    hidden_states,
    intuition_mode,
    per_document,
    trained_logprobs,
    trained_targets,
    unwrap_model,
)

PROPAGATIONS = ("loss", "logps", "mask")
SIDES = ("left", "right")
NORMS = ("L1", "L2", "softmax", "log")
INTUITIONS = ("greedy", "rank", "sample")
EMBEDDINGS = ("live", "detached")

# Value given to untrained positions on the "right" side before inversion (reference code).
_RIGHT_FILL = 1e6


def check_relation_options(gamma: float, propagation: str, side: str, norm: str) -> None:
    """Raise `UserError` naming the first option of eq. 19-22 that is out of range."""
    check_unit("gamma", gamma)
    check_choice("propagation", propagation, PROPAGATIONS)
    check_choice("side", side, SIDES)
    check_choice("norm", norm, NORMS)


def check_intuition_options(
    intuition: str, intuition_k: int, intuition_temperature: float, intuition_embeddings: str
) -> None:
    """Raise `UserError` naming the first option of eq. 17 that is out of range."""
    check_choice("intuition", intuition, INTUITIONS)
    if intuition_embeddings == "frozen":
        raise UserError(
            "intuition_embeddings='frozen' was removed: the reference code mixes the *current* "
            "table without gradient, which is intuition_embeddings='detached'"
        )
    check_choice("intuition_embeddings", intuition_embeddings, EMBEDDINGS)
    if int(intuition_k) < 1:
        raise UserError(f"intuition_k={intuition_k!r} is not valid; expected an integer >= 1")
    if not float(intuition_temperature) > 0:
        raise UserError(f"intuition_temperature={intuition_temperature!r} is not valid; expected a number > 0")


# --------------------------------------------------------------------------- eq. 17


def intuitive_tokens(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    predictions: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """pi(s_{i-1}) of eq. 17: at each trained position t, the token the model predicted from t-1.

    Args:
        input_ids: (B, T) the input tokens s.
        labels: (B, T) unshifted labels, -100 where a token is not trained.
        predictions: (B, T) `predictions[b, t]` is the model's choice for token t+1.
        position_ids: (B, T) or None; with packed rows, restarts at 0 for each document.

    Returns:
        (B, T) intuitive token ids. Untrained positions, the first position and each packed
        document's first token keep their input id.
    """
    intuitive_ids = input_ids.clone()
    intuitive_ids[:, 1:] = predictions[:, :-1].to(input_ids.dtype)
    keep = labels == IGNORE_INDEX
    keep[:, 0] = True
    if position_ids is not None:
        keep |= position_ids == 0
    return torch.where(keep, input_ids, intuitive_ids)


def mix_embeddings(embeds: torch.Tensor, intuitive_embeds: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Temporal residual connection, eq. 17: `(1 - lam) * E[s_i] + lam * E[pi(s_{i-1})]`, any shape."""
    if not torch.is_tensor(lam):
        check_unit("lam", lam)
    return (1 - lam) * embeds + lam * intuitive_embeds


def mixed_inputs(
    table: nn.Module,
    input_ids: torch.Tensor,
    intuitive_ids: torch.Tensor,
    lam: float | torch.Tensor,
    detached: bool = False,
) -> torch.Tensor:
    """Eq. 17 over a batch: (B, T, H) inputs embeddings from two lookups of the whole batch.

    Where the intuitive token equals the input the result is E[input] exactly. Always two calls
    of `table` (never data-dependent: under ZeRO-3 each call gathers the table). `detached`:
    both lookups without gradient (the reference code's refreshed copy of the live table).
    """
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detached):
        embeds, intuitive = table(input_ids), table(intuitive_ids)
    differs = (intuitive_ids != input_ids).unsqueeze(-1)
    return torch.where(differs, mix_embeddings(embeds, intuitive, lam), embeds)


# --------------------------------------------------------------------------- eq. 19-22


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


def relation_weights(
    logps: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 0.95,
    propagation: str = "loss",
    side: str = "left",
    norm: str = "L1",
    detach: bool = False,
) -> torch.Tensor:
    """Dynamic relation propagation (eq. 19-22): one weight per trained token.

    Args:
        logps: (B, T) log-probabilities of the trained tokens (any value where `mask` is 0).
        mask: (B, T) bool or 0/1, which tokens are trained.
        gamma: discount in [0, 1]; 0 gives plain SFT weights (all ones).
        propagation: what is propagated: "loss" (-logp / n_b), "logps" (-logp), "mask" (counting).
        side: "left" (a token weighs what it influences later) or "right" (reference's inverse).
        norm: "L1", "L2", "softmax" or "log" transform of the propagated sums.
        detach: stop the gradient through the weights.

    Returns:
        (B, T) weights, zero where `mask` is 0; each row sums to its token count n_b, so a
        weighted per-sequence mean stays on the scale of SFT's.
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
        w = {"L1": lambda v: v, "L2": torch.square, "softmax": lambda v: torch.softmax(v, -1), "log": torch.log1p}[
            norm
        ](w)
    else:
        w = discounted_cumsum(item, gamma)
        w = torch.where(m > 0, w, torch.full_like(w, _RIGHT_FILL))
        nonzero = torch.where(w != 0, w, torch.full_like(w, math.inf)).min()
        w = w + torch.where(torch.isfinite(nonzero), nonzero, torch.zeros_like(nonzero))
        w = {
            "L1": torch.reciprocal,
            "L2": lambda v: v.square().reciprocal(),
            "softmax": lambda v: torch.softmax(v.reciprocal(), -1),
            "log": lambda v: torch.log1p(v).reciprocal(),
        }[norm](w)
    w = w * m
    total = w.sum(-1, keepdim=True)
    # A row whose weights all vanish (e.g. every log-prob is exactly 0) falls back to uniform.
    ok = total > 0
    return torch.where(ok, w * n / torch.where(ok, total, torch.ones_like(total)), m)


# --------------------------------------------------------------------------- the loss


@dataclass
class IFTOutput:
    """What one IFT step computes. `loss` carries the gradient; the rest are detached metrics.

    Attributes:
        loss: () the IFT loss, mean over sequences with a trained token of their weighted mean NLL.
        sft_loss: () the teacher-forced NLL of the intuition pass (per-sequence mean): plain SFT's
            loss on the same batch, free since that pass runs anyway; NaN when not asked for.
        intuitive_nll: () the unweighted NLL of the training pass (on the mixed inputs).
        intuition_accuracy: () share of trained positions where the intuition equals the target.
        n_tokens: () trained positions.
        loss_sum: () sum of per-sequence losses, and n_sequences: () sequences with a trained
            token: a trainer divides the first by the second summed over a whole accumulation window.
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
    intuition_k: int = 1,
    intuition_temperature: float = 1.0,
    intuition_embeddings: str = "live",
    detach_weights: bool = False,
    position_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    head_chunk_size: int | None = None,
    train_logprobs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    with_sft_loss: bool = True,
    **forward_kwargs: Any,
) -> IFTOutput:
    """One IFT step: a no-grad intuition pass, then a training pass on the mixed embeddings
    (eq. 17), each token's loss weighted by relation propagation (eq. 19-22).

    Args:
        model: a causal LM (plain, PEFT, DDP, FSDP2 or ZeRO-3).
        input_ids: (B, T) token ids.
        labels: (B, T) unshifted labels, -100 where not trained (prompt, padding).
        attention_mask: (B, T) or None; must be None for packed rows.
        lam: eq. 17's weight of the model's intuition, in [0, 1].
        gamma, propagation, side, norm, detach_weights: eq. 19-22, see `relation_weights`.
        intuition: "greedy", "rank" (the `intuition_k`-th most likely) or "sample" (at
            `intuition_temperature`, drawn with `generator`).
        intuition_embeddings: table E of eq. 17: "live" (trained through the lookup) or
            "detached" (the current table without gradient through the lookup, as the
            reference code does).
        position_ids: (B, T) or (1, T); packed documents restart at 0.
        head_chunk_size: trained positions whose logits exist at once (None: ~128 MiB of them).
        train_logprobs: replaces iftune's head in the training pass: `(inputs_embeds, labels)
            -> (B, T-1)` log p(labels[:, t+1]), e.g. TRL's fused LM head.
        with_sft_loss: compute `sft_loss` (a log-sum-exp over the vocabulary in the intuition
            pass); False leaves it NaN.
        forward_kwargs: a padding-free collator's `cu_seq_lens_*`, `max_length_*`, `seq_idx`
            (`modeling.FORWARD_KEYS`), passed to both forwards as they are; other names are refused.

    Returns:
        `IFTOutput`; `loss` is a () tensor with gradient, in float32 or wider.
    """
    if not torch.is_tensor(lam):
        check_unit("lam", lam)
    check_relation_options(gamma, propagation, side, norm)
    check_intuition_options(intuition, intuition_k, intuition_temperature, intuition_embeddings)
    unknown = sorted(set(forward_kwargs) - set(FORWARD_KEYS))
    if unknown:  # a misspelled option would otherwise reach the model and be ignored
        raise TypeError(f"ift_loss got unexpected keyword arguments {unknown}; forward keywords are {FORWARD_KEYS}")
    if position_ids is not None:
        # Hugging Face takes (1, T) position ids for a whole batch; the per-row logic needs (B, T).
        position_ids = position_ids.expand_as(input_ids)
        if attention_mask is not None and ((position_ids[:, 1:] == 0) & (attention_mask[:, 1:] != 0)).any():
            # Transformers separates packed documents only when no attention mask is given.
            raise UserError(
                "attention_mask must be None for packed rows (position_ids restarting at 0): "
                "with a mask the model attends across documents"
            )
    base = unwrap_model(model)
    head = base.get_output_embeddings()
    if intuition == "rank" and int(intuition_k) > (vocab := vocab_size(head)):
        raise UserError(f"intuition_k={intuition_k} is larger than the vocabulary ({vocab})")
    targets, mask = trained_targets(labels, position_ids)
    scale, softcap = logit_transform(base.config)

    # Step 1: intuition pass, no graph kept, in eval mode (no dropout) like inference. Not
    # inference_mode: models that cache tensors on first use (rotary tables) would hand
    # inference tensors to the training pass.
    with torch.no_grad():
        with intuition_mode(model), record_function("ift.intuition_forward"):
            hidden = hidden_states(model, attention_mask, position_ids, input_ids=input_ids, **forward_kwargs)
        with record_function("ift.intuition_head"):
            # The head runs only where a target is trained: prompts and padding cost no logits.
            picked, tf_picked = intuition_from_hidden(
                hidden[:, :-1][mask],
                head,
                targets[mask],
                intuition=intuition,
                k=int(intuition_k),
                temperature=float(intuition_temperature),
                generator=generator,
                with_logp=with_sft_loss,
                scale=scale,
                softcap=softcap,
                chunk_size=head_chunk_size,
            )
        del hidden
        preds = torch.zeros_like(input_ids).masked_scatter(nn.functional.pad(mask, (0, 1)), picked)
    # Steps 2-3: intuitive tokens and the temporal residual connection (eq. 17).
    with record_function("ift.mix"):
        intuitive_ids = intuitive_tokens(input_ids, labels, preds, position_ids)
        x = mixed_inputs(
            base.get_input_embeddings(), input_ids, intuitive_ids, lam, detached=intuition_embeddings == "detached"
        )
    # Step 4: training pass.
    if train_logprobs is None:
        logp = trained_logprobs(
            model,
            targets,
            mask,
            attention_mask,
            position_ids,
            head_chunk_size=head_chunk_size,
            inputs_embeds=x,
            **forward_kwargs,
        )
    else:
        trained = torch.cat([labels[:, :1], torch.where(mask, targets, IGNORE_INDEX)], dim=1)
        logp = train_logprobs(x, trained)
        logp = torch.where(mask, logp, torch.zeros_like(logp))
    tf_logp = torch.zeros_like(logp)
    if tf_picked is not None:
        tf_logp = tf_logp.masked_scatter(mask, tf_picked.to(logp.dtype))

    # Steps 5-6 (eq. 19-22), per document: rows of a padded batch, or the documents of packed rows.
    with record_function("ift.relation_weights"):
        logp_d, mask_d, tf_d = per_document(mask, position_ids, logp, tf_logp)
        w = relation_weights(logp_d, mask_d, gamma, propagation, side, norm, detach=detach_weights)
    n = mask_d.sum(-1)
    n_seq = (n > 0).sum()  # sequences without a trained token add 0 and are not counted
    denom = n.clamp_min(1).to(logp.dtype)
    loss_sum = ((-(logp_d * w)).sum(-1) / denom).sum()
    loss = loss_sum / n_seq.clamp_min(1)
    with torch.no_grad():
        sft = ((-tf_d * mask_d).sum(-1) / denom).sum() / n_seq.clamp_min(1)
        if tf_picked is None:
            sft = torch.full_like(sft, math.nan)
        nll = ((-logp_d.detach()).sum(-1) / denom).sum() / n_seq.clamp_min(1)
        n_tok = mask.sum()
        acc = (picked == targets[mask]).sum().to(torch.float32) / n_tok.clamp_min(1)
    return IFTOutput(
        loss=loss,
        sft_loss=sft,
        intuitive_nll=nll,
        intuition_accuracy=acc,
        n_tokens=n_tok,
        loss_sum=loss_sum,
        n_sequences=n_seq,
    )


__all__ = [
    "EMBEDDINGS",
    "INTUITIONS",
    "NORMS",
    "PROPAGATIONS",
    "SIDES",
    "IFTOutput",
    "check_intuition_options",
    "check_relation_options",
    "discounted_cumsum",
    "ift_loss",
    "intuitive_tokens",
    "mix_embeddings",
    "mixed_inputs",
    "relation_weights",
]
