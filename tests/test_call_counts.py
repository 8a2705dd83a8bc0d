"""The IFT step makes the same module calls whatever its data.

Sharded training (FSDP2, ZeRO-3) gathers a module's weights in hooks around each call of that
module, and every rank must issue the same collectives: so the number of calls of the input
embedding and of the LM head in one step (forward and backward) may not depend on the batch.
"""

from __future__ import annotations

import pytest
import torch

from batches import empty_batch, normal_batch, perfect_batch
from conftest import build_model, build_tokenizer
from iftune.objective import ift_loss

CHUNK = 8  # head positions per chunk: the long batch (30 trained positions) needs 4


def count_calls(model: torch.nn.Module, batch: dict, embeddings: str) -> tuple[dict, float, int]:
    """Forward-hook calls of the input embedding and the LM head during one step (loss and
    backward), the intuition accuracy and the number of trained positions."""
    calls = {"input_embeddings": 0, "lm_head": 0}

    def counter(key):
        def hook(*_):
            calls[key] += 1

        return hook

    handles = [
        model.get_input_embeddings().register_forward_hook(counter("input_embeddings")),
        model.get_output_embeddings().register_forward_hook(counter("lm_head")),
    ]
    try:
        out = ift_loss(
            model,
            batch["input_ids"],
            batch["labels"],
            torch.ones_like(batch["input_ids"]),
            head_chunk_size=CHUNK,
            intuition_embeddings=embeddings,
        )
        out.loss.backward()
    finally:
        for h in handles:
            h.remove()
    return calls, float(out.intuition_accuracy), int(out.n_tokens)


@pytest.mark.parametrize("embeddings", ["live", "detached"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_embedding_and_head_calls_do_not_depend_on_the_data(tied, embeddings):
    vocab = len(build_tokenizer())
    model = build_model(vocab, tie_word_embeddings=tied)
    batches = {
        "normal": normal_batch(vocab, 1, (11, 14)),
        "perfect": perfect_batch(model, vocab, 2),
        "no_trained_token": empty_batch(vocab, 3),
        "long": normal_batch(vocab, 4, (0, 0)),
    }
    counts, accuracy, tokens = {}, {}, {}
    for name, batch in batches.items():
        counts[name], accuracy[name], tokens[name] = count_calls(model, batch, embeddings)
    # The batches are what their names say.
    assert accuracy["perfect"] == 1.0 and accuracy["normal"] < 1.0
    assert tokens == {"normal": 7, "perfect": 24, "no_trained_token": 0, "long": 30}
    # Both passes look the table up and apply the head at least once.
    assert counts["normal"]["input_embeddings"] >= 2 and counts["normal"]["lm_head"] >= 2
    assert all(c == counts["normal"] for c in counts.values()), counts
