"""Preference pairs for DPO and ORPO on the demo's task.

chosen = the reference worked answer. rejected = the starting model's own greedy answer to the
same problem when that answer is well formed (ends in `answer N`) and wrong (on-policy, as
UltraFeedback's rejected answers are); otherwise a synthetic early error (`early_error`): the
result of step 1 or 2 is replaced by another digit and every later step is worked correctly from
it, so the error propagates to the final answer, the failure the task is built around.

The base model has never seen the chat format, so it is asked in its pre-training format
(`<s> solve ... :`); a fine-tuned model is asked through the chat template.
"""

from __future__ import annotations

import random

from iftune.demo.data import MODULUS, Problem, apply, parse_prompt, solution
from iftune.demo.score import final_answer, step_lines

PAIR_SEED = 4321  # the synthetic errors' digits: fixed, part of the data set


def early_error(problem: Problem, rng: random.Random) -> str:
    """A worked answer whose step 1 or 2 (at random) has a wrong result, carried through the
    rest of the chain; its final answer differs from the reference whenever some wrong digit
    allows it (a later `*d` can map two values to one)."""
    k = rng.randrange(min(2, len(problem.ops)))
    offsets = list(range(1, MODULUS))
    rng.shuffle(offsets)
    right = final_answer(solution(problem))
    for offset in offsets:
        text = _worked(problem, k, offset)
        if final_answer(text) != right:
            break
    return text


def _worked(problem: Problem, wrong_step: int, offset: int) -> str:
    worked, value = [], problem.start
    for i, (op, d) in enumerate(problem.ops):
        result = apply(op, value, d)
        if i == wrong_step:
            result = (result + offset) % MODULUS
        worked.append(f"{value} {problem.label(i)} {op}{d} = {result}")
        value = result
    return " ; ".join(worked + [f"answer {value}"])


def first_wrong_step(generated: str, reference: str) -> int | None:
    """1-based position of the first step that differs from the reference (None if all agree)."""
    gen, ref = step_lines(generated), step_lines(reference)
    for i, r in enumerate(ref):
        if i >= len(gen) or gen[i] != r:
            return i + 1
    return None


def own_rejection(generated: str, reference: str) -> bool:
    """Whether a model's answer can serve as the rejected one: well formed and wrong."""
    answer = final_answer(generated)
    return answer is not None and answer != final_answer(reference)


def build_pairs(examples: list[dict], generated: list[str], seed: int = PAIR_SEED) -> tuple[list[dict], dict]:
    """(rows in TRL's conversational preference format, counts) from chat examples and the
    starting model's answer to each. Counts: "own" (rejected = the model's answer), "synthetic",
    and "own_early" (own rejections whose first wrong step is step 1 or 2)."""
    if len(examples) != len(generated):
        raise ValueError(f"{len(generated)} answers for {len(examples)} examples")
    rng = random.Random(seed)
    rows, counts = [], {"own": 0, "synthetic": 0, "own_early": 0}
    for example, answer in zip(examples, generated):
        user, reference = example["messages"][0], example["messages"][1]["content"]
        if own_rejection(answer, reference):
            rejected = answer
            counts["own"] += 1
            counts["own_early"] += (first_wrong_step(answer, reference) or 99) <= 2
        else:
            rejected = early_error(parse_prompt(user["content"]), rng)
            counts["synthetic"] += 1
        rows.append(
            {
                "prompt": [user],
                "chosen": [{"role": "assistant", "content": reference}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows, counts
