"""The LM head applied chunk by chunk to hidden states, so that no (B, T, V) float32 tensor
is ever built. Pure torch: works with any module that maps hidden states to logits.

`head` is the model's output embedding module (it is called, so a bias, a LoRA adapter on the
head, or tied weights all apply). `softcap` reproduces models that cap their final logits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Positions per chunk so that one chunk of float32 logits stays near 128 MiB.
_CHUNK_ELEMENTS = 1 << 25


def chunk_positions(vocab_size: int, chunk_elements: int = _CHUNK_ELEMENTS) -> int:
    return max(1, chunk_elements // max(1, vocab_size))


def _logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


@torch.no_grad()
def intuition_from_hidden(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    *,
    intuition: str = "greedy",
    k: int = 1,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's choice of next token at every position, and the teacher-forced log-prob of
    `targets` (the next tokens; any id where -100), from (B, T, H) hidden states.

    Returns `(predictions (B, T) long, target_logp (B, T) float32)`.
    """
    b, t, h = hidden.shape
    flat, tgt = hidden.reshape(b * t, h), targets.reshape(b * t).clamp_min(0)
    preds = torch.empty(b * t, dtype=torch.long, device=hidden.device)
    logp = torch.empty(b * t, dtype=torch.float32, device=hidden.device)
    for sl in _chunks(b * t, chunk_size or chunk_positions(_out_features(head))):
        logits = _logits(head, flat[sl], softcap)
        if intuition == "greedy" or (intuition == "rank" and k == 1):
            preds[sl] = logits.argmax(-1)
        elif intuition == "rank":
            preds[sl] = logits.topk(k, dim=-1).indices[:, -1]
        else:  # sample
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            preds[sl] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        lse = torch.logsumexp(logits.float(), dim=-1)
        logp[sl] = logits.gather(-1, tgt[sl, None]).squeeze(-1).float() - lse
    return preds.view(b, t), logp.view(b, t)


def _token_logp(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module,
                softcap: float | None) -> torch.Tensor:
    logits = _logits(head, hidden, softcap).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    *,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log p(targets | hidden) per position, (B, T) float32, with gradient.

    Each chunk's logits are recomputed in the backward pass instead of being stored, which
    keeps peak memory at one chunk of logits; `chunk_size=None` picks ~128 MiB chunks.
    """
    b, t, h = hidden.shape
    flat, tgt = hidden.reshape(b * t, h), targets.reshape(b * t).clamp_min(0)
    size = chunk_size or chunk_positions(_out_features(head))
    if b * t <= size:
        # One chunk: its stored logits are within the chunk budget, so skip the recompute.
        return _token_logp(flat, tgt, head, softcap).view(b, t)
    grad = torch.is_grad_enabled()
    parts = [
        checkpoint(_token_logp, flat[sl], tgt[sl], head, softcap, use_reentrant=False)
        if grad else _token_logp(flat[sl], tgt[sl], head, softcap)
        for sl in _chunks(b * t, size)
    ]
    return torch.cat(parts).view(b, t)


def _out_features(head: nn.Module) -> int:
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return int(getattr(head, "out_features", 32000))


__all__ = ["chunk_positions", "intuition_from_hidden", "token_logprobs"]
