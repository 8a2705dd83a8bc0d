"""Scoring generated worked answers: exact match of the final answer and per-step accuracy.

A generation is read the same way the data set writes answers (`a op b = c ; ... ; answer c`).
Nothing is trusted from the model: a step counts only if it is exactly the reference step at
the same position, so a step that is right given a wrong earlier result still counts as wrong
against the reference (that is the propagation the task is built to show).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ANSWER = re.compile(r"\banswer\s+(-?\d+)\s*$")


def _norm(text: str) -> str:
    return " ".join(text.split())


def final_answer(text: str) -> str | None:
    """The number after the last `answer`, when it ends the text; None if there is none."""
    m = _ANSWER.search(_norm(text))
    return m.group(1) if m else None


def step_lines(text: str) -> list[str]:
    """The worked steps of an answer, in order, without the final `answer c` part."""
    parts = [_norm(p) for p in _norm(text).split(";")]
    return [p for p in parts if p and not p.startswith("answer")]


@dataclass(frozen=True)
class Score:
    exact_match: float  # share of answers whose final number equals the reference's
    step_accuracy: float  # share of reference steps reproduced exactly, at their position


def score_one(generated: str, reference: str) -> tuple[bool, float]:
    """(final answer correct, share of reference steps reproduced at their position)."""
    ref_answer = final_answer(reference)
    if ref_answer is None:
        raise ValueError(f"reference has no final answer: {reference!r}")
    ref_steps, gen_steps = step_lines(reference), step_lines(generated)
    hits = sum(g == r for g, r in zip(gen_steps, ref_steps))
    return final_answer(generated) == ref_answer, hits / max(len(ref_steps), 1)


def score(generated: list[str], references: list[str]) -> Score:
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generations for {len(references)} references")
    pairs = [score_one(g, r) for g, r in zip(generated, references)]
    n = max(len(pairs), 1)
    return Score(sum(em for em, _ in pairs) / n, sum(acc for _, acc in pairs) / n)
