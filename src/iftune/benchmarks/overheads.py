"""The overheads of an IFT step, each measured alone at a preset's shape (median of repeats):

- `lookups`: eq. 17's two embedding lookups of the whole batch (input ids, intuitive ids)
  against ONE lookup of the concatenated ids, forward and backward: two lookups scatter twice
  into a dense (V, H) gradient and add the two, one lookup scatters once. Both give the same
  gradient (checked, and printed: bit for bit or the largest difference).
- `guard`: what `FiniteGuard.on_pre_optimizer_step` adds to a step (a norm over every
  gradient), next to the clipping norm the Trainer computes anyway (`clip_grad_norm_`).
- `head`: the chunked LM head's forward and backward at the trained positions, recomputing
  every chunk's logits (budget 0) or keeping those that fit the default budget, next to the
  full-logits log-softmax over every position (what naive IFT's training pass does); and the
  intuition pass's head with and without the float32 log-sum-exp of its `sft_loss` metric.
- `intuition`: a same-path SFT step, an IFT step (forward, backward, AdamW) and IFT's
  intuition pass alone, interleaved on one model. IFT is SFT plus that no-grad forward (eq. 17
  needs the model's own prediction before the training pass): `intuition / SFT` is what it must
  add to an SFT step, `(IFT - SFT) / intuition` how many such passes iftune's IFT adds (1: the
  pass and nothing else).

`--precision bf16` runs `head` and `intuition` under bf16 autocast (float32 weights), as the
Trainer's `bf16=True` does. Run: `python -m iftune.benchmarks.overheads [lookups guard head
intuition] [--preset qwen2.5-0.5b] [--batch 4] [--layers N] [--precision bf16] [--device cuda]`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from types import SimpleNamespace

import torch

from iftune.benchmarks.baselines import path_sft_sums
from iftune.benchmarks.ops import interleaved_medians, median_seconds
from iftune.benchmarks.setup import PRESETS, Sizes, make_model
from iftune.lm_head import DEFAULT_LOGITS_BUDGET_MB, intuition_from_hidden, token_logprobs
from iftune.modeling import IGNORE_INDEX, trained_targets
from iftune.objective import IFTOptions, ift_loss, intuition_pass, mix_embeddings

PARTS = ("lookups", "guard", "head", "intuition")
PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device, precision: str):
    """bf16 autocast for "bf16" (float32 weights, as the Trainer's `bf16=True`), none for "fp32"."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def batch_ids(sizes: Sizes, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, intuitive ids) of a batch: the intuitive token differs from the input on the
    trained positions where a random model's guess is wrong, i.e. almost all of them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, sizes.vocab, (sizes.batch, sizes.seq), generator=g)
    intuitive = ids.clone()
    answer = (sizes.batch, sizes.seq - sizes.prompt - 1)
    intuitive[:, sizes.prompt + 1 :] = torch.randint(0, sizes.vocab, answer, generator=g)
    return ids.to(device), intuitive.to(device)


def two_lookups(table: torch.nn.Embedding, ids: torch.Tensor, intuitive: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 17 as `objective.mixed_inputs` computes it at this commit: one lookup per id tensor."""
    embeds, other = table(ids), table(intuitive)
    return torch.where((intuitive != ids).unsqueeze(-1), mix_embeddings(embeds, other, lam), embeds)


def one_lookup(table: torch.nn.Embedding, ids: torch.Tensor, intuitive: torch.Tensor, lam: float) -> torch.Tensor:
    """The same from one lookup of the concatenated ids."""
    embeds, other = table(torch.cat([ids, intuitive])).chunk(2)
    return torch.where((intuitive != ids).unsqueeze(-1), mix_embeddings(embeds, other, lam), embeds)


def bench_lookups(sizes: Sizes, repeats: int, device: torch.device, lam: float = 0.2) -> dict:
    """Seconds of forward + backward of both ways, their ratio and how far their gradients differ."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(sizes.vocab, sizes.hidden, device=device)
    ids, intuitive = batch_ids(sizes, device)
    grad_out = torch.randn(sizes.batch, sizes.seq, sizes.hidden, device=device)

    def step(fn):
        table.weight.grad = None
        fn(table, ids, intuitive, lam).backward(grad_out)
        return table.weight.grad

    diff = (step(two_lookups) - step(one_lookup)).abs().max().item()
    two = median_seconds(lambda: step(two_lookups), repeats, device)
    one = median_seconds(lambda: step(one_lookup), repeats, device)
    return {"two_lookups_s": two, "one_lookup_s": one, "one_over_two": one / two, "max_grad_diff": diff}


def bench_guard(sizes: Sizes, repeats: int, device: torch.device) -> dict:
    """Seconds of FiniteGuard's per-step check and of the Trainer's clipping norm on the
    gradients of a model of `sizes` (random gradients)."""
    from iftune.callbacks import FiniteGuard

    model = make_model(sizes, 0, 16).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    guard, args = FiniteGuard(), SimpleNamespace(fp16=False)
    state = SimpleNamespace(global_step=0)
    check = median_seconds(lambda: guard.on_pre_optimizer_step(args, state, None, model=model), repeats, device)
    clip = median_seconds(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9), repeats, device)
    n = sum(p.numel() for p in model.parameters())
    return {"parameters": n, "guard_s": check, "clip_norm_s": clip, "guard_over_clip": check / clip}


def bench_head(sizes: Sizes, repeats: int, device: torch.device, precision: str = "fp32") -> dict:
    """Seconds of the head's forward + backward at the trained positions: recomputing (budget
    0), with the default budget, and the full-logits log-softmax over every position; and of the
    intuition pass's head (no grad) with the log-sum-exp of its `sft_loss` metric and without."""
    torch.manual_seed(0)
    head = torch.nn.Linear(sizes.hidden, sizes.vocab, bias=False, device=device)
    trained = sizes.batch * (sizes.seq - sizes.prompt - 1)
    hidden = torch.randn(trained, sizes.hidden, device=device, requires_grad=True)
    targets = torch.randint(0, sizes.vocab, (trained,), device=device)
    everything = torch.randn(sizes.batch * sizes.seq, sizes.hidden, device=device, requires_grad=True)
    every_target = torch.randint(0, sizes.vocab, (sizes.batch * sizes.seq,), device=device)

    def chunked(budget):
        head.weight.grad = None
        with autocast(device, precision):
            logp = token_logprobs(hidden, head, targets, logits_budget_mb=budget)
        logp.sum().backward()

    def full():
        head.weight.grad = None
        with autocast(device, precision):
            logits = head(everything).float()
        torch.log_softmax(logits, -1).gather(-1, every_target[:, None]).sum().backward()

    def intuition(with_logp):  # the intuition pass's head: argmax, and the metric's log-sum-exp or not
        with autocast(device, precision):
            intuition_from_hidden(hidden.detach(), head, targets, with_logp=with_logp)

    out = {"trained_positions": trained, "all_positions": sizes.batch * sizes.seq}
    out["recompute_s"] = median_seconds(lambda: chunked(0), repeats, device)
    out["budget_s"] = median_seconds(lambda: chunked(None), repeats, device)
    out["full_logits_s"] = median_seconds(full, repeats, device)
    out["intuition_head_s"] = median_seconds(lambda: intuition(True), repeats, device)
    out["intuition_head_argmax_only_s"] = median_seconds(lambda: intuition(False), repeats, device)
    return out


def bench_intuition(sizes: Sizes, repeats: int, device: torch.device, precision: str = "fp32") -> dict:
    """Seconds of a same-path SFT step, an IFT step (IFT's default options) and the intuition
    pass alone, interleaved, and the ratios of the module's docstring."""
    model = make_model(sizes, 0, sizes.seq).to(device).train()
    ids, _ = batch_ids(sizes, device)
    labels = ids.masked_fill(torch.arange(sizes.seq, device=device) < sizes.prompt, IGNORE_INDEX)
    targets, mask = trained_targets(labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)  # the Trainer's default optim
    options = IFTOptions()

    def step(loss_fn):
        with autocast(device, precision):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sft():  # PathSFTTrainer's loss
        loss_sum, n_sequences = path_sft_sums(model, ids, labels)
        return loss_sum / n_sequences

    def intuition():
        with autocast(device, precision):
            intuition_pass(model, ids, targets, mask, None, None, options)

    t = interleaved_medians(
        {
            "sft_s": lambda: step(sft),
            "ift_s": lambda: step(lambda: ift_loss(model, ids, labels, options=options).loss),
            "intuition_s": intuition,
        },
        repeats,
        device,
    )
    sft_s = t["sft_s"]
    return {
        **t,
        "ift_over_sft": t["ift_s"] / sft_s,
        "intuition_over_sft": t["intuition_s"] / sft_s,
        "extra_over_intuition": (t["ift_s"] - sft_s) / t["intuition_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iftune.benchmarks.overheads", description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help=f"any of {' '.join(PARTS)} (default: all)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-0.5b")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's")
    parser.add_argument("--layers", type=int, default=None, help="guard: layers of the model (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="head, intuition: bf16 autocast or none"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.parts = args.parts or list(PARTS)
    if unknown := set(args.parts) - set(PARTS):
        parser.error(f"unknown part {sorted(unknown)[0]!r}; expected any of {', '.join(PARTS)}")
    sizes = PRESETS[args.preset]
    sizes = replace(sizes, batch=args.batch or sizes.batch, layers=args.layers or sizes.layers)
    print(
        f"{sizes.label()}, batch {sizes.batch} x {sizes.seq} (prompt {sizes.prompt}), vocab {sizes.vocab}, "
        f"hidden {sizes.hidden}, {args.precision} (head, intuition), {device}, {torch.get_num_threads()} CPU threads, "
        f"median of {args.repeats}"
    )
    if "lookups" in args.parts:
        r = bench_lookups(sizes, args.repeats, device)
        print(
            f"lookups (forward + backward): two {r['two_lookups_s']:.4f} s, "
            f"one concatenated {r['one_lookup_s']:.4f} s, "
            f"one / two {r['one_over_two']:.3f}; largest gradient difference {r['max_grad_diff']:.3g}"
        )
    if "guard" in args.parts:
        r = bench_guard(sizes, args.repeats, device)
        print(
            f"FiniteGuard per step ({r['parameters']:,} parameters): {r['guard_s']:.4f} s; the Trainer's clipping "
            f"norm {r['clip_norm_s']:.4f} s; guard / clip {r['guard_over_clip']:.2f}"
        )
    if "head" in args.parts:
        r = bench_head(sizes, args.repeats, device, args.precision)
        print(
            f"LM head forward + backward, {r['trained_positions']} trained positions: "
            f"recomputing {r['recompute_s']:.3f} s, "
            f"keeping {DEFAULT_LOGITS_BUDGET_MB:.0f} MiB {r['budget_s']:.3f} s; full logits over "
            f"{r['all_positions']} positions {r['full_logits_s']:.3f} s; the intuition pass's head "
            f"{r['intuition_head_s']:.3f} s, {r['intuition_head_argmax_only_s']:.3f} s without the "
            f"sft_loss metric's log-sum-exp"
        )
    if "intuition" in args.parts:
        r = bench_intuition(sizes, args.repeats, device, args.precision)
        print(
            f"steps (forward + backward + AdamW), interleaved: SFT {r['sft_s']:.3f} s, IFT {r['ift_s']:.3f} s, "
            f"IFT / SFT {r['ift_over_sft']:.3f}; the intuition pass alone {r['intuition_s']:.3f} s "
            f"({r['intuition_over_sft']:.3f} x SFT); IFT - SFT = {r['extra_over_intuition']:.2f} x that pass"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
