"""iftune: Intuitive Fine-Tuning for Hugging Face causal language models."""

from iftune.errors import UserError
from iftune.objective import (
    IFTOutput,
    discounted_cumsum,
    ift_loss,
    intuitive_tokens,
    mix_embeddings,
    relation_weights,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # The trainer pulls in TRL and transformers: import it only when asked for.
    if name in ("IFTConfig", "IFTTrainer"):
        from iftune import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'iftune' has no attribute {name!r}")


__all__ = [
    "IFTConfig",
    "IFTOutput",
    "IFTTrainer",
    "UserError",
    "discounted_cumsum",
    "ift_loss",
    "intuitive_tokens",
    "mix_embeddings",
    "relation_weights",
]
