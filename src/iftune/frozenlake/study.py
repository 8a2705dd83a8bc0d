"""The Frozen Lake study (section 5.3): train every method from one start, measure, compare by seed.

Each seed has its own theta0 and therefore its own theta* (theta0 trained on KL(pi* || pi)),
so the spread across seeds is larger than the gaps between methods: comparisons are paired
by seed (per-seed difference, win rate, paired t), never between unpaired means.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from iftune.frozenlake import policy
from iftune.frozenlake.env import DEFAULT_MAP, Lake, Roller, build_lake, parse_map, target_policy, value_iteration
from iftune.frozenlake.methods import METHODS, Hyper, Task, loss_fn, reference_terms, route_logps
from iftune.stats import paired as paired_stats

BASES = ("init", "subopt", "uniform")
OPTIMIZERS = ("sgd", "adam")
METRICS = ("param_mse", "kl", "success", "rollout_length", "explored_cells")
LOWER_IS_BETTER = {"param_mse", "kl", "rollout_length"}
# The paper's claimed order in parameter MSE (DPO > IFT > ORPO > SFT), plus IFT > SFT.
CLAIMS = (("dpo", "ift"), ("ift", "orpo"), ("orpo", "sft"), ("ift", "sft"))
# Pairs are oriented along the paper's ranking, then the ablations.
PAIR_ORDER = ("dpo", "ift", "orpo", "sft", "ift-mix", "ift-count")


@dataclass
class Settings:
    """One study. The defaults are the setting that follows the paper's description most
    literally: fine-tuning starts from the same network theta* was trained from (theta0)."""

    seeds: int = 20
    base: str = "init"
    optimizer: str = "adam"
    lr: float = 0.01
    steps: int = 200
    lam: float = 0.2
    gamma: float = 0.95
    beta_dpo: float = 0.1
    beta_orpo: float = 0.1
    map: str = DEFAULT_MAP
    hidden: int = 32
    tau: float = 0.01
    eps: float = 0.05
    discount: float = 0.9
    base_steps: int = 100
    checkpoints: int = 10
    methods: tuple[str, ...] = METHODS

    def hyper(self) -> Hyper:
        return Hyper(lam=self.lam, gamma=self.gamma, beta_dpo=self.beta_dpo, beta_orpo=self.beta_orpo)

    def eval_steps(self) -> list[int]:
        return sorted({round(self.steps * k / self.checkpoints) for k in range(self.checkpoints + 1)})


@dataclass
class World:
    """What every method of a study shares: the map, pi*, theta0 and theta* per seed."""

    lake: Lake
    task: Task
    q: np.ndarray
    pi_star: torch.Tensor  # (n_nonterminal, A)
    theta0: policy.Params
    theta_star: policy.Params
    roller: Roller
    starts: dict = field(default_factory=dict)

    @property
    def states(self) -> list[int]:
        return [int(s) for s in self.lake.nonterminal]


def make_world(s: Settings) -> World:
    """Build the map, solve it, and train theta* from each seed's theta0."""
    lake = build_lake(parse_map(s.map))
    q = value_iteration(lake, s.discount)
    states = [int(x) for x in lake.nonterminal]
    pi_star = torch.as_tensor(target_policy(q, s.tau, s.eps)[states], dtype=policy.DTYPE)
    theta0 = policy.init_params(list(range(s.seeds)), lake.n_states, s.hidden)
    theta_star = policy.fit_distribution(theta0, pi_star, states)
    return World(lake, Task.from_lake(lake), q, pi_star, theta0, theta_star, Roller(lake))


def make_start(world: World, base: str, base_steps: int) -> policy.Params:
    """The policy every method starts from: theta0, theta0 after SFT on the sub-optimal route,
    or theta0 trained toward the uniform policy. Built with a fixed Adam(0.01), so that a
    start does not change with the study's optimizer or learning rate."""
    key = (base, base_steps)
    if key in world.starts:
        return world.starts[key]
    if base == "init":
        start = policy.clone(world.theta0)
    elif base == "uniform":
        uniform = torch.full_like(world.pi_star, 1.0 / world.pi_star.shape[1])
        start = policy.fit_distribution(world.theta0, uniform, world.states)
    else:
        t = world.task
        params = policy.clone(world.theta0, requires_grad=True)
        opt = torch.optim.Adam(params, lr=0.01)
        for _ in range(base_steps):
            lp = route_logps(params, t.rejected, t.rejected_actions, t.n_states)
            opt.zero_grad(set_to_none=True)
            (-lp.mean(-1)).sum().backward()
            opt.step()
        start = policy.clone(params)
    world.starts[key] = start
    return start


def evaluate(world: World, params: policy.Params, seen: torch.Tensor) -> dict[str, np.ndarray]:
    """Every metric for every seed, (G,) each."""
    g, n_s = params[0].shape[0], world.lake.n_states
    with torch.no_grad():
        greedy = policy.logits(params, policy.state_inputs(range(n_s), n_s, g)).argmax(-1).numpy()
    rolls = [world.roller(row) for row in greedy]
    return {
        "param_mse": policy.param_mse(params, world.theta_star).numpy(),
        "kl": policy.kl_to(params, world.pi_star, world.states).numpy(),
        "success": np.array([float(ok) for ok, _ in rolls]),
        "rollout_length": np.array([float(n) for _, n in rolls]),
        "explored_cells": seen.sum(1).double().numpy(),
    }


def train_method(
    world: World, start: policy.Params, method: str, s: Settings, eval_steps: list[int]
) -> dict[str, np.ndarray]:
    """Fine-tune every seed's start with one method; metrics (n_checkpoints, G) at `eval_steps`."""
    fn = loss_fn(method, s.hyper())
    ref = reference_terms(start, world.task)
    params = policy.clone(start, requires_grad=True)
    opt = policy.make_optimizer(params, s.optimizer, s.lr)
    seen = torch.zeros(start[0].shape[0], world.lake.n_states, dtype=torch.bool)
    rows = []
    for step in range(max(eval_steps) + 1):
        if step in eval_steps:
            rows.append(evaluate(world, params, seen))
        if step == max(eval_steps):
            break
        loss, cells = fn(params, world.task, ref)
        seen |= cells
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # seeds are independent: each one's gradient is its own loss's
        opt.step()
    return {m: np.stack([r[m] for r in rows]) for m in METRICS}


def paired(a: np.ndarray, b: np.ndarray, metric: str) -> dict:
    """Per-seed comparison of a with b: mean difference (a - b), the share of seeds where a is
    better (ties count half), and the paired t statistic (None when undefined); see iftune.stats."""
    p = paired_stats(a.tolist(), b.tolist(), lower_is_better=metric in LOWER_IS_BETTER)
    return {"mean_diff": p["mean_diff"], "win_rate": p["win_rate"], "t": p["t"]}


def sample_std(values: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """The sample std (n - 1) of iftune.stats, along `axis`; 0 for a single value."""
    n = values.shape[axis] if axis is not None else values.size
    return values.std(axis=axis, ddof=1) if n > 1 else values.std(axis=axis)


def pairs(methods: tuple[str, ...]) -> list[tuple[str, str]]:
    order = [m for m in PAIR_ORDER if m in methods] + [m for m in methods if m not in PAIR_ORDER]
    return [(a, b) for i, a in enumerate(order) for b in order[i + 1 :]]


def summarize(curves: dict[str, dict[str, np.ndarray]], eval_steps: list[int]) -> tuple[dict, dict]:
    """`methods.<name>.<metric>` and `paired.<a>_vs_<b>.<metric>` of results.json."""
    methods = {}
    for name, c in curves.items():
        methods[name] = {
            m: {
                "mean": float(v[-1].mean()),
                "std": float(sample_std(v[-1])),
                "per_seed": v[-1].tolist(),
                "per_step": {"step": list(eval_steps), "mean": v.mean(1).tolist(), "std": sample_std(v, 1).tolist()},
            }
            for m, v in c.items()
        }
    table = {
        f"{a}_vs_{b}": {m: paired(curves[a][m][-1], curves[b][m][-1], m) for m in METRICS}
        for a, b in pairs(tuple(curves))
    }
    return methods, table


def run_study(s: Settings, world: World | None = None) -> dict:
    """One study end to end; returns the content of results.json (plus "curves" for the plot)."""
    t0 = time.perf_counter()
    world = world or make_world(s)
    start = make_start(world, s.base, s.base_steps)
    eval_steps = s.eval_steps()
    curves = {m: train_method(world, start, m, s, eval_steps) for m in s.methods}
    methods, table = summarize(curves, eval_steps)
    lake = world.lake
    return {
        "settings": {**asdict(s), "methods": list(s.methods)},
        "map": {
            "desc": list(lake.desc),
            "optimal_route": lake.routes[0],
            "suboptimal_route": lake.routes[1],
            "theta_star_kl_max": float(policy.kl_to(world.theta_star, world.pi_star, world.states).max()),
            "start_kl_mean": float(policy.kl_to(start, world.pi_star, world.states).mean()),
        },
        "steps": eval_steps,
        "methods": methods,
        "paired": table,
        "runtime_s": round(time.perf_counter() - t0, 2),
        "curves": curves,
    }


def markdown_table(results: dict) -> str:
    """The stdout summary: final metrics per method, then the paired comparisons in parameter
    MSE and in KL (the two distances to the optimum, in parameter and in policy space)."""
    head = "| method | param MSE | KL(pi*‖pi) | success | rollout length | explored cells |"
    lines = [head, "|" + "---|" * 6]
    for name, m in results["methods"].items():
        cells = [f"{m[k]['mean']:.3g} ± {m[k]['std']:.2g}" for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| pair (a vs b) | MSE: mean diff (a - b) | MSE: a better in | MSE: paired t "
        "| KL: mean diff | KL: a better in | KL: paired t |",
        "|" + "---|" * 7,
    ]
    for pair, stats in results["paired"].items():
        cells = []
        for metric in ("param_mse", "kl"):
            p = stats[metric]
            t = "n/a" if p["t"] is None else f"{p['t']:.2f}"
            cells += [f"{p['mean_diff']:.3g}", f"{p['win_rate']:.0%} of seeds", t]
        lines.append(f"| {pair.replace('_vs_', ' vs ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """frozenlake.png: metric vs step per method (mean ± 1 s.e.m. over seeds), final MSE per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves, steps = results["curves"], results["steps"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        ("param_mse", "parameter MSE to θ*"),
        ("kl", "KL(π*‖π), non-terminal states"),
        ("explored_cells", "distinct cells in training inputs"),
    ]
    for ax, (metric, title) in zip(axes.flat, panels):
        for name, c in curves.items():
            v = c[metric]
            mean, sem = v.mean(1), sample_std(v, 1) / math.sqrt(v.shape[1])
            ax.plot(steps, mean, label=name)
            ax.fill_between(steps, mean - sem, mean + sem, alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=8)
    ax = axes[1, 1]
    names = list(curves)
    final = [curves[n]["param_mse"][-1] for n in names]
    ax.boxplot(final, showfliers=False)
    for i, v in enumerate(final, 1):
        ax.scatter(np.full(len(v), i) + np.linspace(-0.15, 0.15, len(v)), v, s=8, alpha=0.6)
    ax.set_xticks(range(1, len(names) + 1), names, fontsize=8)
    ax.set_title("final parameter MSE per seed", fontsize=10)
    st = results["settings"]
    fig.suptitle(
        f"Frozen Lake {st['map']}: base={st['base']}, {st['optimizer']} lr={st['lr']}, "
        f"{st['steps']} steps, {st['seeds']} seeds",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- sweep

SWEEP_LRS = {"sgd": (0.1, 0.3, 1.0), "adam": (0.001, 0.003, 0.01)}
SWEEP_STEPS = (25, 50, 100, 200, 400)


def claim_name(a: str, b: str) -> str:
    return f"{a.upper()}>{b.upper()}"


def run_sweep(s: Settings, progress=None) -> dict:
    """base x optimizer x lr, each run once to the longest step count and read at SWEEP_STEPS.

    For every setting and claimed pair (a, b): the share of seeds where a ends closer to theta*
    than b (parameter MSE); the claim holds in that setting when that share is above one half.
    The same shares in KL(pi* || pi) are kept beside them.
    """
    t0 = time.perf_counter()
    world = make_world(s)
    rows = []
    for base in BASES:
        for opt in OPTIMIZERS:
            for lr in SWEEP_LRS[opt]:
                run = Settings(
                    **{**asdict(s), "base": base, "optimizer": opt, "lr": lr, "methods": ("sft", "ift", "dpo", "orpo")}
                )
                start = make_start(world, base, run.base_steps)
                curves = {m: train_method(world, start, m, run, [0, *SWEEP_STEPS]) for m in run.methods}
                for k, steps in enumerate(SWEEP_STEPS, 1):
                    wins, kl_wins = (
                        {claim_name(a, b): paired(curves[a][m][k], curves[b][m][k], m)["win_rate"] for a, b in CLAIMS}
                        for m in ("param_mse", "kl")
                    )
                    mse = {m: float(c["param_mse"][k].mean()) for m, c in curves.items()}
                    rows.append(
                        {
                            "base": base,
                            "optimizer": opt,
                            "lr": lr,
                            "steps": steps,
                            "win_rate": wins,
                            "holds": {c: w > 0.5 for c, w in wins.items()},
                            "param_mse_mean": mse,
                            "kl_win_rate": kl_wins,
                            "kl_holds": {c: w > 0.5 for c, w in kl_wins.items()},
                        }
                    )
                if progress:
                    progress(f"sweep: base={base} optimizer={opt} lr={lr} done")
    claims = [claim_name(a, b) for a, b in CLAIMS]
    counts = {c: sum(r["holds"][c] for r in rows) for c in claims}
    kl_counts = {c: sum(r["kl_holds"][c] for r in rows) for c in claims}
    full = sum(all(r["holds"][c] for c in claims[:3]) for r in rows)
    kl_full = sum(all(r["kl_holds"][c] for c in claims[:3]) for r in rows)
    return {
        "settings": {k: v for k, v in asdict(s).items() if k not in ("base", "optimizer", "lr", "steps")},
        "grid": {
            "base": list(BASES),
            "optimizer": list(OPTIMIZERS),
            "lr": {k: list(v) for k, v in SWEEP_LRS.items()},
            "steps": list(SWEEP_STEPS),
        },
        "claims": claims,
        "rows": rows,
        "holds_count": counts,
        "full_order_count": full,
        "kl_holds_count": kl_counts,
        "kl_full_order_count": kl_full,
        "n_settings": len(rows),
        "runtime_s": round(time.perf_counter() - t0, 2),
    }


def sweep_markdown(sweep: dict) -> str:
    """The robustness map as a table: one row per setting, each claim's win rate over seeds."""
    claims = sweep["claims"]
    lines = [
        "| base | optimizer | lr | steps | " + " | ".join(claims) + " | full order |",
        "|" + "---|" * (5 + len(claims)),
    ]
    for r in sweep["rows"]:
        cells = [f"{'✓' if r['holds'][c] else '✗'} {r['win_rate'][c]:.0%}" for c in claims]
        full = "✓" if all(r["holds"][c] for c in claims[:3]) else ""
        lines.append(
            f"| {r['base']} | {r['optimizer']} | {r['lr']:g} | {r['steps']} | " + " | ".join(cells) + f" | {full} |"
        )
    n = sweep["n_settings"]
    lines += [
        "",
        "Settings where each claim holds in the majority of seeds: "
        + ", ".join(f"{c} {k}/{n}" for c, k in sweep["holds_count"].items())
        + f"; the full order DPO>IFT>ORPO>SFT: {sweep['full_order_count']}/{n}.",
        "",
        "The same claims in KL(pi*‖pi) instead of parameter MSE: "
        + ", ".join(f"{c} {k}/{n}" for c, k in sweep["kl_holds_count"].items())
        + f"; the full order: {sweep['kl_full_order_count']}/{n}.",
    ]
    return "\n".join(lines)


def plot_sweep(sweep: dict, path: str) -> None:
    """sweep.png: win rate of each claim per setting (green: holds in most seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, claims = sweep["rows"], sweep["claims"]
    grid = np.array([[r["win_rate"][c] for c in claims] for r in rows])
    labels = [f"{r['base']} {r['optimizer']} {r['lr']:g} @{r['steps']}" for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 0.16 * len(rows) + 1.2))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(claims)), claims, fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=5)
    ax.set_title("share of seeds where each claimed order holds (param MSE)", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
