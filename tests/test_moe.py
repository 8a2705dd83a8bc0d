"""Mixture-of-experts models train with their router load-balancing loss, added to IFT's loss as
SFTTrainer adds it to its own (TRL reads `router_aux_loss_coef=None` as the config's value)."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from conftest import build_tokenizer, conversations
from iftune.objective import ift_loss
from iftune.tiny import moe
from iftune.trainer import IFTConfig, IFTTrainer

FAMILIES = ("qwen3_moe", "mixtral")
CPU = dict(use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, max_steps=1, logging_steps=1)


def tiny_moe(family: str, vocab: int) -> torch.nn.Module:
    # float32: the experts' grouped matmul has no float64 kernel
    return moe(family, vocab, router_aux_loss_coef=0.05)


def trainers(tmp_path, family: str, **options):
    """An IFTTrainer (lam 0, gamma 0: SFT's objective) and an SFTTrainer on copies of one model,
    one conversation per batch (so IFT's per-sequence mean is SFT's per-token mean)."""
    tok = build_tokenizer()
    model = tiny_moe(family, len(tok))
    data = Dataset.from_list(conversations(4, seed=7))
    common = dict(CPU, per_device_train_batch_size=1, bf16=False, **options)
    ift = IFTTrainer(
        copy.deepcopy(model),
        IFTConfig(str(tmp_path / "ift"), max_lambda=0.0, min_lambda=0.0, gamma=0.0, **common),
        train_dataset=data,
        processing_class=tok,
    )
    sft = SFTTrainer(
        copy.deepcopy(model),
        SFTConfig(str(tmp_path / "sft"), assistant_only_loss=True, **common),
        train_dataset=data,
        processing_class=tok,
    )
    return ift, sft


def first_batch(trainer) -> dict:
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_trains_with_its_router_loss_as_sft_does(tmp_path, family):
    ift, sft = trainers(tmp_path, family)
    assert ift.aux_loss_enabled and ift.router_aux_loss_coef == pytest.approx(0.05)  # from the config
    batch = first_batch(ift)
    ift_total = ift.compute_loss(ift.model, dict(batch))
    sft_total = sft.compute_loss(sft.model, dict(batch))
    assert ift_total.item() == pytest.approx(sft_total.item(), rel=1e-5)
    # The aux term is there (not zero), taken once, from the training pass only.
    out = ift_loss(ift.model, batch["input_ids"], batch["labels"], batch["attention_mask"], lam=0.0, gamma=0.0)
    assert out.aux_loss is not None and out.aux_loss.requires_grad and out.aux_loss.item() > 0
    assert ift_total.item() == pytest.approx((out.loss + 0.05 * out.aux_loss).item(), rel=1e-5)
    assert ift._metrics["train"]["aux_loss"] == [pytest.approx(out.aux_loss.item(), rel=1e-5)]
    # The aux loss's gradient reaches the routers, as SFT's does.
    ift_total.backward()
    sft_total.backward()
    for (name, a), (_, b) in zip(ift.model.named_parameters(), sft.model.named_parameters()):
        if "gate" in name and a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_router_aux_loss_coef_zero_turns_it_off(tmp_path, family):
    ift, sft = trainers(tmp_path, family, router_aux_loss_coef=0.0)
    assert not ift.aux_loss_enabled
    batch = first_batch(ift)
    plain = ift_loss(ift.model, batch["input_ids"], batch["labels"], batch["attention_mask"], lam=0.0, gamma=0.0)
    assert plain.aux_loss is None  # TRL turns the model's router logits off
    assert ift.compute_loss(ift.model, dict(batch)).item() == pytest.approx(plain.loss.item(), rel=1e-6)
    assert ift.compute_loss(ift.model, dict(batch)).item() == pytest.approx(
        sft.compute_loss(sft.model, dict(batch)).item(), rel=1e-9
    )
    assert "aux_loss" not in ift._metrics["train"]
