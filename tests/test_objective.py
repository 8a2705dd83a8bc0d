"""Tests of the IFT objective (`iftune.objective`, `iftune.lm_head`) against its specification,
docs/objective.md.

Reference values are computed independently here: float64 Python loops written from that page,
and the SFT loss from a plain `model(input_ids).logits`. Models are tiny Llamas built from a
config (nothing is downloaded), in float64 wherever exactness is checked.
"""

from __future__ import annotations

import copy
import itertools
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import LlamaForCausalLM

from iftune.errors import UserError
from iftune.lm_head import intuition_from_hidden
from iftune.objective import (
    IFTOptions,
    discounted_cumsum,
    ift_loss,
    intuitive_tokens,
    mix_embeddings,
    relation_weights,
)
from iftune.tiny import llama

VOCAB = 48
PROPAGATIONS = ("loss", "logps", "mask")
SIDES = ("left", "right")
NORMS = ("L1", "L2", "softmax", "log")


# --------------------------------------------------------------------------- helpers


def make_model(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    """The tests' tiny Llama in float64, without a padding row (every token id trains). sdpa, not
    eager: eager attention takes its softmax in float32, whose summation order depends on the row
    length and the CPU's vector width, so a padded row would match the same row alone only to ~1e-9."""
    model = llama(VOCAB, seed, max_position_embeddings=64, tie_word_embeddings=tie, attn_implementation="sdpa",
                  pad_token_id=None, bos_token_id=None, eos_token_id=None)  # fmt: skip
    return model.double()


@pytest.fixture
def model() -> LlamaForCausalLM:
    return make_model()


def batch(seed: int = 1, b: int = 3, t: int = 10, prompt: int = 3):
    """Random ids; the first `prompt` positions of each row are untrained."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return ids, labels


def sft_reference(model, ids, labels, attention_mask=None) -> torch.Tensor:
    """Per-sequence-mean SFT loss from the model's own logits (rows without tokens skipped)."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = labels[:, 1:] != -100
    per_row = [(-logp[b][mask[b]]).mean() for b in range(ids.shape[0]) if mask[b].any()]
    return torch.stack(per_row).mean()


def loop_discounted_cumsum(row: list[float], gamma: float, reverse: bool) -> list[float]:
    """y_t = sum_{s<=t} gamma^(t-s) x_s (reverse: s>=t), by the recurrence, in Python floats."""
    seq = row[::-1] if reverse else row
    out, acc = [], 0.0
    for v in seq:
        acc = gamma * acc + v
        out.append(acc)
    return out[::-1] if reverse else out


def loop_relation_weights(logps, mask, gamma, propagation, side, norm) -> torch.Tensor:
    """The spec's relation_weights, written out position by position in float64."""
    lp, m = logps.double().tolist(), mask.double().tolist()
    b_size, t_size = len(lp), len(lp[0])
    n = [sum(r) for r in m]
    if gamma == 0:
        return torch.tensor(m, dtype=torch.float64)
    item = [[0.0] * t_size for _ in range(b_size)]
    for b, t in itertools.product(range(b_size), range(t_size)):
        if m[b][t]:
            item[b][t] = {"mask": 1.0, "loss": -lp[b][t] / n[b], "logps": -lp[b][t]}[propagation]
    w = [[0.0] * t_size for _ in range(b_size)]
    for b, t in itertools.product(range(b_size), range(t_size)):
        span = range(t, t_size) if side == "left" else range(0, t + 1)
        w[b][t] = sum(gamma ** abs(s - t) * item[b][s] for s in span)
    if side == "left":
        w = [[w[b][t] if m[b][t] else 0.0 for t in range(t_size)] for b in range(b_size)]
        if norm == "L2":
            w = [[v * v for v in r] for r in w]
        elif norm == "log":
            w = [[math.log(v + 1) for v in r] for r in w]
        elif norm == "softmax":
            w = [[math.exp(v) / sum(math.exp(u) for u in r) for v in r] for r in w]
    else:
        w = [[w[b][t] if m[b][t] else 1e6 for t in range(t_size)] for b in range(b_size)]
        smallest = min(v for r in w for v in r if v != 0)
        w = [[v + smallest for v in r] for r in w]
        if norm == "L1":
            w = [[1 / v for v in r] for r in w]
        elif norm == "L2":
            w = [[1 / v**2 for v in r] for r in w]
        elif norm == "log":
            w = [[1 / math.log(v + 1) for v in r] for r in w]
        else:
            w = [[math.exp(1 / v) / sum(math.exp(1 / u) for u in r) for v in r] for r in w]
    for b in range(b_size):
        w[b] = [v * mt for v, mt in zip(w[b], m[b])]
        total = sum(w[b])
        w[b] = [v * n[b] / total if n[b] else 0.0 for v in w[b]]
    return torch.tensor(w, dtype=torch.float64)


def small_case():
    """3 x 5 log-probs: two rows with different masks, one row with no trained token.
    Masked entries hold garbage, which must not matter."""
    logps = torch.tensor(
        [
            [-0.3, -2.0, -0.7, -1.1, 7.0],
            [9.0, -0.05, -3.0, -0.4, -1.6],
            [-1.0, -1.0, -1.0, -1.0, -1.0],
        ],
        dtype=torch.float64,
    )
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    return logps, mask


# --------------------------------------------------------------------------- discounted_cumsum


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.95, 0.999, 1.0])
@pytest.mark.parametrize("t", [1, 2, 7, 513, 8192])
def test_discounted_cumsum_matches_loop(t, gamma, reverse):
    torch.manual_seed(t)
    positive = torch.rand(2, t, dtype=torch.float64) + 0.01
    mixed = torch.randn(2, t, dtype=torch.float64)
    for x in (positive, mixed):
        ref = torch.tensor([loop_discounted_cumsum(r, gamma, reverse) for r in x.tolist()], dtype=torch.float64)
        got = discounted_cumsum(x, gamma, reverse=reverse)
        assert got.shape == x.shape and got.dtype == torch.float64
        if x is positive:  # every output is positive: element-wise relative error
            assert ((got - ref).abs() / ref.abs()).max() <= 1e-5
        else:  # cancellations: error relative to the largest magnitude of the row
            scale = ref.abs().amax(-1, keepdim=True)
            assert ((got - ref).abs() / scale).max() <= 1e-5
    # float32 input: still within 1e-5 of the float64 loop on positive data.
    ref = torch.tensor([loop_discounted_cumsum(r, gamma, reverse) for r in positive.tolist()], dtype=torch.float64)
    got32 = discounted_cumsum(positive.float(), gamma, reverse=reverse)
    assert got32.dtype == torch.float32
    assert ((got32.double() - ref).abs() / ref).max() <= 1e-5


def test_discounted_cumsum_leading_dims_and_special_gammas():
    x = torch.randn(2, 3, 11, dtype=torch.float64)
    y = discounted_cumsum(x, 0.7, reverse=True)
    for i, j in itertools.product(range(2), range(3)):
        ref = loop_discounted_cumsum(x[i, j].tolist(), 0.7, True)
        assert torch.allclose(y[i, j], torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.allclose(discounted_cumsum(x, 1.0), x.cumsum(-1), atol=1e-12)
    assert torch.allclose(discounted_cumsum(x, 1.0, reverse=True), x.flip(-1).cumsum(-1).flip(-1), atol=1e-12)
    assert torch.equal(discounted_cumsum(x, 0.0), x)
    assert torch.equal(discounted_cumsum(x, 0.0, reverse=True), x)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("t", [1, 7, 20])
def test_discounted_cumsum_gradcheck(t, gamma, reverse):
    x = torch.randn(2, t, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: discounted_cumsum(v, gamma, reverse=reverse), (x,))


# --------------------------------------------------------------------------- relation_weights


@pytest.mark.parametrize("gamma", [0.5, 0.95, 1.0])
@pytest.mark.parametrize("propagation,side,norm", list(itertools.product(PROPAGATIONS, SIDES, NORMS)))
def test_relation_weights_match_spec_loop(propagation, side, norm, gamma):
    logps, mask = small_case()
    w = relation_weights(logps, mask, gamma, propagation, side, norm)
    ref = loop_relation_weights(logps, mask, gamma, propagation, side, norm)
    assert torch.allclose(w, ref, rtol=1e-9, atol=1e-12), (w, ref)
    # Invariants: rows sum to their token count, zero where untrained, never NaN.
    assert torch.isfinite(w).all()
    assert torch.allclose(w.sum(-1), mask.sum(-1).double(), atol=1e-12)
    assert (w[~mask] == 0).all()
    assert torch.equal(w[2], torch.zeros(5, dtype=torch.float64))


def test_relation_weights_hand_values():
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    logps = torch.tensor([[-1.0, -2.0, -3.0, 0.0]], dtype=torch.float64)
    # Eq. 22 read literally: with gamma = 1, token t counts itself and the later tokens: 3, 2, 1.
    w = relation_weights(logps, mask, 1.0, "mask", "left", "L1")
    assert torch.allclose(w, torch.tensor([[1.5, 1.0, 0.5, 0.0]], dtype=torch.float64))
    # Loss propagation, gamma 0.5, left, L1: item = (1, 2, 3) / 3; w ~ (1 + 1 + 0.75, 2 + 1.5, 3) / 3.
    raw = torch.tensor([2.75, 3.5, 3.0], dtype=torch.float64)
    w = relation_weights(logps, mask, 0.5, "loss", "left", "L1")
    assert torch.allclose(w[0, :3], raw * 3 / raw.sum())
    # Right, L1, "logps", gamma 1: cumsum (1, 3, 6), + smallest non-zero 1 -> (2, 4, 7), inverted.
    inv = torch.tensor([1 / 2, 1 / 4, 1 / 7], dtype=torch.float64)
    w = relation_weights(logps, mask, 1.0, "logps", "right", "L1")
    assert torch.allclose(w[0, :3], inv * 3 / inv.sum())
    assert w[0, 3] == 0


@pytest.mark.parametrize("propagation,side,norm", list(itertools.product(PROPAGATIONS, SIDES, NORMS)))
def test_relation_weights_gamma_zero_is_sft(propagation, side, norm):
    logps, mask = small_case()
    w = relation_weights(logps, mask, 0.0, propagation, side, norm)
    assert torch.equal(w, mask.double())


def test_relation_weights_empty_batch_row_and_all_empty():
    logps = torch.zeros(2, 6, dtype=torch.float64)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    for propagation, side, norm in itertools.product(PROPAGATIONS, SIDES, NORMS):
        w = relation_weights(logps, mask, 0.95, propagation, side, norm)
        assert torch.equal(w, torch.zeros_like(w)), (propagation, side, norm)


@pytest.mark.parametrize("propagation", ["loss", "logps"])
@pytest.mark.parametrize("side", SIDES)
def test_relation_weights_gradient_and_detach(propagation, side):
    logps, mask = small_case()
    probe = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)  # rows sum to n: a plain sum has no gradient
    x = logps.clone().requires_grad_(True)
    (relation_weights(x, mask, 0.9, propagation, side, "L1") * probe).sum().backward()
    assert x.grad is not None and x.grad[mask].abs().sum() > 0
    assert (x.grad[~mask] == 0).all()  # garbage in untrained slots never matters
    w = relation_weights(logps.clone().requires_grad_(True), mask, 0.9, propagation, side, "L1", detach=True)
    assert not w.requires_grad


# --------------------------------------------------------------------------- tokens and embeddings


def test_intuitive_tokens_rules():
    ids = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]])
    labels = ids.clone()
    labels[0, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding
    preds = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 30, 31, 32]])
    further = intuitive_tokens(ids, labels, preds)
    assert further.tolist() == [[10, 11, 2, 3, 4, 5], [20, 7, 8, 9, 24, 25]]
    # The first position keeps its id even when it is a trained label.
    labels[1, 0] = 20
    assert intuitive_tokens(ids, labels, preds)[1, 0] == 20
    # Packed: the second document starts at column 3 (position 0) and keeps its own id.
    pos = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    packed = intuitive_tokens(ids, labels, preds, position_ids=pos)
    assert packed.tolist() == [[10, 11, 2, 13, 4, 5], [20, 7, 8, 9, 24, 25]]


def test_mix_embeddings():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    assert torch.equal(mix_embeddings(a, b, 0.0), a)
    assert torch.equal(mix_embeddings(a, b, 1.0), b)
    assert torch.allclose(mix_embeddings(a, b, 0.25), 0.75 * a + 0.25 * b)
    assert torch.allclose(mix_embeddings(a, b, torch.tensor(0.25, dtype=torch.float64)), 0.75 * a + 0.25 * b)
    with pytest.raises(ValueError, match="lam"):  # options are checked once, where they are built
        IFTOptions(lam=1.5)


# --------------------------------------------------------------------------- ift_loss


def test_sft_equivalence(model):
    ids, labels = batch()
    labels[1, 6:] = -100  # rows with different token counts: the per-sequence mean matters
    ref = sft_reference(model, ids, labels)
    out = ift_loss(model, ids, labels, lam=0.0, gamma=0.0)
    assert out.loss.dtype == torch.float64
    assert abs(out.loss.item() - ref.item()) < 1e-6
    assert abs(out.sft_loss.item() - ref.item()) < 1e-6
    assert abs(out.intuitive_nll.item() - ref.item()) < 1e-6
    assert out.n_tokens.item() == int((labels[:, 1:] != -100).sum())
    # The intuition pass's teacher-forced NLL does not depend on lam; the IFT loss does.
    mixed = ift_loss(model, ids, labels, lam=0.2, gamma=0.0)
    assert abs(mixed.sft_loss.item() - ref.item()) < 1e-6
    assert abs(mixed.loss.item() - ref.item()) > 1e-4
    # gamma > 0 reweights tokens (a random model is near uniform, so the change is small).
    assert abs(ift_loss(model, ids, labels, lam=0.0, gamma=0.95).loss.item() - ref.item()) > 1e-6


def test_intuition_accuracy(model):
    ids, labels = batch()
    with torch.no_grad():
        greedy = model(input_ids=ids).logits.argmax(-1)
    mask = labels[:, 1:] != -100
    ids2 = ids.clone()
    ids2[0, 5] = greedy[0, 4]  # at least one hit (position 4's choice only sees positions <= 4)
    labels2 = torch.where(labels == -100, labels, ids2)
    with torch.no_grad():
        greedy2 = model(input_ids=ids2).logits.argmax(-1)
    expected = (greedy2[:, :-1] == ids2[:, 1:])[mask].double().mean().item()
    out = ift_loss(model, ids2, labels2)
    assert expected > 0
    assert abs(out.intuition_accuracy.item() - expected) < 1e-6


def test_gradient_reaches_embeddings_and_head(model):
    ids, labels = batch()
    ift_loss(model, ids, labels).loss.backward()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.data_ptr() != head.data_ptr()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert head.grad is not None and head.grad.abs().sum() > 0


def test_gradient_reaches_intuitive_token_rows(model):
    # Inputs drawn from ids < 8 only; the model's choices fall mostly outside, so the rows that
    # only enter through E[further] (eq. 17, live table) show whether that path is trained.
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 8, (3, 10), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        greedy = model(input_ids=ids).logits.argmax(-1)
    intuitive = set(greedy[:, 2:-1].flatten().tolist()) - set(range(8))
    assert intuitive
    ift_loss(model, ids, labels, lam=0.3).loss.backward()
    moved = {v for v in range(VOCAB) if model.get_input_embeddings().weight.grad[v].abs().sum() > 0}
    assert moved == set(ids.flatten().tolist()) | intuitive


def _record_embedding_calls(model):
    calls = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda mod, args, out: calls.append((args[0].clone(), torch.is_grad_enabled()))
    )
    return calls, handle


@pytest.mark.parametrize("intuition,k", [("greedy", 1), ("rank", 1), ("rank", 2)])
def test_intuitive_tokens_in_ift_loss(model, intuition, k):
    ids, labels = batch()
    labels[2, 7:] = -100
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    choice = logits.topk(k, -1).indices[..., -1]
    expected = ids.clone()
    expected[:, 1:] = torch.where(labels[:, 1:] == -100, ids[:, 1:], choice[:, :-1])
    calls, handle = _record_embedding_calls(model)
    try:
        ift_loss(model, ids, labels, intuition=intuition, intuition_k=k)
    finally:
        handle.remove()
    # The intuition pass's own lookup, then one of the whole batch twice whatever the data:
    # E[input_ids] and E[intuitive tokens], concatenated (one scatter-add in the backward).
    assert (expected != ids).any()
    assert [(tuple(x.shape), grad) for x, grad in calls] == [
        (tuple(ids.shape), False),
        ((2 * len(ids), ids.shape[1]), True),
    ]
    assert torch.equal(calls[1][0], torch.cat([ids, expected]))


def test_rank_one_is_greedy_and_sample_is_seeded(model):
    ids, labels = batch()
    greedy = ift_loss(model, ids, labels).loss
    assert torch.equal(ift_loss(model, ids, labels, intuition="rank", intuition_k=1).loss, greedy)
    assert not torch.equal(ift_loss(model, ids, labels, intuition="rank", intuition_k=3).loss, greedy)

    def sample(seed: int, temperature: float = 1.0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return ift_loss(model, ids, labels, intuition="sample", intuition_temperature=temperature, generator=g).loss

    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))
    # A near-zero temperature puts all mass on the argmax.
    assert torch.allclose(sample(5, temperature=1e-6), greedy, rtol=0, atol=1e-12)


def test_intuition_pass_keeps_no_graph(model):
    ids, labels = batch()
    seen = []
    handle = model.model.register_forward_hook(
        lambda mod, args, out: seen.append((torch.is_grad_enabled(), out.last_hidden_state.requires_grad))
    )
    try:
        out = ift_loss(model, ids, labels)
    finally:
        handle.remove()
    assert seen == [(False, False), (True, True)]
    assert out.loss.requires_grad
    for metric in (out.sft_loss, out.intuitive_nll, out.intuition_accuracy, out.n_tokens):
        assert not metric.requires_grad
    hidden = torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True)
    preds, logp = intuition_from_hidden(hidden, model.lm_head, torch.zeros(2, 4, dtype=torch.long))
    assert not preds.requires_grad and not logp.requires_grad and preds.shape == (2, 4)


def test_right_padded_rows_equal_rows_alone(model):
    ids, labels = batch(seed=2, b=3, t=12)
    lengths = [12, 8, 6]
    attention = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        attention[b, :n] = 1
        ids[b, n:] = 0  # padding id
        labels[b, n:] = -100
    full = ift_loss(model, ids, labels, attention, lam=0.3, gamma=0.9)
    alone = [
        ift_loss(model, ids[b : b + 1, :n], labels[b : b + 1, :n], lam=0.3, gamma=0.9).loss
        for b, n in enumerate(lengths)
    ]
    assert torch.allclose(full.loss, torch.stack(alone).mean(), rtol=0, atol=1e-10)
    assert int(full.n_sequences) == 3
    # Each row alone but padded gives the same as that row unpadded; pad ids do not matter.
    for b, n in enumerate(lengths[1:], start=1):
        junk = ids[b : b + 1].clone()
        junk[0, n:] = 7
        padded = ift_loss(model, junk, labels[b : b + 1], attention[b : b + 1], lam=0.3, gamma=0.9).loss
        assert torch.allclose(padded, alone[b], rtol=0, atol=1e-10)


def test_row_without_tokens_is_skipped(model):
    ids, labels = batch(b=3)
    labels[1] = -100
    out = ift_loss(model, ids, labels)
    assert torch.isfinite(out.loss) and int(out.n_sequences) == 2
    others = [ift_loss(model, ids[b : b + 1], labels[b : b + 1]).loss for b in (0, 2)]
    assert torch.allclose(out.loss, torch.stack(others).mean(), rtol=0, atol=1e-10)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # No trained token at all: loss 0, not NaN.
    none = ift_loss(model, ids, torch.full_like(labels, -100))
    assert none.loss.item() == 0 and int(none.n_sequences) == 0 and torch.isfinite(none.sft_loss)


def test_packed_equals_padded_rows(model):
    # Without an attention mask, transformers reads the restarting position_ids as packed
    # documents and blocks attention across them (sdpa and eager alike), so the packed row is
    # the same computation as two padded rows: the whole loss is comparable, not just the weighting.
    g = torch.Generator().manual_seed(4)
    doc_a, doc_b = torch.randint(0, VOCAB, (7,), generator=g), torch.randint(0, VOCAB, (5,), generator=g)
    lab_a, lab_b = doc_a.clone(), doc_b.clone()
    lab_a[:2] = -100
    lab_b[:1] = -100
    packed_ids = torch.cat([doc_a, doc_b])[None]
    packed_labels = torch.cat([lab_a, doc_b])[None]  # doc_b's first label is trained: never across docs
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]

    rows = torch.zeros(2, 7, dtype=torch.long)
    row_labels = torch.full((2, 7), -100)
    attention = torch.zeros(2, 7, dtype=torch.long)
    rows[0], row_labels[0], attention[0] = doc_a, lab_a, 1
    rows[1, :5], row_labels[1, :5], attention[1, :5] = doc_b, lab_b, 1

    for kw in (dict(), dict(lam=0.0, gamma=0.0), dict(propagation="logps", norm="softmax")):
        packed = ift_loss(model, packed_ids, packed_labels, position_ids=pos, **kw)
        padded = ift_loss(model, rows, row_labels, attention, **kw)
        assert torch.allclose(packed.loss, padded.loss, rtol=0, atol=1e-10), kw
        assert torch.allclose(packed.sft_loss, padded.sft_loss, rtol=0, atol=1e-10)
        assert int(packed.n_tokens) == int(padded.n_tokens) == 5 + 4
        assert int(packed.n_sequences) == 2


def test_chunked_head_matches_one_chunk(model):
    ids, labels = batch()

    def run(chunk_size):
        model.zero_grad()
        out = ift_loss(model, ids, labels, head_chunk_size=chunk_size)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    one, grads_one = run(None)
    small, grads_small = run(3)
    assert torch.allclose(one.loss, small.loss, rtol=0, atol=1e-12)
    assert torch.allclose(one.sft_loss, small.sft_loss, rtol=0, atol=1e-12)
    assert grads_one.keys() == grads_small.keys() and len(grads_one) > 0
    for name in grads_one:
        assert torch.allclose(grads_one[name], grads_small[name], rtol=1e-9, atol=1e-12), name


def test_detach_weights_changes_gradient_not_loss(model):
    ids, labels = batch()
    a = ift_loss(model, ids, labels)
    b = ift_loss(model, ids, labels, detach_weights=True)
    assert torch.allclose(a.loss, b.loss, rtol=0, atol=1e-12)
    ga = torch.autograd.grad(a.loss, model.lm_head.weight)[0]
    gb = torch.autograd.grad(b.loss, model.lm_head.weight)[0]
    assert not torch.allclose(ga, gb)


def test_tied_model_works():
    model = make_model(tie=True)
    ids, labels = batch()
    assert (
        abs(ift_loss(model, ids, labels, lam=0.0, gamma=0.0).loss.item() - sft_reference(model, ids, labels).item())
        < 1e-6
    )


def _reference_loss(model, table, ids, labels, lam=0.3, gamma=0.9):
    """IFT as the reference code computes it: full logits, both terms of the mix looked up in
    `table` (the caller's copy), weights from `relation_weights`, per-row mean then batch mean."""
    with torch.no_grad():
        preds = model(input_ids=ids).logits.argmax(-1)
    further = ids.clone()
    further[:, 1:] = torch.where(labels[:, 1:] == -100, ids[:, 1:], preds[:, :-1])
    x = (1 - lam) * table(ids) + lam * table(further)
    logits = model(inputs_embeds=x).logits
    mask = labels[:, 1:] != -100
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask
    w = relation_weights(logp, mask, gamma)
    return ((-(logp * w)).sum(-1) / mask.sum(-1)).mean()


def _train(model, step_loss, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(steps):
        opt.zero_grad()
        step_loss(model, step).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_detached_embeddings_train_like_the_reference_over_several_steps():
    """The reference re-copies the live table after every optimizer step and mixes from the copy:
    with tied embeddings the table still trains through the head, so the copy moves."""
    ids, labels = batch(seed=4, b=4, t=12)
    ours = _train(
        make_model(tie=True),
        lambda m, _: ift_loss(m, ids, labels, lam=0.3, gamma=0.9, intuition_embeddings="detached").loss,
    )

    def refreshed(m, _):
        return _reference_loss(m, copy.deepcopy(m.get_input_embeddings()).requires_grad_(False), ids, labels)

    reference = _train(make_model(tie=True), refreshed)
    assert torch.allclose(ours, reference, rtol=0, atol=1e-10)
    # What the test tells apart: a copy made once (the old "frozen"), and the live table.
    start = copy.deepcopy(make_model(tie=True).get_input_embeddings()).requires_grad_(False)
    once = _train(make_model(tie=True), lambda m, _: _reference_loss(m, start, ids, labels))
    live = _train(make_model(tie=True), lambda m, _: ift_loss(m, ids, labels, lam=0.3, gamma=0.9).loss)
    assert (once - reference).abs().max() > 1e-6 and (live - reference).abs().max() > 1e-6


def test_frozen_embeddings_point_to_detached(model):
    ids, labels = batch()
    with pytest.raises(UserError, match="detached"):
        ift_loss(model, ids, labels, intuition_embeddings="frozen")


def test_peft_lora_model(model):
    from peft import LoraConfig, get_peft_model

    ids, labels = batch()
    plain = ift_loss(model, ids, labels).loss.detach()
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    out = ift_loss(lora, ids, labels)
    # LoRA's B starts at zero: the wrapped model computes the same function.
    assert torch.allclose(out.loss, plain, rtol=0, atol=1e-10)
    out.loss.backward()
    lora_grads = {n: p.grad for n, p in lora.named_parameters() if "lora_" in n}
    assert lora_grads and all(g is not None for g in lora_grads.values())
    assert any(g.abs().sum() > 0 for n, g in lora_grads.items() if "lora_B" in n)
    assert all(p.grad is None for n, p in lora.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize(
    "option,value",
    [
        ("lam", 1.5),
        ("lam", -0.1),
        ("gamma", -0.1),
        ("gamma", 1.01),
        ("norm", "L3"),
        ("side", "up"),
        ("propagation", "x"),
        ("intuition", "beam"),
    ],
)
def test_bad_options_raise(model, option, value):
    ids, labels = batch()
    with pytest.raises(ValueError, match=option):
        ift_loss(model, ids, labels, **{option: value})
    # Checked once, when the options object is built (the pure functions below it trust it).
    with pytest.raises(ValueError, match=option):
        IFTOptions(**{option: value})
    with pytest.raises(ValueError, match=option):
        ift_loss(model, ids, labels, IFTOptions(), **{option: value})


def test_position_ids_broadcast_over_batch(model):
    ids, labels = batch(b=2, t=8)
    pos = torch.arange(8)[None]
    broadcast = ift_loss(model, ids, labels, position_ids=pos).loss
    full = ift_loss(model, ids, labels, position_ids=pos.expand(2, -1)).loss
    assert torch.allclose(broadcast, full, rtol=0, atol=1e-12)
    assert torch.allclose(broadcast, ift_loss(model, ids, labels).loss, rtol=0, atol=1e-12)


def test_packed_rows_with_attention_mask_are_refused(model):
    # With an attention mask, transformers ignores the restart in position_ids and attends
    # across documents: a prediction would cross a document boundary.
    ids, labels = batch(b=1, t=8)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with pytest.raises(ValueError, match="attention_mask"):
        ift_loss(model, ids, labels, torch.ones_like(ids), position_ids=pos)
    # Right padding whose position ids restart at 0 (TRL's return_position_ids) is not packing.
    padded_pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    labels[0, 6:] = -100
    plain = ift_loss(model, ids, labels, attention).loss
    assert torch.allclose(
        ift_loss(model, ids, labels, attention, position_ids=padded_pos).loss, plain, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_linear_head_backward_is_exact(bias):
    """The hand-written backward of the chunked head against autograd (gradcheck, float64),
    and chunked against one chunk through `token_logprobs`, logit scale included."""
    from iftune.lm_head import _LinearChunkLogProb, token_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=bias).double()
    hidden = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (13,))
    params = (hidden, head.weight) + ((head.bias,) if bias else ())

    def fn(h, w, *b):
        return _LinearChunkLogProb.apply(h, w, b[0] if b else None, targets, 1.7)

    assert torch.autograd.gradcheck(fn, params)
    grads = []
    for chunk in (4, 100):  # 4: several chunks through the custom backward; 100: one stored chunk
        logp = token_logprobs(hidden, head, targets, chunk_size=chunk, scale=1.7)
        grads.append((logp, torch.autograd.grad((logp.exp() * 1.3 + logp).sum(), params)))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-12, rtol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_unknown_keyword_is_refused_not_forwarded(model):
    ids, labels = batch()
    with pytest.raises(TypeError, match="chunk_size"):
        ift_loss(model, ids, labels, chunk_size=8)
