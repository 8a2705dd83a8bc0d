"""The chunked LM head's logits budget: the chunks that fit it keep their logits for the backward,
the others recompute them, and the gradients are the same bit for bit; the budget bounds what is kept."""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1.7])
def test_kept_logits_give_the_recomputed_gradients_bit_for_bit(scale, autocast):
    head, hidden, targets = _setup()
    size = 2 if autocast else 4  # bf16 logits under autocast: half the bytes per position
    recomputed = _grads(head, hidden, targets, 0, scale, autocast)
    for budget in (_mb(2 * CHUNK, size), _mb(N, size), None):  # some chunks, all, the default (all here)
        kept = _grads(head, hidden, targets, budget, scale, autocast)
        assert torch.equal(kept[0], recomputed[0])
        for a, b in zip(kept[1], recomputed[1], strict=True):
            assert torch.equal(a, b)


def test_kept_and_recomputed_match_autograd_on_full_logits():
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
def test_chunked_function_gradcheck(kept):
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
