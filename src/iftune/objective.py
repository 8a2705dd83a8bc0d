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
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from iftune.errors import UserError, check_choice, check_unit
from iftune.lm_head import intuition_from_hidden, logit_transform, vocab_size
from iftune.modeling import (
    FORWARD_KEYS,
    IGNORE_INDEX,
    forward_hidden,
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


@dataclass(frozen=True)
class IFTOptions:
    r"""The objective's hyperparameters, checked once when the object is built: a bad value raises
    `UserError` naming the option. `IFTConfig.ift_options()` builds it from a training config.

    Parameters:
        lam (`float` or 0-d tensor, defaults to `0.2`):
            Eq. 17: weight of the model's intuition in the temporal residual connection
            `x = (1 - lam) E[s_i] + lam E[pi(s_{i-1})]`, in [0, 1].
        gamma (`float`, defaults to `0.95`):
            Eq. 22: discount of dynamic relation propagation, in [0, 1]; 0 gives SFT's weights.
        propagation (`str`, defaults to `"loss"`):
            Eq. 22: what is propagated, one of `"loss"` (-logp / n), `"logps"` (-logp), `"mask"` (counting).
        side (`str`, defaults to `"left"`):
            `"left"` (a token weighs what it influences later) or `"right"` (the reference's inverse variant).
        norm (`str`, defaults to `"L1"`):
            Transform of the propagated sums: `"L1"`, `"L2"`, `"softmax"` or `"log"`.
        intuition (`str`, defaults to `"greedy"`):
            How pi(s_{i-1}) is chosen: `"greedy"`, `"rank"` (the `intuition_k`-th most likely) or `"sample"`.
        intuition_k (`int`, defaults to `1`):
            k for `intuition="rank"`.
        intuition_temperature (`float`, defaults to `1.0`):
            Temperature for `intuition="sample"`, > 0.
        intuition_embeddings (`str`, defaults to `"live"`):
            Table E of eq. 17: `"live"` (trained through the lookup) or `"detached"` (the current table
            without gradient through the lookup, as the reference code does).
        detach_weights (`bool`, defaults to `False`):
            Stop the gradient through the relation weights.
        head_chunk_size (`int` or `None`, defaults to `None`):
            Trained positions whose logits exist at once in iftune's head (None: ~128 MiB of them).
            Cost only; the loss does not depend on it.
        head_logits_budget_mb (`float` or `None`, defaults to `None`):
            MiB of the training pass's logits kept for the backward instead of recomputed (None:
            `lm_head.DEFAULT_LOGITS_BUDGET_MB`; 0: recompute every chunk). Cost only; the gradients
            are the same.
    """

    lam: float | torch.Tensor = 0.2
    gamma: float = 0.95
    propagation: str = "loss"
    side: str = "left"
    norm: str = "L1"
    intuition: str = "greedy"
    intuition_k: int = 1
    intuition_temperature: float = 1.0
    intuition_embeddings: str = "live"
    detach_weights: bool = False
    head_chunk_size: int | None = None
    head_logits_budget_mb: float | None = None

    def __post_init__(self) -> None:
        if not torch.is_tensor(self.lam):
            check_unit("lam", self.lam)
        check_unit("gamma", self.gamma)
        check_choice("propagation", self.propagation, PROPAGATIONS)
        check_choice("side", self.side, SIDES)
        check_choice("norm", self.norm, NORMS)
        check_choice("intuition", self.intuition, INTUITIONS)
        if self.intuition_embeddings == "frozen":
            raise UserError(
                "intuition_embeddings='frozen' was removed: the reference code mixes the *current* "
                "table without gradient, which is intuition_embeddings='detached'"
            )
        check_choice("intuition_embeddings", self.intuition_embeddings, EMBEDDINGS)
        if int(self.intuition_k) < 1:
            raise UserError(f"intuition_k={self.intuition_k!r} is not valid; expected an integer >= 1")
        if not float(self.intuition_temperature) > 0:
            raise UserError(f"intuition_temperature={self.intuition_temperature!r} is not valid; expected a number > 0")
        if self.head_chunk_size is not None and self.head_chunk_size < 1:
            raise UserError(f"head_chunk_size={self.head_chunk_size!r} is not valid; expected None or an integer >= 1")
        if self.head_logits_budget_mb is not None and not self.head_logits_budget_mb >= 0:
            raise UserError(
                f"head_logits_budget_mb={self.head_logits_budget_mb!r} is not valid; expected None or a number >= 0"
            )


OPTION_NAMES = tuple(f.name for f in fields(IFTOptions))


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
    return (1 - lam) * embeds + lam * intuitive_embeds


def mixed_inputs(
    table: nn.Module,
    input_ids: torch.Tensor,
    intuitive_ids: torch.Tensor,
    lam: float | torch.Tensor,
    detached: bool = False,
) -> torch.Tensor:
    """Eq. 17 over a batch: (B, T, H) inputs embeddings.

    Where the intuitive token equals the input the result is E[input] exactly. Both id tensors
    are looked up in ONE call of `table` (never data-dependent: under ZeRO-3 each call gathers
    the table), so its backward is one scatter-add into the table's gradient, not two.
    `detached`: without gradient (the reference code's refreshed copy of the live table).
    """
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detached):
        embeds, intuitive = table(torch.cat([input_ids, intuitive_ids])).chunk(2)
    differs = (intuitive_ids != input_ids).unsqueeze(-1)
    return torch.where(differs, mix_embeddings(embeds, intuitive, lam), embeds)


# --------------------------------------------------------------------------- eq. 19-22


def discounted_cumsum(x: torch.Tensor, gamma: float, reverse: bool = False) -> torch.Tensor:
    """`y_t = sum_{s<=t} gamma^(t-s) x_s` along the last axis (`reverse`: `sum_{s>=t} gamma^(s-t) x_s`).

    Vectorized and differentiable: the axis is cut into ~sqrt(T) blocks; a block's own sums are
    one matmul with a (C, C) decay matrix, and the carries between blocks another with a
    (T/C, T/C) one. No power of 1/gamma is ever formed, so it stays exact for any gamma in [0, 1].
    """
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
    """What one IFT step computes. `loss` carries the gradient; every other field is a detached
    sum or count, so that a trainer can add them over micro-batches and processes, then divide.

    Attributes:
        loss: () the IFT loss, mean over sequences with a trained token of their weighted mean NLL.
        loss_sum: () sum over sequences of their weighted mean NLL (with gradient).
        sft_loss_sum: () sum over sequences of the intuition pass's teacher-forced mean NLL:
            plain SFT's loss on the same batch, from the logits that pass computes anyway.
        intuitive_nll_sum: () sum over sequences of the training pass's unweighted mean NLL.
        n_sequences: () sequences (documents, when packed) with a trained token.
        n_correct: () trained positions where the intuition equals the target.
        n_tokens: () trained positions.
        aux_loss: () the model's MoE router load-balancing loss of the training pass (with
            gradient, unweighted), or None when the model returns none.
    """

    loss: torch.Tensor
    loss_sum: torch.Tensor
    sft_loss_sum: torch.Tensor
    intuitive_nll_sum: torch.Tensor
    n_sequences: torch.Tensor
    n_correct: torch.Tensor
    n_tokens: torch.Tensor
    aux_loss: torch.Tensor | None = None

    @property
    def sft_loss(self) -> torch.Tensor:
        return self.sft_loss_sum / self.n_sequences.clamp_min(1)

    @property
    def intuitive_nll(self) -> torch.Tensor:
        return self.intuitive_nll_sum / self.n_sequences.clamp_min(1)

    @property
    def intuition_accuracy(self) -> torch.Tensor:
        return self.n_correct.to(torch.float32) / self.n_tokens.clamp_min(1)


def ift_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    options: IFTOptions | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    train_logprobs: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]] | None = None,
    **kwargs: Any,
) -> IFTOutput:
    """One IFT step: a no-grad intuition pass, then a training pass on the mixed embeddings
    (eq. 17), each token's loss weighted by relation propagation (eq. 19-22).

    Args:
        model: a causal LM (plain, PEFT, DDP, FSDP2 or ZeRO-3).
        input_ids: (B, T) token ids.
        labels: (B, T) unshifted labels, -100 where not trained (prompt, padding).
        attention_mask: (B, T) or None; must be None for packed rows.
        options: the objective's hyperparameters (`IFTOptions`; None: the paper's defaults).
            Option names given as keywords (`lam=0.3`) replace the options' values.
        position_ids: (B, T) or (1, T); packed documents restart at 0.
        generator: draws for `intuition="sample"`.
        train_logprobs: replaces iftune's head in the training pass: `(inputs_embeds, labels)
            -> ((B, T-1) log p(labels[:, t+1]), aux_loss or None)`, e.g. TRL's fused LM head.
        kwargs: option names (above), and a padding-free collator's `cu_seq_lens_*`,
            `max_length_*`, `seq_idx` (`modeling.FORWARD_KEYS`), passed to both forwards as they
            are; other names are refused.

    Returns:
        `IFTOutput`; `loss` is a () tensor with gradient, in float32 or wider.
    """
    named = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTION_NAMES}
    options = replace(options, **named) if options is not None else IFTOptions(**named)
    unknown = sorted(set(kwargs) - set(FORWARD_KEYS))
    if unknown:  # a misspelled option would otherwise reach the model and be ignored
        raise TypeError(
            f"ift_loss got unexpected keyword arguments {unknown}; options are {OPTION_NAMES}, "
            f"forward keywords are {FORWARD_KEYS}"
        )
    position_ids = document_positions(position_ids, input_ids, attention_mask)
    targets, mask = trained_targets(labels, position_ids)
    # Steps 1-2: the intuition pass; pi(s_{i-1}) at each trained position.
    picked, tf_logp = intuition_pass(
        model, input_ids, targets, mask, attention_mask, position_ids, options, generator, kwargs
    )
    predictions = torch.zeros_like(input_ids).masked_scatter(nn.functional.pad(mask, (0, 1)), picked)
    with record_function("ift.mix"):
        intuitive_ids = intuitive_tokens(input_ids, labels, predictions, position_ids)
        # Step 3: the temporal residual connection (eq. 17).
        x = mixed_inputs(
            unwrap_model(model).get_input_embeddings(),
            input_ids,
            intuitive_ids,
            options.lam,
            detached=options.intuition_embeddings == "detached",
        )
    # Step 4: the training pass.
    logp, aux_loss = training_pass(
        model, x, labels, targets, mask, attention_mask, position_ids, options, train_logprobs, kwargs
    )
    # Steps 5-6 (eq. 19-22).
    tf = torch.zeros_like(logp).masked_scatter(mask, tf_logp.to(logp.dtype))
    n_correct = (picked == targets[mask]).sum()
    return reduce_loss(logp, tf, mask, position_ids, options, n_correct=n_correct, aux_loss=aux_loss)


def document_positions(
    position_ids: torch.Tensor | None, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """`position_ids` as (B, T) (Hugging Face takes (1, T) for a whole batch; the per-row logic
    needs (B, T)); packed rows, whose positions restart at 0, must come without an attention mask."""
    if position_ids is None:
        return None
    position_ids = position_ids.expand_as(input_ids)
    if attention_mask is not None and ((position_ids[:, 1:] == 0) & (attention_mask[:, 1:] != 0)).any():
        # Transformers separates packed documents only when no attention mask is given.
        raise UserError(
            "attention_mask must be None for packed rows (position_ids restarting at 0): "
            "with a mask the model attends across documents"
        )
    return position_ids


def intuition_pass(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    options: IFTOptions,
    generator: torch.Generator | None = None,
    forward_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: the model's own choice pi(s_{i-1}) and the teacher-forced log-prob of the target
    at each trained position (`targets[mask]` order), from one forward without gradient.

    In eval mode (no dropout) like inference. Not `inference_mode`: models that cache tensors on
    first use (rotary tables) would hand inference tensors to the training pass. The head runs
    only where a target is trained: prompts and padding cost no logits.
    """
    base = unwrap_model(model)
    head = base.get_output_embeddings()
    if options.intuition == "rank" and int(options.intuition_k) > (vocab := vocab_size(head)):
        raise UserError(f"intuition_k={options.intuition_k} is larger than the vocabulary ({vocab})")
    scale, softcap = logit_transform(base.config)
    with torch.no_grad():
        with intuition_mode(model), record_function("ift.intuition_forward"):
            hidden, _ = forward_hidden(
                model, attention_mask, position_ids, input_ids=input_ids, **(forward_kwargs or {})
            )
        with record_function("ift.intuition_head"):
            return intuition_from_hidden(
                hidden[:, :-1][mask],
                head,
                targets[mask],
                intuition=options.intuition,
                k=int(options.intuition_k),
                temperature=float(options.intuition_temperature),
                generator=generator,
                scale=scale,
                softcap=softcap,
                chunk_size=options.head_chunk_size,
                logits_budget_mb=options.head_logits_budget_mb,
            )


def training_pass(
    model: nn.Module,
    inputs_embeds: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    options: IFTOptions,
    train_logprobs: Callable | None = None,
    forward_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 4: log p(target) on the mixed inputs, (B, T-1) with gradient, zero where `mask` is
    False, and the model's MoE router aux loss of this pass (None for other models). iftune's
    head at the trained positions, or `train_logprobs` (e.g. TRL's fused head) on the labels."""
    if train_logprobs is None:
        return trained_logprobs(
            model,
            targets,
            mask,
            attention_mask,
            position_ids,
            head_chunk_size=options.head_chunk_size,
            head_logits_budget_mb=options.head_logits_budget_mb,
            inputs_embeds=inputs_embeds,
            **(forward_kwargs or {}),
        )
    trained = torch.cat([labels[:, :1], torch.where(mask, targets, IGNORE_INDEX)], dim=1)
    logp, aux_loss = train_logprobs(inputs_embeds, trained)
    return torch.where(mask, logp, torch.zeros_like(logp)), aux_loss


def reduce_loss(
    logp: torch.Tensor,
    tf_logp: torch.Tensor,
    mask: torch.Tensor,
    position_ids: torch.Tensor | None,
    options: IFTOptions,
    n_correct: torch.Tensor | None = None,
    aux_loss: torch.Tensor | None = None,
) -> IFTOutput:
    """Steps 5-6: relation weights (eq. 19-22) and the loss, per document (rows of a padded batch,
    or the documents of packed rows): per sequence `sum_t(-logp * w) / n`, then the mean over
    sequences with a trained token. `logp` (with gradient) and `tf_logp` are (B, T-1), zero
    where `mask` is False; `n_correct` and `aux_loss` are passed through. Pure: no model, no head."""
    with record_function("ift.relation_weights"):
        logp_d, mask_d, tf_d = per_document(mask, position_ids, logp, tf_logp)
        w = relation_weights(
            logp_d, mask_d, options.gamma, options.propagation, options.side, options.norm, options.detach_weights
        )
    n = mask_d.sum(-1)
    n_seq = (n > 0).sum()  # sequences without a trained token add 0 and are not counted
    denom = n.clamp_min(1).to(logp.dtype)
    loss_sum = ((-(logp_d * w)).sum(-1) / denom).sum()
    with torch.no_grad():
        sft_sum = ((-tf_d * mask_d).sum(-1) / denom).sum()
        nll_sum = ((-logp_d.detach()).sum(-1) / denom).sum()
    return IFTOutput(
        loss=loss_sum / n_seq.clamp_min(1),
        loss_sum=loss_sum,
        sft_loss_sum=sft_sum,
        intuitive_nll_sum=nll_sum,
        n_sequences=n_seq,
        n_correct=torch.zeros((), dtype=torch.long, device=logp.device) if n_correct is None else n_correct,
        n_tokens=mask.sum(),
        aux_loss=aux_loss,
    )


__all__ = [
    "EMBEDDINGS",
    "INTUITIONS",
    "NORMS",
    "OPTION_NAMES",
    "PROPAGATIONS",
    "SIDES",
    "IFTOptions",
    "IFTOutput",
    "discounted_cumsum",
    "document_positions",
    "ift_loss",
    "intuition_pass",
    "intuitive_tokens",
    "mix_embeddings",
    "mixed_inputs",
    "reduce_loss",
    "relation_weights",
    "training_pass",
]
