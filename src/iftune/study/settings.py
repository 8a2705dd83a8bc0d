"""The study's pre-registered settings (docs/study.md): methods, bases, seeds, budget.

Every method starts from the same base, sees the same training problems and gets the same number
of optimizer steps, learning rate and batch size; only the loss (and, for the preference methods,
the rejected answers) differs. Each stage is one `iftune.train.train` call with the flags a user
would give `iftune <command>`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    command: str  # sft | ift | dpo | orpo
    flags: tuple[str, ...] = ()
    share: float = 1.0  # of the step budget
    pairs: str | None = None  # preference methods: "base" (the base's own answers) or "self" (this run's model so far)


# label -> stages, SFT first (the reference of the paired differences).
METHODS: dict[str, tuple[Stage, ...]] = {
    "sft": (Stage("sft"),),
    "ift": (Stage("ift"),),  # the paper's defaults: lam 0.2, gamma 0.95
    "ift_mix": (Stage("ift", ("--gamma", "0")),),  # eq. 17 mixing only
    "ift_prop": (Stage("ift", ("--max_lambda", "0")),),  # eq. 22 propagation only
    "dpo": (Stage("dpo", pairs="base"),),
    "orpo": (Stage("orpo", pairs="base"),),
    "sft_dpo": (Stage("sft", share=0.5), Stage("dpo", share=0.5, pairs="self")),  # the paper's sequential scenario
}
METRICS = ("exact_match", "step_accuracy", "heldout_nll")
LOWER_IS_BETTER = {"heldout_nll"}
# (a, b): a - b per (base, seed); the first is the primary comparison.
COMPARISONS = [
    ("ift", "sft"),
    ("ift_mix", "sft"),
    ("ift_prop", "sft"),
    ("dpo", "sft"),
    ("orpo", "sft"),
    ("sft_dpo", "sft"),
    ("ift", "dpo"),
    ("ift", "orpo"),
    ("ift", "sft_dpo"),
]


@dataclass(frozen=True)
class StudySettings:
    bases: int = 4  # base seeds 0..bases-1; base 0 is the model shipped with iftune
    seeds: int = 5  # fine-tuning seeds per base
    steps: int = 100  # optimizer steps per run (split between the stages of a sequential method)
    learning_rate: float = 3e-3
    batch_size: int = 16
    beta: float = 0.1  # DPO's and ORPO's beta (TRL's default)
    n_train: int = 2000
    n_heldout: int = 200
    methods: tuple[str, ...] = tuple(METHODS)
    n_boot: int = 10000
    quick: bool = False  # tests: a tiny base built on the spot

    def pair_prompts(self, steps: int) -> int:
        """Training problems that get a preference pair for a stage of `steps` steps: the first
        steps x batch, so that one epoch is the stage's budget."""
        return min(self.n_train, steps * self.batch_size)


QUICK = {"bases": 2, "seeds": 2, "steps": 2, "n_train": 64, "n_heldout": 16, "n_boot": 200, "quick": True}
