"""bf16 training on CPU, the way a bf16 GPU runs it: IFTTrainer with `bf16=True` (accelerate
wraps the model's forward in torch's CPU autocast) on bf16 or float32 weights, against the
float32 computation of the same weights.

Tolerance: bf16 keeps 8 significant bits, a relative rounding error of 2**-8 ~ 0.4% per
operation. Through two decoder layers, the LM head and a log-sum-exp these add up to a few such
steps (about 1% of a gradient's norm for this model), so the loss must agree within 1% and each
gradient tensor within 5% of its norm, pointing the same way (cosine >= 0.998). A real bug (a
float32 head against bf16 weights, a missing autocast in a backward, a wrong scale) crashes or
is off by far more. The weights are spread (initializer_range 0.1) so that the logits' gaps
exceed bf16's rounding: the greedy intuition, a discontinuous choice, is the same in both runs
(checked first), so the two computations differ by precision alone.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import build_model, build_tokenizer, conversations
from iftune.trainer import IFTConfig, IFTTrainer

LOSS_RTOL, GRAD_RTOL, MIN_COSINE = 1e-2, 0.05, 0.998
INIT = 0.1  # weight std: logit gaps wider than bf16 rounding


def tiny(vocab: int, dtype: torch.dtype) -> torch.nn.Module:
    """The same tiny Llama in `dtype`, its weights rounded to bf16 first (exact in both)."""
    return build_model(vocab, initializer_range=INIT).to(torch.bfloat16).to(dtype)


class LogitDtypes(TorchDispatchMode):
    """Records the dtype of every matmul that produces logits (last dimension = vocabulary),
    as dispatched after autocast's casts: forward heads and the backward's recomputed logits."""

    MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear")

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.dtypes = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name in self.MATMULS and out.shape[-1] == self.vocab:
            self.dtypes.append(out.dtype)
        return out


def step(tmp_path, model: torch.nn.Module, bf16: bool, **options) -> tuple[float, dict, torch.Tensor]:
    """One IFTTrainer loss and backward through the model accelerate prepares for `bf16`:
    (loss, gradients in float32, greedy predictions of the prepared model's own forward).
    Checks on the way that every logit matmul ran in bf16 with `bf16`, in float32 without."""
    tok = build_tokenizer()
    args = IFTConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=bf16,
        report_to="none",
        disable_tqdm=True,
        per_device_train_batch_size=8,
        max_steps=1,
        logging_steps=1,
        seed=3,
        **options,
    )
    trainer = IFTTrainer(
        model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(conversations(8, seed=2))
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    prepared = trainer.accelerator.prepare_model(trainer.model)
    prepared.train()
    with torch.no_grad():
        preds = prepared(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    with LogitDtypes(len(tok)) as logits:
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(prepared, batch)
        trainer.accelerator.backward(loss)
    # Under bf16 mixed precision every logit matmul (the model's, iftune's head in both passes
    # and in its backward) runs in bf16, as on a GPU; without it, in float32.
    assert logits.dtypes and set(logits.dtypes) == {torch.bfloat16 if bf16 else torch.float32}, logits.dtypes
    grads = {n: p.grad.float() for n, p in trainer.model.named_parameters()}
    trained = batch["labels"][:, 1:] != -100
    return loss.item(), grads, preds[:, :-1][trained]


def assert_close_in_bf16(low: tuple, ref: tuple) -> None:
    (loss, grads, preds), (loss_ref, grads_ref, preds_ref) = low, ref
    assert torch.equal(preds, preds_ref), "bf16 changed the greedy intuition: the comparison is not like for like"
    assert loss == pytest.approx(loss_ref, rel=LOSS_RTOL)
    for name, g in grads.items():
        r = grads_ref[name]
        assert r.norm() > 0, name
        rel = ((g - r).norm() / r.norm()).item()
        cos = torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0).item()
        assert rel <= GRAD_RTOL and cos >= MIN_COSINE, (name, rel, cos)


@pytest.mark.parametrize("chunk", [None, 3], ids=["one-head-chunk", "head-chunks-of-3"])
def test_bf16_weights_with_bf16_autocast_match_float32(tmp_path, chunk):
    """The recipes' `dtype: bfloat16` + `bf16: true` (pure bf16 weights, autocast)."""
    vocab = len(build_tokenizer())
    low, ref = tiny(vocab, torch.bfloat16), tiny(vocab, torch.float32)
    result = step(tmp_path / "bf16", low, bf16=True, head_chunk_size=chunk)
    assert all(p.grad.dtype == torch.bfloat16 for p in low.parameters())
    assert_close_in_bf16(result, step(tmp_path / "fp32", ref, bf16=False, head_chunk_size=chunk))


@pytest.mark.parametrize("chunk", [None, 3], ids=["one-head-chunk", "head-chunks-of-3"])
def test_float32_weights_with_bf16_autocast_match_float32(tmp_path, chunk):
    """`bf16: true` on float32 weights (fp32 master weights, bf16 compute)."""
    vocab = len(build_tokenizer())
    models = [tiny(vocab, torch.float32), tiny(vocab, torch.float32)]
    result = step(tmp_path / "autocast", models[0], bf16=True, head_chunk_size=chunk)
    assert_close_in_bf16(result, step(tmp_path / "fp32", models[1], bf16=False, head_chunk_size=chunk))
