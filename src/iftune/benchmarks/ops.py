"""Cost of the objective's own arithmetic next to what every step pays anyway.

For a batch of B sequences of T positions this prints, as the median of several repeats:

- `discounted_cumsum` (both directions) relative to one `torch.cumsum` on the same (B, T)
  tensor: the price of the discount over a plain running sum;
- `relation_weights` (default options, eq. 19-22) relative to one `log_softmax` over a
  (B, T, V) float32 tensor, the least an LM loss costs. That tensor is 8 GiB at B=8, T=8192,
  V=32000, so the reference runs on as many rows as fit in `--ref-gib` and is scaled to B
  (its cost is linear in rows); the table says how many rows were timed.

Run: `python -m iftune.benchmarks.ops [--device cuda] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from iftune.objective import discounted_cumsum, relation_weights


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of `fn` over `repeats` runs, after one warm-up run."""
    return interleaved_medians({"fn": fn}, repeats, device)["fn"]


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall time of each of `fns` over `repeats` rounds, each round running every one in
    turn after one warm-up call each: a machine's slow spell then slows every one alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_length(b: int, t: int, vocab: int, ref_gib: float, repeats: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(t)
    x = torch.rand(b, t, generator=g).to(device)
    # Log-probs and a mask shaped like a real batch: a prompt, then trained tokens, then padding.
    logps = (-torch.rand(b, t, generator=g) * 5).to(device)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for row in range(b):
        mask[row, t // 8 : t - row * t // (4 * b)] = True
    mask = mask.to(device)

    cumsum = median_seconds(lambda: torch.cumsum(x, -1), repeats, device)
    forward = median_seconds(lambda: discounted_cumsum(x, 0.95), repeats, device)
    backward = median_seconds(lambda: discounted_cumsum(x, 0.95, reverse=True), repeats, device)
    weights = median_seconds(lambda: relation_weights(logps, mask), repeats, device)

    rows = max(1, min(b, int(ref_gib * 2**30 // (t * vocab * 4))))
    logits = torch.randn(rows, t, vocab, generator=g).to(device)
    softmax = median_seconds(lambda: torch.log_softmax(logits, -1), repeats, device) * b / rows
    return dict(
        T=t,
        cumsum_ms=cumsum * 1e3,
        dcs=forward / cumsum,
        dcs_rev=backward / cumsum,
        weights_ms=weights * 1e3,
        log_softmax_ms=softmax * 1e3,
        rw=weights / softmax,
        rows=rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iftune.benchmarks.ops", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ref-gib", type=float, default=1.0, help="memory cap of the log_softmax input")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(
        f"B={args.batch}, V={args.vocab}, float32, {device}, {torch.get_num_threads()} CPU threads, "
        f"median of {args.repeats}; gamma=0.95, relation_weights defaults"
    )
    print(
        f"{'T':>6} {'cumsum ms':>10} {'dcs/cumsum':>11} {'dcs rev/cumsum':>15} "
        f"{'weights ms':>11} {'log_softmax ms':>15} {'weights/log_softmax':>20} {'ref rows':>9}"
    )
    for t in args.lengths:
        r = bench_length(args.batch, t, args.vocab, args.ref_gib, args.repeats, device)
        print(
            f"{r['T']:>6} {r['cumsum_ms']:>10.3f} {r['dcs']:>11.1f} {r['dcs_rev']:>15.1f} "
            f"{r['weights_ms']:>11.3f} {r['log_softmax_ms']:>15.1f} {r['rw']:>20.5f} {r['rows']:>9}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
