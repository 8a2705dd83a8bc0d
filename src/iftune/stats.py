"""Paired statistics shared by the demo, the study and Frozen Lake.

One definition of spread everywhere: **std is the sample standard deviation** (n - 1 in the
denominator), 0 for a single value. Comparisons are always paired: two methods are compared
through their per-seed (or per base and seed) differences, never through unpaired means.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Mapping, Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Returns (mean, sample std); the std of a single value is 0."""
    if not values:
        raise ValueError("mean_std of no values")
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def paired_differences(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> dict[Hashable, float]:
    """Returns {key: a[key] - b[key]} over the keys both have (a seed, or a (base, seed) pair)."""
    return {k: a[k] - b[k] for k in a if k in b}


def paired(a: Sequence[float], b: Sequence[float], lower_is_better: bool = False) -> dict:
    """Per-seed comparison of a with b (same order). Returns the mean difference (a - b), its
    sample std, the share of seeds where a is better (ties count half) and the paired t statistic
    (None when the differences do not vary)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired needs two equally long, non-empty lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    better = [-x if lower_is_better else x for x in d]
    win = sum(1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in better) / len(d)
    mean, sd = mean_std(d)
    t = mean / (sd / math.sqrt(len(d))) if sd > 0 else None
    return {"mean_diff": mean, "std": sd, "win_rate": win, "t": t}


def hierarchical_bootstrap(
    groups: Mapping[Hashable, Sequence[float]], n_boot: int = 10000, level: float = 0.95, seed: int = 0
) -> dict:
    """Mean of `groups` (e.g. base -> per-seed paired differences) with a percentile interval that
    counts both levels of variation: each replicate draws the groups with replacement, then within
    each drawn group its values with replacement, and averages the group means (every group
    weighs the same). Returns {"mean", "low", "high", "level", "n_groups", "n_values"}; "mean" is
    the mean of the group means of the data itself."""
    cells = [list(v) for v in groups.values() if len(v)]
    if not cells:
        raise ValueError("hierarchical_bootstrap of no values")
    rng = random.Random(seed)
    reps = []
    for _ in range(n_boot):
        drawn = [cells[rng.randrange(len(cells))] for _ in cells]
        reps.append(sum(sum(rng.choice(c) for _ in c) / len(c) for c in drawn) / len(drawn))
    reps.sort()
    tail = (1 - level) / 2
    low = reps[math.floor(tail * (n_boot - 1))]
    high = reps[math.ceil((1 - tail) * (n_boot - 1))]
    return {
        "mean": sum(sum(c) / len(c) for c in cells) / len(cells),
        "low": low,
        "high": high,
        "level": level,
        "n_groups": len(cells),
        "n_values": sum(map(len, cells)),
    }


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with `df` degrees of freedom (numpy has no t distribution and
    scipy is not a dependency)."""
    if df <= 0:
        raise ValueError(f"t_cdf needs df > 0, got {df}")
    if x * x < df:  # near 0: the central form keeps its precision
        return 0.5 + math.copysign(0.5 * _betainc(0.5, df / 2.0, x * x / (df + x * x)), x)
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + x * x))
    return 1.0 - tail if x > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The x with t_cdf(x, df) = p (bisection to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def cluster_t(groups: Mapping[Hashable, Sequence[float]], level: float = 0.95) -> dict:
    """Mean of the group means (e.g. per-base means of per-seed paired differences) with a t
    interval on those means, n_groups - 1 degrees of freedom, and the two-sided p-value of
    "mean = 0". The groups are the independent units, so the interval keeps its coverage with
    few of them, where a percentile bootstrap is too narrow. Returns {"mean", "low", "high",
    "level", "se", "df", "p"} (df + 1 groups); with one group, or groups that do not vary, there is no
    interval (low = high = mean, se 0, p None)."""
    means = [sum(v) / len(v) for v in groups.values() if len(v)]
    if not means:
        raise ValueError("cluster_t of no values")
    mean, sd = mean_std(means)
    n = len(means)
    if n < 2 or sd == 0:
        return {"mean": mean, "low": mean, "high": mean, "level": level, "se": 0.0, "df": n - 1, "p": None}
    se = sd / math.sqrt(n)
    half = t_quantile(1 - (1 - level) / 2, n - 1) * se
    p = 2 * (1 - t_cdf(abs(mean) / se, n - 1))
    return {"mean": mean, "low": mean - half, "high": mean + half, "level": level, "se": se, "df": n - 1, "p": p}


def holm(pvalues: Mapping[Hashable, float | None]) -> dict[Hashable, float | None]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1) of a family; None stays None
    and is not counted in the family."""
    given = sorted(((p, k) for k, p in pvalues.items() if p is not None), key=lambda pk: pk[0])
    m, out, running = len(given), dict.fromkeys(pvalues), 0.0
    for i, (p, k) in enumerate(given):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def variance_components(groups: Mapping[Hashable, Sequence[float]]) -> dict:
    """Method-of-moments split of paired differences (group -> per-seed values) into the SD
    between seeds within a group (pooled) and the SD of the groups' true means: the between-group
    variance of the group means less the part the seeds explain, floored at 0. Needs >= 2 groups
    of >= 2 values (equal sizes are assumed for the correction; the mean size is used)."""
    cells = [list(v) for v in groups.values() if len(v) >= 2]
    if len(cells) < 2:
        raise ValueError("variance_components needs at least 2 groups of at least 2 values")
    within = sum(mean_std(c)[1] ** 2 * (len(c) - 1) for c in cells) / sum(len(c) - 1 for c in cells)
    between = mean_std([sum(c) / len(c) for c in cells])[1] ** 2
    n_per = sum(map(len, cells)) / len(cells)
    return {"seed_sd": math.sqrt(within), "base_sd": math.sqrt(max(0.0, between - within / n_per))}


def minimal_detectable_effect(
    seed_sd: float, base_sd: float, n_bases: int, n_seeds: int, level: float = 0.95, power: float = 0.8
) -> float:
    """The true mean difference a cluster-t test on `n_bases` per-base means (each over
    `n_seeds` paired seeds) detects with probability `power` at two-sided `level`:
    (t_{1-alpha/2} + t_{power}) x sqrt((base_sd^2 + seed_sd^2 / n_seeds) / n_bases), df = n_bases - 1
    (the usual normal-shift approximation with t quantiles)."""
    if n_bases < 2 or n_seeds < 1:
        raise ValueError(f"minimal_detectable_effect needs >= 2 bases and >= 1 seed, got {n_bases} and {n_seeds}")
    se = math.sqrt((base_sd**2 + seed_sd**2 / n_seeds) / n_bases)
    df = n_bases - 1
    return (t_quantile(1 - (1 - level) / 2, df) + t_quantile(power, df)) * se
