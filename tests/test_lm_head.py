"""The chunked LM head's logits budget: the chunks that fit it keep their logits for the backward,
the others recompute them, and the gradients are the same bit for bit; the budget bounds what is kept.
The elementwise work on a chunk runs a block of rows at a time: the blocks change no bit either."""

from __future__ import annotations

import itertools

import pytest
import torch

from iftune import lm_head
from iftune.errors import UserError
from iftune.lm_head import _LinearChunkLogProb, budget_positions, intuition_from_hidden, token_logprobs
from iftune.objective import IFTOptions

V, H, N, CHUNK = 37, 8, 23, 5


def _setup(dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=bias).to(dtype)
    hidden = torch.randn(N, H, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    return head, hidden, targets


def _grads(head, hidden, targets, budget, scale=1.0, autocast=False):
    params = [hidden, *head.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logp = token_logprobs(hidden, head, targets, chunk_size=CHUNK, scale=scale, logits_budget_mb=budget)
    return logp, torch.autograd.grad((logp.exp() * 1.3 + logp).sum(), params)


def _mb(positions: int, element_size: int = 4) -> float:
    return positions * V * element_size / 2**20


@pytest.fixture(params=["one block", "2-row blocks"])
def blocks(request, monkeypatch):
    """The chunks' elementwise work in one block per chunk, or in blocks of 2 rows (weight gradient: 9 rows)."""
    if request.param == "2-row blocks":
        monkeypatch.setattr(lm_head, "_BLOCK_ELEMENTS", 2 * V)
    return request.param


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1.7])
def test_kept_logits_give_the_recomputed_gradients_bit_for_bit(scale, autocast, blocks):
    head, hidden, targets = _setup()
    size = 2 if autocast else 4  # bf16 logits under autocast: half the bytes per position
    recomputed = _grads(head, hidden, targets, 0, scale, autocast)
    for budget in (_mb(2 * CHUNK, size), _mb(N, size), None):  # some chunks, all, the default (all here)
        kept = _grads(head, hidden, targets, budget, scale, autocast)
        assert torch.equal(kept[0], recomputed[0])
        for a, b in zip(kept[1], recomputed[1], strict=True):
            assert torch.equal(a, b)


def test_kept_and_recomputed_match_autograd_on_full_logits(blocks):
    head, hidden, targets = _setup(torch.float64)
    logits = head(hidden) * 1.7
    ref = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    params = [hidden, *head.parameters()]
    ref_grads = torch.autograd.grad((ref.exp() * 1.3 + ref).sum(), params)
    for budget in (0, _mb(2 * CHUNK, 8), None):
        logp, grads = _grads(head, hidden, targets, budget, scale=1.7)
        torch.testing.assert_close(logp, ref, atol=1e-12, rtol=0)
        for a, b in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kept", [0, 7, 100])
def test_chunked_function_gradcheck(kept, blocks):
    head, hidden, targets = _setup(torch.float64)

    def fn(h, w, b):
        return _LinearChunkLogProb.apply(h, w, b, targets, 1.7, None, CHUNK, kept)

    assert torch.autograd.gradcheck(fn, (hidden, head.weight, head.bias))


@pytest.mark.parametrize("chunks", [0, 1, 3])
def test_kept_logits_stay_within_the_budget(chunks):
    """What the head saves for its backward: the (positions, V) logits of the whole chunks that
    fit the budget, nothing of the others."""
    head, hidden, targets = _setup()
    budget = _mb(chunks * CHUNK + 2)  # two positions short of one more chunk
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs(hidden, head, targets, chunk_size=CHUNK, logits_budget_mb=budget)
    logits = [t for t in saved if t.dim() == 2 and t.shape[-1] == V and t is not head.weight]
    assert [t.shape[0] for t in logits] == [CHUNK] * chunks
    assert sum(t.numel() * t.element_size() for t in logits) <= budget * 2**20


def test_budget_positions_and_bad_budget():
    assert budget_positions(1.0, 2**18) == 1  # 1 MiB of float32 logits over 262,144 tokens
    assert budget_positions(1.0, 2**18, 2) == 2
    assert budget_positions(0, 10) == 0
    with pytest.raises(UserError, match="head_logits_budget_mb"):  # checked once, with the other options
        IFTOptions(head_logits_budget_mb=-1)


def test_intuition_pass_same_with_a_budget_sized_chunk():
    head, hidden, targets = _setup()
    a = intuition_from_hidden(hidden, head, targets, chunk_size=CHUNK)
    b = intuition_from_hidden(hidden, head, targets, logits_budget_mb=_mb(N))
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("dtype", "autocast", "scale", "bias"),
    list(itertools.product([torch.float32, torch.bfloat16], [False, True], [1.0, 1.7], [False, True])),
)
def test_row_blocks_change_no_bit(monkeypatch, dtype, autocast, scale, bias):
    """Log-probs and every gradient, with and without kept logits, in float32 or bfloat16 weights,
    with or without autocast (half-precision weight-gradient products summed in float32 a block
    at a time): the same bits in 2-row blocks as in one block per chunk."""
    head, hidden, targets = _setup(dtype, bias)
    size = 2 if autocast or dtype == torch.bfloat16 else 4

    def run():
        return [_grads(head, hidden, targets, budget, scale, autocast) for budget in (0, _mb(2 * CHUNK, size))]

    whole = run()
    monkeypatch.setattr(lm_head, "_BLOCK_ELEMENTS", 2 * V)
    for (logp_a, grads_a), (logp_b, grads_b) in zip(whole, run(), strict=True):
        assert torch.equal(logp_a, logp_b)
        for a, b in zip(grads_a, grads_b, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("autocast", [False, True])
def test_intuition_pass_logp_in_row_blocks(monkeypatch, autocast):
    """The intuition pass's teacher-forced log-probs, a block of rows at a time, are log_softmax's
    (up to float rounding) and the same bits as in one block; the choices are the argmax."""
    head, hidden, targets = _setup()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = head(hidden).float()
        whole = intuition_from_hidden(hidden, head, targets, chunk_size=CHUNK)
        monkeypatch.setattr(lm_head, "_BLOCK_ELEMENTS", 2 * V)
        blocked = intuition_from_hidden(hidden, head, targets, chunk_size=CHUNK)
    assert torch.equal(whole[0], blocked[0]) and torch.equal(whole[1], blocked[1])
    assert torch.equal(blocked[0], logits.argmax(-1))
    ref = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(blocked[1], ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("budget", [0, None])
def test_autocast_gradients_match_autograd_on_full_logits(budget, blocks):
    """Under bf16 autocast with float32 weights (half-precision products per chunk, summed in
    float32): autograd through the whole head's bf16 logits, up to bf16 rounding."""
    head, hidden, targets = _setup()
    params = [hidden, *head.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.log_softmax(head(hidden).float() * 1.7, -1).gather(-1, targets[:, None]).squeeze(-1)
    ref_grads = torch.autograd.grad((ref.exp() * 1.3 + ref).sum(), params)
    logp, grads = _grads(head, hidden, targets, budget, scale=1.7, autocast=True)
    torch.testing.assert_close(logp, ref, atol=1e-6, rtol=0)  # the same bf16 logits, widened
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("with_logp", [False, True])
def test_greedy_choice_in_widened_blocks_is_the_first_maximum(monkeypatch, with_logp):
    """The greedy choice, taken on float32-widened blocks of bf16 logits, is the bf16 logits'
    argmax, first maximum on ties (bf16 logits tie often)."""
    head, hidden, targets = _setup(torch.bfloat16)
    with torch.no_grad():  # small integer logits: many ties
        head.weight.copy_(torch.randint(-1, 2, head.weight.shape))
        head.bias.zero_()
        hidden = hidden.round()
        logits = head(hidden)
    assert (logits == logits.max(-1, keepdim=True).values).sum(-1).gt(1).any()  # ties are exercised
    monkeypatch.setattr(lm_head, "_BLOCK_ELEMENTS", 2 * V)
    preds, _ = intuition_from_hidden(hidden, head, targets, chunk_size=CHUNK, with_logp=with_logp)
    assert torch.equal(preds, logits.argmax(-1))
