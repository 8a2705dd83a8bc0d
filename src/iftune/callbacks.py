"""A training callback that stops a run whose loss or gradients stop being finite.

The Trainer itself carries on through NaN: it hides a NaN loss from the logs
(`logging_nan_inf_filter`) and saves whatever the weights became. `FiniteGuard` raises
`UserError` (one line naming the step) before the optimizer applies a non-finite gradient,
before a checkpoint with non-finite weights is written, and before training returns with them,
so `iftune.train.train` never saves a NaN model.
"""

from __future__ import annotations

import math

import torch
from accelerate import PartialState
from accelerate.utils import reduce
from transformers import TrainerCallback

from iftune.errors import UserError

ADVICE = "nothing was saved from this step on; lower --learning_rate or check the data"


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter or gradient: FSDP2 shards are DTensors, ZeRO-3
    keeps the partition in `ds_tensor`."""
    if hasattr(tensor, "ds_tensor"):
        return tensor.ds_tensor
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def finite_norm(tensors: list[torch.Tensor]) -> bool:
    """Whether the 2-norm of `tensors` together is finite on every process (the gradient norm
    the Trainer logs; one sync)."""
    tensors = [t for t in tensors if t.numel()]
    norm = torch.nn.utils.get_total_norm(tensors, error_if_nonfinite=False) if tensors else torch.zeros(())
    return agree(bool(torch.isfinite(norm)))


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of `tensors` is finite on every process (a norm could overflow for
    huge but finite weights, so each tensor is checked; one sync)."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return agree(True)
    device = tensors[0].device  # a no-op move, unless some weights are offloaded elsewhere
    return agree(bool(torch.stack([torch.isfinite(t).all().to(device) for t in tensors]).all()))


def agree(ok: bool) -> bool:
    """`ok` on every process: all ranks must agree to stop, or the others would hang. The flag
    lives on accelerate's device for this process (the one its backend reduces on: a GPU under
    NCCL, the CPU under gloo, an XLA device)."""
    state = PartialState()
    bad = torch.tensor(float(not ok), device=state.device)
    return not bool(reduce(bad, reduction="max").item())


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class FiniteGuard(TrainerCallback):
    """Raise `UserError` when the gradient norm, the logged loss or the trained weights are
    not finite. Under fp16 the grad scaler skips overflowing steps itself, so gradients are
    left to it; the weights are still checked before every save."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or args.fp16:
            return
        grads = [local(p.grad) for p in trainable(model) if p.grad is not None]
        if not finite_norm(grads):
            raise UserError(
                f"step {state.global_step + 1}: the gradient norm is not finite (inf or NaN); "
                f"training stopped before the optimizer step, {ADVICE}"
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"step {state.global_step}: the logged {key} is {value}; training stopped, {ADVICE}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save:
            self.check_weights(model, state.global_step, "before saving checkpoint")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.check_weights(model, state.global_step, "at the end of training")

    @staticmethod
    def check_weights(model, step: int, when: str) -> None:
        if model is not None and not all_finite([local(p).detach() for p in trainable(model)]):
            raise UserError(
                f"step {step}: the model's weights are not finite (inf or NaN) {when}; training stopped, {ADVICE}"
            )


__all__ = ["FiniteGuard", "agree", "all_finite", "finite_norm"]
