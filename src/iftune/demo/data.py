"""The demo's task: chained arithmetic modulo 10, solved step by step.

A problem is a start digit and a chain of operations applied left to right, every result kept
to its last digit (mod 10): `solve 3 + 4 * 7 - 2`. The worked answer carries each result into
the next step, so one wrong step makes every later step and the final answer wrong:

    3 + 4 = 7 ; 7 * 7 = 9 ; 9 - 2 = 7 ; answer 7

That is the property the paper's GSM8K gains are about (an early error derails the rest), in a
form a model of a million parameters can learn on a CPU in seconds, and every answer can be
checked by recomputing it. Everything is generated from fixed seeds: the same files every run.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

OPS = ("+", "-", "*")
OPERANDS = (1, 2, 3)  # right-hand numbers: a table of 90 facts a tiny model learns in seconds
MODULUS = 10
# Chains the fine-tuning set and the held-out set use; pre-training sees only shorter ones.
TASK_MIN_STEPS, TASK_MAX_STEPS = 4, 8
PRETRAIN_MAX_STEPS = 3
DATA_SEED = 1234  # fixed: the data set is part of the demo, not of a run's seed


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]  # (operator, operand) in order

    @property
    def prompt(self) -> str:
        return "solve " + " ".join([str(self.start)] + [f"{op} {d}" for op, d in self.ops])


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
    """The worked answer text: `a op b = c ; ... ; answer c`."""
    worked = [f"{a} {op} {b} = {c}" for a, op, b, c in steps(problem)]
    return " ; ".join(worked + [f"answer {steps(problem)[-1][3]}"])


def random_problem(rng: random.Random, min_steps: int, max_steps: int) -> Problem:
    n = rng.randint(min_steps, max_steps)
    ops = tuple((rng.choice(OPS), rng.choice(OPERANDS)) for _ in range(n))
    return Problem(rng.randrange(MODULUS), ops)


def to_messages(problem: Problem) -> dict:
    """One conversational example in TRL's `messages` format."""
    return {"messages": [{"role": "user", "content": problem.prompt},
                         {"role": "assistant", "content": solution(problem)}]}


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


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def pretraining_corpus(n_docs: int, seed: int) -> list[str]:
    """Plain-text documents that teach the domain, not the task.

    Half are lists of independent one-step facts (`6 * 7 = 2 ; 3 - 5 = 8 ; ...`), half are worked
    chains of 1 to 3 steps (`solve 3 + 4 : 3 + 4 = 7 ; answer 7`). No chat markup and no chain as
    long as the task's, so fine-tuning still has to teach the format and the longer chains, while
    the base model's own guesses (its intuition) are already mostly right on single steps.
    """
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        if i % 2 == 0:
            facts = []
            for _ in range(rng.randint(4, 8)):
                a, op, b = rng.randrange(MODULUS), rng.choice(OPS), rng.choice(OPERANDS)
                facts.append(f"{a} {op} {b} = {apply(op, a, b)}")
            docs.append(" ; ".join(facts))
        else:
            p = random_problem(rng, 1, PRETRAIN_MAX_STEPS)
            docs.append(f"{p.prompt} : {solution(p)}")
    return docs
