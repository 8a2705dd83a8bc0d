"""The study's analysis, fixed in docs/study.md before the comparison was run.

For each comparison (a, b) and metric: the paired difference a - b for every (base, seed) where
both ran, then the mean over bases of the per-base mean difference, with a 95% interval from a
hierarchical bootstrap (bases with replacement, then seeds within each base with replacement).
"""

from __future__ import annotations

from iftune.stats import hierarchical_bootstrap, mean_std
from iftune.study.settings import COMPARISONS, LOWER_IS_BETTER, METRICS


def by_key(runs: list[dict], method: str, metric: str) -> dict[tuple[int, int], float]:
    """{(base, seed): metric} of one method's runs."""
    return {(r["base"], r["seed"]): r[metric] for r in runs if r["method"] == method}


def method_summary(runs: list[dict], methods: list[str]) -> dict:
    """Per method and metric: mean and sample std over all its (base, seed) runs, and each base's mean."""
    out = {}
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        if not mine:
            continue
        row: dict = {"n_runs": len(mine)}
        for metric in METRICS:
            mean, std = mean_std([r[metric] for r in mine])
            per_base = {}
            for b in sorted({r["base"] for r in mine}):
                per_base[str(b)] = mean_std([r[metric] for r in mine if r["base"] == b])[0]
            row[metric] = {"mean": mean, "std": std, "per_base": per_base}
        out[m] = row
    return out


def compare(runs: list[dict], a: str, b: str, metric: str, n_boot: int, seed: int = 0) -> dict | None:
    """Paired a - b on `metric`: bootstrap mean and interval, per-base means, and the share of
    (base, seed) pairs where a is better (ties half); None when no pair exists."""
    xa, xb = by_key(runs, a, metric), by_key(runs, b, metric)
    keys = sorted(k for k in xa if k in xb)
    if not keys:
        return None
    groups: dict[int, list[float]] = {}
    for base, s in keys:
        groups.setdefault(base, []).append(xa[(base, s)] - xb[(base, s)])
    sign = -1 if metric in LOWER_IS_BETTER else 1
    wins = [sign * d for g in groups.values() for d in g]
    result = hierarchical_bootstrap(groups, n_boot=n_boot, seed=seed)
    result["per_base"] = {str(k): sum(v) / len(v) for k, v in groups.items()}
    result["a_better_share"] = sum(1.0 if w > 0 else 0.5 if w == 0 else 0.0 for w in wins) / len(wins)
    return result


def verdict(stat: dict | None, lower_is_better: bool = False) -> str:
    """ "a better", "b better" or "inconclusive": a direction only when the interval excludes 0."""
    if stat is None:
        return "not run"
    if stat["low"] > 0:
        return "b better" if lower_is_better else "a better"
    if stat["high"] < 0:
        return "a better" if lower_is_better else "b better"
    return "inconclusive"


def analyse(runs: list[dict], methods: list[str], n_boot: int) -> dict:
    """{"methods": method_summary, "comparisons": {"a_vs_b": {metric: compare + verdict}}}."""
    comparisons = {}
    for a, b in COMPARISONS:
        if a in methods and b in methods:
            row = {}
            for i, metric in enumerate(METRICS):
                stat = compare(runs, a, b, metric, n_boot, seed=i)
                row[metric] = stat and {**stat, "verdict": verdict(stat, metric in LOWER_IS_BETTER)}
            comparisons[f"{a}_vs_{b}"] = row
    return {"methods": method_summary(runs, methods), "comparisons": comparisons}


def primary(analysis: dict) -> str:
    """The pre-registered answer to "does IFT help?" (docs/study.md): from IFT - SFT in exact match."""
    stat = analysis["comparisons"].get("ift_vs_sft", {}).get("exact_match")
    v = verdict(stat)
    return {"a better": "IFT helps", "b better": "IFT hurts"}.get(v, "inconclusive" if stat else "not run")


def table(analysis: dict) -> str:
    """The text tables the command prints: methods, then comparisons with 95% intervals."""
    pct = {"exact_match": 100, "step_accuracy": 100, "heldout_nll": 1}
    lines = [f"{'method':<10} {'runs':>4} {'exact match %':>15} {'step accuracy %':>16} {'held-out NLL':>14}"]
    for m, row in analysis["methods"].items():
        cells = [
            f"{pct[k] * row[k]['mean']:.{3 if k == 'heldout_nll' else 1}f} ± "
            f"{pct[k] * row[k]['std']:.{3 if k == 'heldout_nll' else 1}f}"
            for k in METRICS
        ]
        lines.append(f"{m:<10} {row['n_runs']:>4} {cells[0]:>15} {cells[1]:>16} {cells[2]:>14}")
    header = (
        f"{'a - b (paired)':<18} {'exact match % [95% CI]':>26} {'step accuracy % [95% CI]':>26} "
        f"{'held-out NLL [95% CI]':>26}"
    )
    lines += ["", header]
    for name, row in analysis["comparisons"].items():
        cells = []
        for k in METRICS:
            st = row[k]
            if st is None:
                cells.append("")
                continue
            d = 3 if k == "heldout_nll" else 1
            cells.append(f"{pct[k] * st['mean']:+.{d}f} [{pct[k] * st['low']:+.{d}f}, {pct[k] * st['high']:+.{d}f}]")
        lines.append(f"{name.replace('_vs_', ' - '):<18} {cells[0]:>26} {cells[1]:>26} {cells[2]:>26}")
    return "\n".join(lines)


def forest_plot(analysis: dict, path) -> None:
    """study.png: every comparison's mean difference and 95% interval per metric, each base's
    mean difference as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(analysis["comparisons"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(13, 0.45 * len(names) + 1.6), sharey=True)
    scale = {"exact_match": 100, "step_accuracy": 100, "heldout_nll": 1}
    label = {
        "exact_match": "exact match, points",
        "step_accuracy": "step accuracy, points",
        "heldout_nll": "held-out NLL (lower is better)",
    }
    for ax, metric in zip(axes, METRICS):
        for y, name in enumerate(names):
            st = analysis["comparisons"][name][metric]
            if st is None:
                continue
            k = scale[metric]
            ax.errorbar(
                k * st["mean"],
                y,
                xerr=[[k * (st["mean"] - st["low"])], [k * (st["high"] - st["mean"])]],
                fmt="o",
                color="black",
                capsize=3,
            )
            ax.scatter(
                [k * v for v in st["per_base"].values()],
                [y] * len(st["per_base"]),
                s=10,
                color="tab:blue",
                alpha=0.6,
                zorder=3,
            )
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set(xlabel=f"a - b, {label[metric]}")
    axes[0].set_yticks(range(len(names)), [n.replace("_vs_", " - ") for n in names])
    axes[0].invert_yaxis()
    fig.suptitle("paired differences, mean over bases with 95% hierarchical-bootstrap interval (dots: per base)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def power(first: dict, n_bases: int, n_seeds: int, a: str = "ift", b: str = "sft") -> dict:
    """The minimal detectable effect of a - b (80% power, two-sided 95% cluster-t test) at
    `n_bases` x `n_seeds`, from the seed and base variation of the paired differences in an
    earlier study's runs (`first`: its study.json), per metric that study scored.
    {metric: {"seed_sd", "base_sd", "mde", "n_bases", "n_seeds"}}."""
    from iftune.stats import minimal_detectable_effect, variance_components

    runs = first["runs"]
    out = {}
    for metric in ("step_accuracy", "exact_match", "heldout_nll"):
        xa, xb = by_key(runs, a, metric), by_key(runs, b, metric)
        groups: dict[int, list[float]] = {}
        for base, seed in sorted(k for k in xa if k in xb):
            groups.setdefault(base, []).append(xa[(base, seed)] - xb[(base, seed)])
        parts = variance_components(groups)
        out[metric] = {
            **parts,
            "mde": minimal_detectable_effect(parts["seed_sd"], parts["base_sd"], n_bases, n_seeds),
            "n_bases": n_bases,
            "n_seeds": n_seeds,
        }
    return out


def power_table(first: dict, designs: list[tuple[int, int]]) -> str:
    """The text `iftune study --power FILE` prints: per metric, the first study's seed and base SD
    of IFT - SFT and the minimal detectable effect of each (bases, seeds) design."""
    scale = {"step_accuracy": 100, "exact_match": 100, "heldout_nll": 1}
    lines = [
        f"{'IFT - SFT, from':<16} {'seed SD':>8} {'base SD':>8}  "
        + "  ".join(f"{f'MDE {nb}x{ns}':>10}" for nb, ns in designs)
    ]
    tables = [power(first, nb, ns) for nb, ns in designs]
    for metric in tables[0]:
        k, d = scale[metric], 3 if metric == "heldout_nll" else 1
        row = tables[0][metric]
        lines.append(
            f"{metric:<16} {k * row['seed_sd']:>8.{d}f} {k * row['base_sd']:>8.{d}f}  "
            + "  ".join(f"{k * t[metric]['mde']:>10.{d}f}" for t in tables)
        )
    return "\n".join(lines)
