"""The sequence-length sweep of `iftune bench` as a figure: step time and step peak memory."""

from __future__ import annotations

from typing import Any

from iftune.benchmarks.setup import METHODS


def plot_sweep(result: dict[str, Any], path: str) -> None:
    """Write a two-panel PNG of `result["sweep"]` (seconds per step and step peak MiB against
    the sequence length, one line per method) to `path`; a point not measured is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["sweep"]
    methods = [m for m in METHODS if f"{m}_step_s" in points[0]]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for m in methods:
        for ax, key in ((ax_t, "step_s"), (ax_m, "step_peak_mb")):
            xy = [(p["seq"], p[f"{m}_{key}"]) for p in points if p.get(f"{m}_{key}") is not None]
            ax.plot(*zip(*xy), marker="o", label=m)
    for ax, ylabel in ((ax_t, "seconds per step"), (ax_m, "step peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("sequence length (tokens, prompt a quarter)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    s = result["sizes"]
    fig.suptitle(f"iftune bench: {result['label']}, batch {s['batch']}, {result['precision']}, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["plot_sweep"]
