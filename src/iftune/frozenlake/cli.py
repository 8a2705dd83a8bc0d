"""`iftune frozenlake`: the paper's Frozen Lake study (section 5.3) in one command.

iftune frozenlake                      # default study: results.json, frozenlake.png, table
iftune frozenlake --sweep              # robustness map over base x optimizer x lr x steps
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from iftune.errors import UserError, check_unit
from iftune.frozenlake.env import DEFAULT_MAP, MAPS
from iftune.frozenlake.study import (
    BASES,
    OPTIMIZERS,
    Settings,
    make_world,
    markdown_table,
    plot,
    plot_sweep,
    run_study,
    run_sweep,
    sweep_markdown,
)


class _Parser(argparse.ArgumentParser):
    """Bad options become one-line UserErrors, like every other iftune command."""

    def error(self, message: str):
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = _Parser(prog="iftune frozenlake", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=d.seeds, help="independent seeds (own theta0 and theta*)")
    p.add_argument(
        "--base",
        choices=BASES,
        default=d.base,
        help="start: theta0, theta0 + SFT on the sub-optimal route, or theta0 trained to uniform",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--steps", type=int, default=d.steps, help="fine-tuning steps per method")
    p.add_argument("--lam", type=float, default=d.lam, help="IFT's mixing coefficient (eq. 17)")
    p.add_argument("--gamma", type=float, default=d.gamma, help="IFT's relation propagation discount")
    p.add_argument("--beta-dpo", type=float, default=d.beta_dpo)
    p.add_argument("--beta-orpo", type=float, default=d.beta_orpo)
    p.add_argument(
        "--map",
        default=d.map,
        help=f"{', '.join(MAPS)} (default {DEFAULT_MAP}) or rows separated by '/', e.g. SFFF/FHHF/FHHF/FFGF",
    )
    p.add_argument("--hidden", type=int, default=d.hidden, help="hidden units of the policy network")
    p.add_argument("--tau", type=float, default=d.tau, help="temperature of pi* = softmax(Q*/tau)")
    p.add_argument("--eps", type=float, default=d.eps, help="uniform share mixed into pi*")
    p.add_argument("--base-steps", type=int, default=d.base_steps, help="SFT steps that make the subopt start")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default=os.path.join("outputs", "frozenlake"))
    p.add_argument("--sweep", action="store_true", help="run the robustness grid instead of one study")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    for name in ("seeds", "steps", "hidden"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}={getattr(args, name)} is not valid; expected an integer >= 1")
    if args.base_steps < 0:
        raise UserError(f"--base-steps={args.base_steps} is not valid; expected an integer >= 0")
    for name in ("lr", "beta_dpo", "beta_orpo", "tau"):
        v = getattr(args, name)
        if not (v > 0 and math.isfinite(v)):
            raise UserError(f"--{name.replace('_', '-')}={v} is not valid; expected a number > 0")
    for name in ("lam", "gamma", "eps"):
        check_unit(f"--{name}", getattr(args, name))
    return Settings(
        seeds=args.seeds,
        base=args.base,
        optimizer=args.optimizer,
        lr=args.lr,
        steps=args.steps,
        lam=args.lam,
        gamma=args.gamma,
        beta_dpo=args.beta_dpo,
        beta_orpo=args.beta_orpo,
        map=args.map,
        hidden=args.hidden,
        tau=args.tau,
        eps=args.eps,
        base_steps=args.base_steps,
    )


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    # The networks are tiny: one thread is faster than several fighting over each small matmul.
    torch.set_num_threads(1)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.sweep:
        sweep = run_sweep(settings, progress=lambda m: print(m, file=sys.stderr))
        _write_json(os.path.join(args.output_dir, "sweep.json"), sweep)
        table = sweep_markdown(sweep)
        with open(os.path.join(args.output_dir, "sweep.md"), "w") as f:
            f.write(table + "\n")
        plot_sweep(sweep, os.path.join(args.output_dir, "sweep.png"))
        print(table)
        print(f"\nwrote sweep.json, sweep.md, sweep.png to {args.output_dir} ({sweep['runtime_s']} s)")
        return 0
    results = run_study(settings, make_world(settings))
    plot(results, os.path.join(args.output_dir, "frozenlake.png"))
    results.pop("curves")
    _write_json(os.path.join(args.output_dir, "results.json"), results)
    print(markdown_table(results))
    print(f"\nwrote results.json and frozenlake.png to {args.output_dir} ({results['runtime_s']} s)")
    return 0


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
