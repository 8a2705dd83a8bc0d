"""The second study's analysis, fixed in docs/study.md before any run of its design.

For each comparison (a, b) and metric: the paired difference a - b for every (base, seed) where
both have a value, averaged within each base. The per-base means are the independent units: the
cluster-t interval on them decides (`iftune.stats.cluster_t`); the hierarchical percentile
bootstrap is reported beside it. The primary comparison and the positive control are single
pre-registered tests; every other (comparison, metric) cell is exploratory and Holm-corrected
as one family.
"""

from __future__ import annotations

from iftune.stats import cluster_t, hierarchical_bootstrap, holm, mean_std
from iftune.study.settings import COMPARISONS, LOWER_IS_BETTER, METRICS, POSITIVE_CONTROL, PRIMARY

SCALE = {"heldout_nll": 1}  # every other metric is a share, shown in points (x 100)


def by_key(runs: list[dict], method: str, metric: str) -> dict[tuple[int, int], float]:
    """{(base, seed): metric} of one method's runs that have a value."""
    return {(r["base"], r["seed"]): r[metric] for r in runs if r["method"] == method and r.get(metric) is not None}


def method_summary(runs: list[dict], methods: list[str]) -> dict:
    """Per method and metric: mean and sample std over its (base, seed) runs, and each base's mean."""
    out = {}
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        if not mine:
            continue
        row: dict = {"n_runs": len(mine)}
        for metric in METRICS:
            values = [r for r in mine if r.get(metric) is not None]
            if not values:
                row[metric] = None
                continue
            mean, std = mean_std([r[metric] for r in values])
            per_base = {}
            for b in sorted({r["base"] for r in values}):
                per_base[str(b)] = mean_std([r[metric] for r in values if r["base"] == b])[0]
            row[metric] = {"mean": mean, "std": std, "per_base": per_base}
        out[m] = row
    return out


def compare(runs: list[dict], a: str, b: str, metric: str, n_boot: int, seed: int = 0) -> dict | None:
    """Paired a - b on `metric`: the cluster-t interval and p-value, the hierarchical bootstrap
    interval, per-base means and the share of (base, seed) pairs where a is better (ties half);
    None when no pair exists."""
    xa, xb = by_key(runs, a, metric), by_key(runs, b, metric)
    keys = sorted(k for k in xa if k in xb)
    if not keys:
        return None
    groups: dict[int, list[float]] = {}
    for base, s in keys:
        groups.setdefault(base, []).append(xa[(base, s)] - xb[(base, s)])
    sign = -1 if metric in LOWER_IS_BETTER else 1
    wins = [sign * d for g in groups.values() for d in g]
    ct = cluster_t(groups)
    return {
        "mean": ct["mean"],
        "cluster_t": ct,
        "bootstrap": hierarchical_bootstrap(groups, n_boot=n_boot, seed=seed),
        "per_base": {str(k): sum(v) / len(v) for k, v in groups.items()},
        "n_bases": len(groups),
        "n_pairs": len(keys),
        "a_better_share": sum(1.0 if w > 0 else 0.5 if w == 0 else 0.0 for w in wins) / len(wins),
    }


def direction(low: float, high: float, lower_is_better: bool = False) -> str:
    """ "a better", "b better" or "inconclusive": a direction only when the interval excludes 0."""
    if low > 0:
        return "b better" if lower_is_better else "a better"
    if high < 0:
        return "a better" if lower_is_better else "b better"
    return "inconclusive"


def primary_verdict(stat: dict | None, smallest_effect: float) -> str:
    """The pre-registered answer from IFT - SFT's cluster-t interval [L, H] and delta: "IFT better"
    (L > 0), "IFT worse" (H < 0), each "by less than delta" when the whole interval is within
    delta of 0; "level" (-delta < L, H < delta); else "inconclusive"."""
    if stat is None:
        return "not run"
    low, high = stat["cluster_t"]["low"], stat["cluster_t"]["high"]
    small = (
        f", by less than {100 * smallest_effect:g} points" if -smallest_effect < low and high < smallest_effect else ""
    )
    if low > 0:
        return "IFT better" + small
    if high < 0:
        return "IFT worse" + small
    return "level" if small else "inconclusive"


def cell(a: str, b: str, metric: str) -> str:
    return f"{a}_vs_{b}/{metric}"


def analyse(runs: list[dict], methods: list[str], n_boot: int, smallest_effect: float) -> dict:
    """{"methods", "comparisons": {"a_vs_b": {metric: compare + role + p_holm + verdict}},
    "answer", "positive_control"}."""
    comparisons: dict = {}
    for a, b in COMPARISONS:
        if a in methods and b in methods:
            comparisons[f"{a}_vs_{b}"] = {m: compare(runs, a, b, m, n_boot, seed=i) for i, m in enumerate(METRICS)}
    special = {cell(*PRIMARY): "primary", cell(*POSITIVE_CONTROL): "positive control"}
    family = {
        cell(*name.split("_vs_"), m): st["cluster_t"]["p"]
        for name, row in comparisons.items()
        for m, st in row.items()
        if st is not None and cell(*name.split("_vs_"), m) not in special
    }
    adjusted = holm(family)
    for name, row in comparisons.items():
        for m, st in row.items():
            if st is None:
                continue
            key = cell(*name.split("_vs_"), m)
            ct = st["cluster_t"]
            st["role"] = special.get(key, "exploratory")
            st["p_holm"] = adjusted.get(key)
            if st["role"] == "exploratory":
                p = st["p_holm"]
                st["verdict"] = (
                    direction(ct["mean"], ct["mean"], m in LOWER_IS_BETTER)
                    if p is not None and p < 0.05
                    else "inconclusive"
                )
            else:
                st["verdict"] = direction(ct["low"], ct["high"], m in LOWER_IS_BETTER)
    primary = comparisons.get("_vs_".join(PRIMARY[:2]), {}).get(PRIMARY[2])
    control = comparisons.get("_vs_".join(POSITIVE_CONTROL[:2]), {}).get(POSITIVE_CONTROL[2])
    return {
        "methods": method_summary(runs, methods),
        "comparisons": comparisons,
        "answer": primary_verdict(primary, smallest_effect),
        "positive_control": control
        and {
            "comparison": f"{POSITIVE_CONTROL[0]} - {POSITIVE_CONTROL[1]}",
            "metric": POSITIVE_CONTROL[2],
            "mean": control["cluster_t"]["mean"],
            "low": control["cluster_t"]["low"],
            "high": control["cluster_t"]["high"],
            "held": control["cluster_t"]["low"] > 0,
        },
    }


def _fmt(metric: str, x: float) -> str:
    k = SCALE.get(metric, 100)
    return f"{k * x:+.{3 if k == 1 else 1}f}"


def table(analysis: dict) -> str:
    """The text tables the command prints: methods, then every comparison and metric with its
    cluster-t and bootstrap 95% intervals, p-values and verdict."""
    short = {
        "step_validity": "validity",
        "exact_match": "exact",
        "step_accuracy": "step acc",
        "heldout_nll": "NLL",
        "validity_after_error": "after err",
    }
    lines = [f"{'method':<9} {'runs':>4} " + " ".join(f"{short[m]:>15}" for m in METRICS)]
    for name, row in analysis["methods"].items():
        cells = []
        for m in METRICS:
            st, k = row[m], SCALE.get(m, 100)
            d = 3 if k == 1 else 1
            cells.append("" if st is None else f"{k * st['mean']:.{d}f} ± {k * st['std']:.{d}f}")
        lines.append(f"{name:<9} {row['n_runs']:>4} " + " ".join(f"{c:>15}" for c in cells))
    lines += [
        "",
        f"{'a - b (paired)':<18} {'metric':<10} {'mean':>7} {'cluster-t 95%':>17} {'bootstrap 95%':>17} "
        f"{'p':>6} {'p Holm':>6}  verdict ({'role'})",
    ]
    for name, row in analysis["comparisons"].items():
        for m in METRICS:
            st = row[m]
            if st is None:
                continue
            ct, bs = st["cluster_t"], st["bootstrap"]
            p = "" if ct["p"] is None else f"{ct['p']:.3f}"
            ph = "" if st["p_holm"] is None else f"{st['p_holm']:.3f}"
            lines.append(
                f"{name.replace('_vs_', ' - '):<18} {short[m]:<10} {_fmt(m, ct['mean']):>7} "
                f"{'[' + _fmt(m, ct['low']) + ', ' + _fmt(m, ct['high']) + ']':>17} "
                f"{'[' + _fmt(m, bs['low']) + ', ' + _fmt(m, bs['high']) + ']':>17} {p:>6} {ph:>6}  "
                f"{st['verdict']} ({st['role']})"
            )
    return "\n".join(lines)


def forest_plot(analysis: dict, path) -> None:
    """study.png: every comparison's mean difference with its cluster-t 95% interval (black) and
    bootstrap interval (grey, thinner) per metric, each base's mean difference as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(analysis["comparisons"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(18, 0.45 * len(names) + 1.8), sharey=True)
    label = {
        "step_validity": "step validity, points",
        "exact_match": "exact match, points",
        "step_accuracy": "step accuracy, points",
        "heldout_nll": "held-out NLL (lower is better)",
        "validity_after_error": "validity after 1st error, points",
    }
    for ax, metric in zip(axes, METRICS):
        k = SCALE.get(metric, 100)
        for y, name in enumerate(names):
            st = analysis["comparisons"][name][metric]
            if st is None:
                continue
            for interval, offset, color, width in (
                (st["cluster_t"], -0.12, "black", 1.6),
                (st["bootstrap"], 0.12, "grey", 1),
            ):
                ax.errorbar(
                    k * st["mean"],
                    y + offset,
                    xerr=[[k * (st["mean"] - interval["low"])], [k * (interval["high"] - st["mean"])]],
                    fmt="o",
                    color=color,
                    elinewidth=width,
                    markersize=3,
                    capsize=2,
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
    fig.suptitle(
        "paired differences, mean over bases: cluster-t 95% interval (black), "
        "hierarchical bootstrap (grey); dots: per base"
    )
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
