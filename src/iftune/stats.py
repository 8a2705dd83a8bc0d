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
