"""`iftune generate`: answers to a list of instructions in AlpacaEval's model-outputs format.

The output is a JSON list of {"instruction", "output", "generator"} (plus "dataset" when the
prompt file has it), which `alpaca_eval --model_outputs FILE` reads with any judge.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from iftune.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iftune generate", description="Generate answers with the chat template, written in AlpacaEval's format."
    )
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--adapter", help="PEFT (LoRA) adapter directory applied on top of --model")
    p.add_argument(
        "--prompts",
        required=True,
        help="JSON list (or JSONL) of strings or of objects with 'instruction', e.g. AlpacaEval's alpaca_eval.json",
    )
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--generator", help="name stored in 'generator' (default: model name)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--system", help="system message put before each instruction")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--seed", type=int, default=1234)
    return p


def load_prompts(path: Path) -> list[dict[str, Any]]:
    """Records with an 'instruction' string, from a JSON list or JSON lines."""
    if not path.is_file():
        raise UserError(f"--prompts: {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        items = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as err:
        raise UserError(f"--prompts: {path} line {err.lineno}: not valid JSON ({err.msg})") from None
    records = []
    for i, item in enumerate(items):
        record = {"instruction": item} if isinstance(item, str) else item
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise UserError(f"--prompts: {path} item {i}: expected a string or an object with a string 'instruction'")
        records.append(record)
    if not records:
        raise UserError(f"--prompts: {path} holds no prompts")
    return records


def _check(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: expected >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size: expected >= 1, got {args.batch_size}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")


def load_model(model: str, adapter: str | None, device: str | None):
    """Tokenizer (left padding, chat template required) and model in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
        net = AutoModelForCausalLM.from_pretrained(model, dtype="auto")
        if adapter:
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, adapter)
    except (OSError, ValueError) as err:
        raise UserError(f"--model/--adapter: cannot load {model} ({str(err).splitlines()[0]})") from None
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"the tokenizer of {source} has no chat template; add one "
            f"(tokenizer.chat_template) to generate chat answers"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return tokenizer, net.to(device).eval()


def chat_prompt(tokenizer, instruction: str, system: str | None) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate(
    tokenizer,
    model,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 1234,
    progress: bool = True,
) -> list[str]:
    """Returns the stripped answer to each prompt (already chat-formatted text), in prompt order.

    Batched with the tokenizer's padding (left padding for decoder-only models); prompts are
    sorted by length so that batches pad little. Greedy when `temperature` is 0. The one
    generation loop of iftune: `iftune generate`, the demo and the study use it.
    """
    import torch
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    sample = temperature > 0
    options = {"max_new_tokens": max_new_tokens, "do_sample": sample, "pad_token_id": tokenizer.pad_token_id}
    if sample:
        options.update(temperature=temperature, top_p=top_p)
    torch.manual_seed(seed)
    with tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            # the chat template already holds any BOS token
            enc = tokenizer(
                [prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(model.device)
            with torch.inference_mode():
                out = model.generate(**enc, **options)
            new = out[:, enc["input_ids"].shape[1] :]
            for i, text in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True)):
                outputs[i] = text.strip()
            bar.update(len(batch))
    return outputs


def generate_main(argv: list[str]) -> int:
    """Entry point of `iftune generate`."""
    args = build_parser().parse_args(argv)
    _check(args)
    records = load_prompts(Path(args.prompts))
    tokenizer, model = load_model(args.model, args.adapter, args.device)
    prompts = [chat_prompt(tokenizer, r["instruction"], args.system) for r in records]
    outputs = generate(
        tokenizer,
        model,
        prompts,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    name = args.generator or Path(args.model.rstrip("/")).name + (
        f"+{Path(args.adapter.rstrip('/')).name}" if args.adapter else ""
    )
    rows = [
        {
            "instruction": r["instruction"],
            "output": o,
            "generator": name,
            **({"dataset": r["dataset"]} if "dataset" in r else {}),
        }
        for r, o in zip(records, outputs)
    ]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    print(f"iftune generate: {len(rows)} answers written to {args.output}")
    return 0
