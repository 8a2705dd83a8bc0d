"""Scoring a saved model on the demo's held-out problems: exact match and step accuracy of its
greedy answers, and the teacher-forced NLL of the reference answers. Used by the demo and the study."""

from __future__ import annotations

from pathlib import Path

from iftune.demo.score import score

MAX_NEW_TOKENS = 48  # the longest answer (6 steps) is 39 tokens with its end token


def pretraining_prompt(question: str) -> str:
    """How the base model saw problems in pre-training: `<s> solve ... :` (its answer follows)."""
    return f"<s> {question} :"


def load(model_dir: Path):
    """(tokenizer with left padding, model in eval mode) from a saved folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    return tokenizer, AutoModelForCausalLM.from_pretrained(model_dir).eval()


def answers(model_dir: Path, questions: list[str], chat: bool, batch_size: int = 100, loaded=None) -> list[str]:
    """Greedy answers to `questions`, asked through the chat template, or (`chat=False`) in the
    base model's pre-training format."""
    from iftune.evaluation.generate import generate

    tokenizer, model = loaded or load(model_dir)
    if chat:
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions
        ]
    else:
        prompts = [pretraining_prompt(q) for q in questions]
    return generate(tokenizer, model, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size, progress=False)


def heldout_nll(tokenizer, model, examples: list[dict], batch_size: int = 100) -> float:
    """Mean NLL per answer token (the answer and its end token, as SFT trains them) of the
    reference answers, teacher-forced through the chat template."""
    import torch

    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        enc = [
            tokenizer.apply_chat_template(e["messages"], return_dict=True, return_assistant_tokens_mask=True)
            for e in examples[i : i + batch_size]
        ]
        width = max(len(e["input_ids"]) for e in enc)
        ids = torch.full((len(enc), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        target = torch.zeros((len(enc), width), dtype=torch.bool)
        for row, e in enumerate(enc):
            n = len(e["input_ids"])
            ids[row, :n], mask[row, :n] = torch.tensor(e["input_ids"]), 1
            target[row, :n] = torch.tensor(e["assistant_masks"], dtype=torch.bool)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = target[:, 1:]
        total -= float(logp[keep].sum())
        count += int(keep.sum())
    return total / max(count, 1)


def evaluate(model_dir: Path, heldout: list[dict], chat: bool = True) -> dict:
    """{"exact_match", "step_accuracy", "heldout_nll", "samples", "generated"} of the model on
    `heldout` ("generated": every greedy answer, in order, for scores computed elsewhere)."""
    tokenizer, model = load(model_dir)
    questions = [e["messages"][0]["content"] for e in heldout]
    references = [e["messages"][1]["content"] for e in heldout]
    generated = answers(model_dir, questions, chat, loaded=(tokenizer, model))
    result = score(generated, references)
    tokenizer.padding_side = "right"
    return {
        "exact_match": result.exact_match,
        "step_accuracy": result.step_accuracy,
        "heldout_nll": heldout_nll(tokenizer, model, heldout),
        "samples": [
            {"prompt": q, "generated": g, "reference": r} for q, g, r in list(zip(questions, generated, references))[:3]
        ],
        "generated": generated,
    }
