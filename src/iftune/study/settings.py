"""The second study's pre-registered design (docs/study.md): methods, grids, bases, seeds, budget,
metrics and comparisons.

Every method that starts from a base sees the same training problems for the same number of
optimizer steps; the sequential methods continue the `sft` run of the same base and seed for the
same extra steps. Each method's learning rate (IFT's lam, DPO's beta) is chosen on a validation
split by `iftune study --tune` from the grids below. Each stage is one `iftune.train.train` call
with the flags a user would give `iftune <command>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    command: str  # sft | ift | dpo
    flags: tuple[str, ...] = ()
    after_sft: bool = False  # continues the `sft` run of the same base and seed for `extra_steps`
    pairs: bool = False  # trains on preference pairs from its starting model's own answers
    tuned_as: str | None = None  # an ablation: takes this method's tuned values, is not tuned itself


METHODS: dict[str, Method] = {
    "sft": Method("sft"),
    "ift": Method("ift"),  # gamma 0.95 (the authors' script), lam tuned
    "ift_mix": Method("ift", ("--gamma", "0"), tuned_as="ift"),  # eq. 17 mixing only
    "ift_prop": Method("ift", ("--max_lambda", "0"), tuned_as="ift"),  # eq. 22 propagation only
    "dft": Method("sft", ("--loss_type", "dft")),  # TRL's Dynamic Fine-Tuning loss
    "sft_sft": Method("sft", after_sft=True),  # the paper's sequential scenario: more SFT
    "sft_ift": Method("ift", after_sft=True),  # ... IFT after SFT
    "sft_dpo": Method("dpo", after_sft=True, pairs=True),  # ... DPO after SFT (the positive control)
}
# The hyper-parameters each tuned value sets, as `iftune` flags.
FLAG = {"learning_rate": "--learning_rate", "max_lambda": "--max_lambda", "beta": "--beta"}
METRICS = ("step_validity", "exact_match", "step_accuracy", "heldout_nll", "validity_after_error")
LOWER_IS_BETTER = {"heldout_nll"}
PRIMARY = ("ift", "sft", "step_validity")
POSITIVE_CONTROL = ("sft_dpo", "sft_sft", "step_validity")
# (a, b): a - b per (base, seed); every metric of each is reported. All but the primary and the
# positive control's metric form the exploratory family that Holm's correction covers.
COMPARISONS = [
    ("ift", "sft"),
    ("sft_dpo", "sft_sft"),
    ("sft_ift", "sft_sft"),
    ("sft_ift", "sft_dpo"),
    ("dft", "sft"),
    ("ift", "dft"),
    ("ift_mix", "sft"),
    ("ift_prop", "sft"),
]


@dataclass(frozen=True)
class Tuning:
    """One coordinate-search step: `method`'s `param` over `values`, the others held at what the
    earlier steps chose (else at `defaults`). Steps run in order; a step may start only when the
    steps it depends on are done (the `sft` step, for the sequential methods)."""

    method: str
    param: str
    values: tuple[float, ...]


GRID: tuple[Tuning, ...] = (
    Tuning("sft", "learning_rate", (3e-4, 1e-3, 3e-3)),
    Tuning("dft", "learning_rate", (3e-4, 1e-3, 3e-3)),
    Tuning("ift", "learning_rate", (3e-4, 1e-3, 3e-3)),
    Tuning("ift", "max_lambda", (0.1, 0.2, 0.4)),
    Tuning("sft_sft", "learning_rate", (1e-4, 3e-4, 1e-3)),
    Tuning("sft_dpo", "learning_rate", (1e-5, 3e-5, 1e-4, 3e-4)),
    Tuning("sft_dpo", "beta", (0.03, 0.1, 0.3)),
    Tuning("sft_ift", "learning_rate", (1e-4, 3e-4, 1e-3)),
)
# Values a parameter holds before its own step has chosen it.
DEFAULTS = {
    "ift": {"max_lambda": 0.2},  # the authors' script
    "sft_dpo": {"beta": 0.1},  # TRL's default
    "sft_ift": {"max_lambda": "ift"},  # IFT's chosen lam
}
QUICK_GRID: tuple[Tuning, ...] = (
    Tuning("sft", "learning_rate", (1e-3, 3e-3)),
    Tuning("dft", "learning_rate", (3e-3,)),
    Tuning("ift", "learning_rate", (3e-3,)),
    Tuning("ift", "max_lambda", (0.2,)),
    Tuning("sft_sft", "learning_rate", (1e-3,)),
    Tuning("sft_dpo", "learning_rate", (1e-4,)),
    Tuning("sft_dpo", "beta", (0.1,)),
    Tuning("sft_ift", "learning_rate", (1e-3,)),
)


@dataclass(frozen=True)
class StudySettings:
    bases: int = 7  # confirmatory bases: pre-training seeds first_base .. first_base + bases - 1
    first_base: int = 10  # never used before this study (the first study used 0-3)
    tuning_bases: tuple[int, ...] = (100, 101)  # tuning only, never in the comparison
    seeds: int = 2  # fine-tuning seeds per base
    pilot_seeds: tuple[int, ...] = (1, 2)  # tuning: SFT and IFT at the chosen values, for the seed variance
    steps: int = 300  # optimizer steps of every method from a base
    extra_steps: int = 100  # of the second stage of a sequential method
    batch_size: int = 16
    n_train: int = 2000  # training problems
    n_valid: int = 500  # carved from the training problems: tuning scores only, never trained on
    n_heldout: int = 1000
    methods: tuple[str, ...] = tuple(METHODS)
    grid: tuple[Tuning, ...] = field(default=GRID)
    smallest_effect: float = 0.05  # of the primary metric: "level" when the interval is inside +-this
    n_boot: int = 10000
    quick: bool = False  # tests: tiny bases built on the spot

    def base_seeds(self) -> list[int]:
        return list(range(self.first_base, self.first_base + self.bases))

    def pair_prompts(self) -> int:
        """Training problems that get a preference pair: one epoch is the extra stage's budget."""
        return min(self.n_train, self.extra_steps * self.batch_size)


QUICK = {
    "bases": 2,
    "first_base": 0,
    "tuning_bases": (7,),
    "seeds": 1,
    "pilot_seeds": (1,),
    "steps": 2,
    "extra_steps": 2,
    "n_train": 64,
    "n_valid": 16,
    "n_heldout": 16,
    "grid": QUICK_GRID,
    "n_boot": 200,
    "quick": True,
}
