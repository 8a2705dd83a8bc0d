"""How much of an optimizer update survives in pure bf16 weights (no fp32 master copy).

Trains the tiny test Llama (weights ~N(0, 0.02), like a 7B model's) for a few steps of RMSprop
at the recipes' learning rate, once with bf16 weights updated in place (one GPU or DDP with
`dtype: bfloat16`) and once with fp32 master weights (what FSDP2's upcast and ZeRO-3's fp32
partitions keep), both computing in bf16. Prints, after some steps, the share of weights whose
bf16 value moved from the start. Usage: python tests/scripts/bf16_update_fraction.py [--lr 5e-7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from batches import normal_batch
from conftest import build_model, build_tokenizer


def changed_share(model: torch.nn.Module, before: list[torch.Tensor]) -> float:
    """Share of the weights whose bf16 value differs from `before`."""
    now = [p.detach().to(torch.bfloat16) for p in model.parameters()]
    changed = sum(int((a != b).sum()) for a, b in zip(now, before))
    return changed / sum(b.numel() for b in before)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float, default=5e-7)
    p.add_argument("--report", type=int, nargs="+", default=[1, 10, 50, 200], help="steps to report at")
    args = p.parse_args()
    torch.manual_seed(0)
    vocab = len(build_tokenizer())
    batch = normal_batch(vocab, 1)
    print(
        f"lr={args.lr}: share of weights whose bf16 value moved after "
        + ", ".join(map(str, args.report))
        + " RMSprop steps"
    )
    for name, dtype in (("bf16 weights (no master)", torch.bfloat16), ("fp32 master weights", torch.float32)):
        model = build_model(vocab).to(dtype)
        opt = torch.optim.RMSprop(model.parameters(), lr=args.lr)
        start = [p.detach().to(torch.bfloat16).clone() for p in model.parameters()]
        shares = []
        for step in range(1, max(args.report) + 1):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step in args.report:
                shares.append(changed_share(model, start))
        print(f"  {name:26s}" + " ".join(f"{s:6.1%}" for s in shares))


if __name__ == "__main__":
    main()
