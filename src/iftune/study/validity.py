"""Step validity: is each generated step right given the model's own previous result?

The demo's step accuracy (`iftune.demo.score`) counts a step only when it equals the reference
step, so after one early error every later step counts as wrong, however well the model carries
on. Step validity scores the continuation itself (the exposure-bias mechanism IFT targets): step
k is valid when it states the problem's k-th label and operation, starts from the result the
model itself wrote at step k - 1 (the start digit for k = 1) and computes the operation on it
correctly. docs/study.md defines it as the study's primary metric.
"""

from __future__ import annotations

from iftune.demo.data import apply, parse_prompt
from iftune.demo.score import step_lines


def _int(word: str) -> int | None:
    return int(word) if word.isdigit() else None


def step_flags(generated: str, prompt: str) -> list[bool]:
    """Whether each of the problem's steps (k = 1..n) is valid in `generated`: `a L opd = c` with
    the k-th label and operation, `a` the model's own previous result and `c` = opd applied to
    `a`. Missing steps are invalid; so is every step after one whose result cannot be read."""
    problem = parse_prompt(prompt)
    written = step_lines(generated)
    flags, carried = [], problem.start
    for k, (op, d) in enumerate(problem.ops):
        words = written[k].split() if k < len(written) else []
        well_formed = len(words) == 5 and words[3] == "=" and _int(words[4]) is not None
        a = _int(words[0]) if well_formed else None
        flags.append(
            well_formed
            and carried is not None
            and (words[1], words[2]) == (problem.label(k), f"{op}{d}")
            and a == carried
            and _int(words[4]) == apply(op, a, d)
        )
        carried = _int(words[4]) if well_formed else None
    return flags


def validity(generated: str, prompt: str) -> tuple[float, float | None]:
    """(share of the problem's steps that are valid, share valid among the steps after the first
    invalid one; None when no invalid step comes before the last)."""
    flags = step_flags(generated, prompt)
    first = flags.index(False) if False in flags else None
    later = flags[first + 1 :] if first is not None else []
    return sum(flags) / len(flags), (sum(later) / len(later) if later else None)


def mean_validity(generated: list[str], prompts: list[str]) -> dict:
    """{"step_validity": mean over problems, "validity_after_error": mean over the problems that
    have one (None if none do)}."""
    if len(generated) != len(prompts) or not prompts:
        raise ValueError(f"{len(generated)} generations for {len(prompts)} prompts")
    pairs = [validity(g, p) for g, p in zip(generated, prompts)]
    after = [x for _, x in pairs if x is not None]
    return {
        "step_validity": sum(v for v, _ in pairs) / len(pairs),
        "validity_after_error": sum(after) / len(after) if after else None,
    }
