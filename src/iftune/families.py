"""What IFT assumes of a model family, checked on the model itself: its head, as iftune applies
it (`lm_head.logit_transform`), gives the log-probs of the model's own `forward(...).logits`.

IFT never calls the model's head through its forward (it takes the final hidden states and runs
the head chunk by chunk at trained positions), so a family that rescales or caps its logits in a
way `lm_head.LOGIT_SCALES` does not know would train against another distribution, silently.
`check_head_matches` compares the two on a few positions of one batch and stops if they differ.

Packed rows (padding-free: `position_ids` restarting at 0, no attention mask) rely on the model
building its attention mask from `position_ids`; families that do not (Bloom, MPT) would attend
across documents, silently. `check_packed_documents` runs a document inside its packed row and
alone, and stops if they differ. `check_batch` runs both, as a trainer does on its first batch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from iftune.errors import UserError
from iftune.modeling import (
    accepts,
    forward_hidden,
    intuition_mode,
    trained_logprobs,
    trained_targets,
    unwrap_model,
)


def family(model: nn.Module) -> str:
    """The model's family as transformers names it: its (text) config's `model_type`."""
    config = unwrap_model(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return str(getattr(text, "model_type", None) or getattr(config, "model_type", type(model).__name__))


def uncompiled(model: nn.Module) -> nn.Module:
    """The module under `torch.compile`'s wrapper: the checks' one-row calls would each compile
    new graphs (other shapes, eval mode) for nothing."""
    return getattr(model, "_orig_mod", model)


def head_tolerance(*dtypes: torch.dtype) -> float:
    """Largest log-prob difference, relative to (1 + largest |logit|), that rounding explains
    when logits are computed in the least precise of `dtypes` (a few units of its epsilon;
    1e-4 at least, for the different matmul shapes of the two paths)."""
    eps = max(torch.finfo(d).eps for d in dtypes if d.is_floating_point)
    return max(8 * eps, 1e-4)


def check_head_matches(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    positions: int = 4,
) -> float:
    """Raise `UserError` naming the family if iftune's head (`modeling.trained_logprobs`, the
    training pass of `ift_loss`) and the model's own `forward(...).logits` give different
    log-probs of the trained targets; return the largest difference.

    Cheap: one row of the batch (the first with a trained target), up to `positions` trained
    positions spread along it, two forwards of that row without grad, in eval mode (no dropout).
    Every caller makes the same calls of the model whatever its data (sharded wrappers need it).
    """
    model = uncompiled(model)
    base = unwrap_model(model)
    if position_ids is not None:
        position_ids = position_ids.expand_as(input_ids)
    _, mask = trained_targets(labels, position_ids)
    rows = mask.any(-1).nonzero()
    b = int(rows[0]) if len(rows) else 0
    trained = mask[b].nonzero().squeeze(-1)
    picked = trained[torch.linspace(0, len(trained) - 1, min(positions, len(trained))).round().long().unique()]
    end = int(picked[-1]) + 2 if len(picked) else 1  # inputs up to the last target
    ids, lab = input_ids[b : b + 1, :end], labels[b : b + 1, :end]
    am = None if attention_mask is None else attention_mask[b : b + 1, :end]
    pos = None if position_ids is None else position_ids[b : b + 1, :end]
    targets, _ = trained_targets(lab, pos)
    keep = torch.zeros_like(targets, dtype=torch.bool)
    keep[0, picked] = True
    kwargs = dict(input_ids=ids, attention_mask=am, use_cache=False)
    if pos is not None:
        kwargs["position_ids"] = pos
    first = int(picked[0]) if len(picked) else end - 1
    if accepts(base, "logits_to_keep"):
        kwargs["logits_to_keep"] = end - first  # the model's head from the first position picked on
    with torch.no_grad(), intuition_mode(model):
        ours = trained_logprobs(model, targets, keep, am, pos, input_ids=ids)[0][keep]
        logits = model(**kwargs).logits[0]
    if not len(picked):
        return 0.0
    logits = logits[picked - (end - len(logits))]
    theirs = torch.log_softmax(logits.to(ours.dtype), -1).gather(-1, targets[0, picked, None]).squeeze(-1)
    diff = float((ours - theirs).abs().max())
    dtypes = [logits.dtype, base.get_output_embeddings().weight.dtype]
    if torch.is_autocast_enabled(logits.device.type):
        dtypes.append(torch.get_autocast_dtype(logits.device.type))
    tol = head_tolerance(*dtypes) * (1 + float(logits.float().abs().max()))
    if not diff <= tol:  # NaN included
        raise UserError(
            f"model family '{family(model)}' ({type(base).__name__}): iftune's LM head gives log-probs up to "
            f"{diff:.3g} away from the model's own logits (tolerance {tol:.2g}); its forward rescales or caps "
            f"the logits in a way iftune.lm_head.LOGIT_SCALES does not know, so IFT would train against "
            f"another distribution (see docs/models.md)"
        )
    return diff


def check_packed_documents(model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> float:
    """Raise `UserError` naming the family if a packed document's final hidden states differ
    from those of the same document alone, i.e. the model attends across the documents of a
    packed row (no attention mask; `position_ids` restart at 0); return the largest difference,
    relative to the largest hidden value.

    Cheap: the first two documents of the first packed row, two forwards without grad in eval
    mode. Without a packed row it still makes its two (tiny) forwards, so that every caller
    makes the same calls of the model whatever its data.
    """
    model = uncompiled(model)
    position_ids = position_ids.expand_as(input_ids)
    starts = (position_ids[:, 1:] == 0).nonzero()
    if len(starts):
        b, s = int(starts[0, 0]), int(starts[0, 1]) + 1  # the second document starts at s
        later = (position_ids[b, s + 1 :] == 0).nonzero()
        end = s + 1 + int(later[0]) if len(later) else input_ids.shape[1]
    else:
        b, s, end = 0, 0, min(2, input_ids.shape[1])
    row, pos = input_ids[b : b + 1, :end], position_ids[b : b + 1, :end]
    with torch.no_grad(), intuition_mode(model):
        packed = forward_hidden(model, None, pos, input_ids=row)[0][:, s:]
        alone = forward_hidden(model, None, pos[:, s:] - pos[:, s:][:, :1], input_ids=row[:, s:])[0]
    diff = float((packed.float() - alone.float()).abs().max() / alone.float().abs().max().clamp_min(1e-30))
    dtypes = [packed.dtype]
    if torch.is_autocast_enabled(packed.device.type):
        dtypes.append(torch.get_autocast_dtype(packed.device.type))
    tol = head_tolerance(*dtypes)
    if not diff <= tol:
        base = unwrap_model(model)
        raise UserError(
            f"model family '{family(model)}' ({type(base).__name__}, attn_implementation="
            f"{getattr(base.config, '_attn_implementation', None)}) attends across the documents of a packed row "
            f"(relative difference {diff:.3g} from the document alone, tolerance {tol:.2g}); train it with "
            f"--padding_free false and --packing false (see docs/models.md)"
        )
    return diff


def check_lora_targets(config: object, peft_config: object) -> None:
    """Raise `UserError` naming the family and `--lora_target_modules` if PEFT finds no module to
    adapt with `peft_config` in a model of `config` (PEFT knows no default targets for Phi-3,
    Granite, Cohere, OLMo 2, ...). The model is built on the meta device: no memory, no weights."""
    import transformers
    from peft import get_peft_model

    architecture = getattr(transformers, (getattr(config, "architectures", None) or [""])[0], None)
    if architecture is None:  # remote code: PEFT's own error, when the trainer builds the adapter
        return
    with torch.device("meta"):
        model = architecture(config)
    try:
        get_peft_model(model, copy.deepcopy(peft_config))  # it fills in the targets it chose
    except ValueError as err:
        raise UserError(
            f"--use_peft: PEFT found no layer to adapt in model family '{getattr(config, 'model_type', '?')}' "
            f"({str(err).splitlines()[0]}); name them with --lora_target_modules (e.g. all-linear, or "
            f"q_proj v_proj)"
        ) from None


def check_batch(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> None:
    """Both checks on a collated batch (`input_ids`, `labels`, optional `attention_mask` and
    `position_ids`): the head always, packed documents when the rows are packed."""
    position_ids, attention_mask = inputs.get("position_ids"), inputs.get("attention_mask")
    check_head_matches(model, inputs["input_ids"], inputs["labels"], attention_mask, position_ids)
    if position_ids is not None and attention_mask is None:
        check_packed_documents(model, inputs["input_ids"], position_ids)


__all__ = [
    "check_batch",
    "check_head_matches",
    "check_lora_targets",
    "check_packed_documents",
    "family",
    "head_tolerance",
    "uncompiled",
]
