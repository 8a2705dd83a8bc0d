"""The benchmark's two extra trainers, which isolate what IFT itself costs.

- `PathSFTTrainer`: a true single-pass SFT on the LM-head path IFT uses (one forward to the
  final hidden states, the head at trained positions only): the baseline of IFT's overhead.
- `NaiveIFTTrainer`: the IFT objective computed the way the reference code does it, with the
  full (B, T, V) float32 logits in both passes: what the chunked head saves.
"""

from __future__ import annotations

import torch

from iftune.modeling import IGNORE_INDEX, trained_logprobs, trained_targets, unwrap_model
from iftune.objective import intuitive_tokens, mix_embeddings, relation_weights
from iftune.trainer import IFTTrainer


def path_sft_sums(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over sequences of each one's mean NLL of its trained tokens, number of sequences with
    a trained token), through IFT's head path: `PathSFTTrainer`'s loss before it is averaged."""
    targets, mask = trained_targets(labels, position_ids)
    logp, _ = trained_logprobs(model, targets, mask, attention_mask, position_ids, input_ids=input_ids)
    return (-logp.sum(-1) / mask.sum(-1).clamp_min(1)).sum(), mask.any(-1).sum()


class PathSFTTrainer(IFTTrainer):
    """Single-pass SFT, per-sequence mean, on IFT's head path: docs/objective.md's lam = 0, gamma = 0
    objective without the intuition pass."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The per-sequence mean NLL of the trained tokens, averaged like IFT's loss."""
        with self.accelerator.autocast():  # the head call outside the forward too, as IFTTrainer
            loss_sum, n_sequences = path_sft_sums(
                model, inputs["input_ids"], inputs["labels"], inputs.get("attention_mask"), inputs.get("position_ids")
            )
        loss = self.window_mean(loss_sum, n_sequences, num_items_in_batch)
        return (loss, None) if return_outputs else loss


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """float32 copy of half-precision logits, as the reference code makes (float64 stays)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


class NaiveIFTTrainer(IFTTrainer):
    """IFT computed with the full (B, T, V) float32 logits in both passes (the reference
    code's way): argmax over all logits, then log-softmax over all logits."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The IFT loss (defaults of `IFTConfig`), from full logits."""
        with self.accelerator.autocast():  # the embedding lookups under the same autocast as IFTTrainer's
            loss = self._naive_loss(model, inputs, num_items_in_batch)
        return (loss, None) if return_outputs else loss

    def _naive_loss(self, model, inputs, num_items_in_batch) -> torch.Tensor:
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
        w = relation_weights(logp, mask, args.gamma, args.propagation, args.side, args.norm, detach=args.detach_weights)
        loss_sum = ((-(logp * w)).sum(-1) / mask.sum(-1).clamp_min(1)).sum()
        return self.window_mean(loss_sum, mask.any(-1).sum(), num_items_in_batch)


__all__ = ["NaiveIFTTrainer", "PathSFTTrainer", "path_sft_sums"]
