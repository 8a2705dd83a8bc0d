"""Micro-batches that change how much work the IFT objective has to do: random text, text the
model predicts perfectly (no intuitive token differs from the input), and no trained token.
Used by the call-count test and by the 2-process gradient harness (tests/scripts/dist_grads.py)."""

from __future__ import annotations

import torch

from iftune.modeling import IGNORE_INDEX

ROWS, LENGTH, PROMPT = 2, 16, 4
FIRST_WORD = 7  # ids below are the tokenizer's special tokens (conftest.build_tokenizer)


def normal_batch(vocab: int, seed: int, trained_from: tuple[int, ...] = (4, 9)) -> dict:
    """Random words; row r is trained from position trained_from[r] on (before it: the prompt)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_WORD, vocab, (len(trained_from), LENGTH), generator=g)
    labels = ids.clone()
    for r, start in enumerate(trained_from):
        labels[r, :start] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


@torch.no_grad()
def perfect_batch(model: torch.nn.Module, vocab: int, seed: int) -> dict:
    """Prompts of PROMPT random words continued greedily by `model`, computed on the whole
    sequence (the intuition pass's forward), so every trained token is the model's argmax."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_WORD, vocab, (ROWS, LENGTH), generator=g)
    for _ in range(LENGTH):  # causal: each round fixes at least one more position
        greedy = model(input_ids=ids).logits[:, PROMPT - 1 : -1].argmax(-1)
        new = torch.cat([ids[:, :PROMPT], greedy], dim=1)
        if torch.equal(new, ids):
            break
        ids = new
    assert torch.equal(model(input_ids=ids).logits[:, PROMPT - 1 : -1].argmax(-1), ids[:, PROMPT:])
    labels = ids.clone()
    labels[:, :PROMPT] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def empty_batch(vocab: int, seed: int) -> dict:
    """Random words, every label -100: a micro-batch with no trained token."""
    batch = normal_batch(vocab, seed)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    return batch
