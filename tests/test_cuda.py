"""On a CUDA device (skipped without one: CI has none): the objective, iftune's LM head and TRL's
fused one give on the GPU what an independent computation gives, and IFT trains there in bf16.

`IFTUNE_TEST_DEVICE=cpu` runs the same checks on the CPU, which checks the checks. Run on a GPU
with `pytest tests/test_cuda.py` (docs/performance.md, "The GPU check", says when it last ran).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from batches import normal_batch
from conftest import first_batch, make_trainer
from iftune.lm_head import token_logprobs
from iftune.objective import IFTOptions, ift_loss
from iftune.tiny import causal_lm

DEVICE = torch.device(os.environ.get("IFTUNE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")

# Qwen2's biases on q/k/v and a tied head, small enough for float64 on the CPU.
QWEN = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)
VOCAB = 300


def _loss_and_grads(model: torch.nn.Module, options: IFTOptions) -> tuple[torch.Tensor, list[torch.Tensor]]:
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in normal_batch(VOCAB, seed=0).items()}
    loss = ift_loss(model, batch["input_ids"], batch["labels"], options=options).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return loss.detach().double().cpu(), [g.double().cpu() for g in grads]


@pytest.mark.parametrize("budget", [0.0, None])  # recompute every chunk; keep the logits (the default)
def test_ift_loss_and_gradients_on_the_device_match_float64_on_the_cpu(budget):
    model = causal_lm("qwen2", VOCAB, seed=0, **QWEN).eval()  # eval: no dropout, the same in both runs
    options = IFTOptions(lam=0.3, gamma=0.9, head_chunk_size=5, head_logits_budget_mb=budget)
    ref_loss, ref_grads = _loss_and_grads(copy.deepcopy(model).double(), options)
    loss, grads = _loss_and_grads(copy.deepcopy(model).to(DEVICE), options)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-3)


def _head_grads(head, hidden, targets, budget):
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        logp = token_logprobs(hidden, head, targets, chunk_size=5, scale=1.7, logits_budget_mb=budget)
    return [logp, *torch.autograd.grad((logp.exp() * 1.3 + logp).sum(), [hidden, *head.parameters()])]


def test_kept_logits_give_the_recomputed_gradients_bit_for_bit_under_bf16_autocast():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 37).to(DEVICE)
    hidden = torch.randn(23, 8, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 37, (23,), device=DEVICE)
    recomputed = _head_grads(head, hidden, targets, 0)
    kept = _head_grads(head, hidden, targets, None)  # the default budget holds all 23 positions
    for a, b in zip(kept, recomputed, strict=True):
        assert torch.equal(a, b)


def _trainer(tmp_path, bf16: bool, **overrides):
    """The tests' tiny IFT trainer on `DEVICE`, batch 4."""
    return make_trainer(tmp_path, use_cpu=DEVICE.type == "cpu", bf16=bf16, per_device_train_batch_size=4, **overrides)


@pytest.mark.parametrize("bf16", [False, True])
def test_trl_fused_head_and_iftune_head_give_the_same_loss_and_gradient(tmp_path, bf16):
    results = []
    for head in ("iftune", "trl"):
        trainer = _trainer(tmp_path / head, bf16, lm_head=head)
        assert trainer.model.device.type == DEVICE.type
        loss = trainer.compute_loss(trainer.model, first_batch(trainer))
        loss.backward()
        results.append((loss.item(), trainer.model.lm_head.weight.grad.double().cpu()))
    (loss_a, grad_a), (loss_b, grad_b) = results
    # bf16 autocast rounds the logits differently in the two heads; float32 agrees to rounding.
    rel = 2e-2 if bf16 else 1e-5
    assert loss_b == pytest.approx(loss_a, rel=rel)
    assert (grad_b - grad_a).norm() <= (5e-2 if bf16 else 1e-4) * grad_a.norm()


def test_ift_trains_in_bf16_on_the_device(tmp_path):
    trainer = _trainer(tmp_path, bf16=True, max_steps=3, learning_rate=1e-3)
    assert trainer.args.lm_head == ("trl" if DEVICE.type == "cuda" else "iftune")  # the default head there
    before = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert math.isfinite(h["loss"]) and math.isfinite(h["sft_loss"]) and math.isfinite(h["grad_norm"])
    assert not torch.equal(trainer.model.lm_head.weight.detach().cpu(), before.cpu())
