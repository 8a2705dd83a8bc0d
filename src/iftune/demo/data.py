"""The demo's task: chained arithmetic modulo 10, solved step by step.

A problem is a start digit and a chain of labelled operations applied left to right, every
result kept to its last digit (mod 10): `solve 3 a +2 b *3 c -1`. The worked answer carries each
result into the next step, so one wrong step makes every later step and the final answer wrong:

    3 a +2 = 5 ; 5 b *3 = 5 ; 5 c -1 = 4 ; answer 4

That is the property the paper's GSM8K gains are about (an early error derails the rest), in a
form a model of half a million parameters learns on a CPU in seconds. The labels let the model
find the next operation in the question by matching the label (an induction-style lookup) rather
than by counting positions, which a tiny model does not learn in that time. Every answer can
be checked by recomputing it. Everything is generated from fixed seeds: the same data every run.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

OPS = ("+", "-", "*")
LABELS = "abcdefgh"  # one per step, in order; also bounds the chain length
OPERANDS = (1, 2, 3)  # right-hand numbers: a table of 90 facts a tiny model learns in seconds
MODULUS = 10
# Chains the fine-tuning set and the held-out set use; pre-training sees only shorter ones.
TASK_MIN_STEPS, TASK_MAX_STEPS = 4, 6  # at most len(LABELS)
PRETRAIN_MAX_STEPS = 3
DATA_SEED = 1234  # fixed: the data set is part of the demo, not of a run's seed


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]  # (operator, operand) in order
    first_label: int = 0  # index in LABELS of the first step's label

    def label(self, i: int) -> str:
        return LABELS[self.first_label + i]

    @property
    def prompt(self) -> str:
        return "solve " + " ".join(
            [str(self.start)] + [f"{self.label(i)} {op}{d}" for i, (op, d) in enumerate(self.ops)]
        )


def apply(op: str, a: int, b: int) -> int:
    """One step, result kept to its last digit."""
    if op == "+":
        return (a + b) % MODULUS
    if op == "-":
        return (a - b) % MODULUS
    if op == "*":
        return (a * b) % MODULUS
    raise ValueError(f"unknown operator {op!r}")


def steps(problem: Problem) -> list[tuple[int, str, int, int]]:
    """The worked steps `(a, op, b, result)`, each starting from the previous result."""
    out, value = [], problem.start
    for op, d in problem.ops:
        result = apply(op, value, d)
        out.append((value, op, d, result))
        value = result
    return out


def solution(problem: Problem) -> str:
    """The worked answer text: `x label opd = y ; ... ; answer y` (an operator and its operand are one word)."""
    worked = [f"{a} {problem.label(i)} {op}{b} = {c}" for i, (a, op, b, c) in enumerate(steps(problem))]
    return " ; ".join(worked + [f"answer {steps(problem)[-1][3]}"])


def random_problem(rng: random.Random, min_steps: int, max_steps: int, any_label: bool = False) -> Problem:
    """`any_label`: start the labels anywhere (pre-training sees every label, in short chains)."""
    n = rng.randint(min_steps, max_steps)
    ops = tuple((rng.choice(OPS), rng.choice(OPERANDS)) for _ in range(n))
    first = rng.randrange(len(LABELS) - n + 1) if any_label else 0
    return Problem(rng.randrange(MODULUS), ops, first)


def to_messages(problem: Problem) -> dict:
    """One conversational example in TRL's `messages` format."""
    return {
        "messages": [{"role": "user", "content": problem.prompt}, {"role": "assistant", "content": solution(problem)}]
    }


def make_splits(n_train: int, n_heldout: int, seed: int = DATA_SEED) -> tuple[list[dict], list[dict]]:
    """Train and held-out examples with distinct prompts (no held-out problem is seen in training)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    while len(problems) < n_train + n_heldout:
        p = random_problem(rng, TASK_MIN_STEPS, TASK_MAX_STEPS)
        if p.prompt not in seen:
            seen.add(p.prompt)
            problems.append(p)
    examples = [to_messages(p) for p in problems]
    return examples[:n_train], examples[n_train:]


def parse_prompt(prompt: str) -> Problem:
    """The problem a prompt (`solve 3 a +2 b *3`) states; the inverse of `Problem.prompt`."""
    words = prompt.split()
    if len(words) < 4 or words[0] != "solve" or len(words) % 2:
        raise ValueError(f"not a problem prompt: {prompt!r}")
    ops = tuple((w[0], int(w[1:])) for w in words[3::2])
    return Problem(int(words[1]), ops, LABELS.index(words[2]))


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def pretraining_corpus(n_docs: int, seed: int) -> list[str]:
    """Plain-text documents that teach the domain, not the task.

    A quarter are lists of independent one-step facts (`6 *3 = 8 ; 3 -2 = 1 ; ...`), the rest
    worked chains of 1 to 3 steps with labels starting anywhere (`solve 3 e +2 : 3 e +2 = 5 ;
    answer 5`). No chat markup and no chain as long as the task's (4 to 6 steps), so fine-tuning
    still has to teach the format and the longer chains, while the base model's own guesses (its
    intuition) are already right on single steps and short chains.
    """
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        if i % 4 == 0:
            facts = []
            for _ in range(rng.randint(4, 8)):
                a, op, b = rng.randrange(MODULUS), rng.choice(OPS), rng.choice(OPERANDS)
                facts.append(f"{a} {op}{b} = {apply(op, a, b)}")
            docs.append(" ; ".join(facts))
        else:
            p = random_problem(rng, 1, PRETRAIN_MAX_STEPS, any_label=True)
            docs.append(f"{p.prompt} : {solution(p)}")
    return docs
