"""The Frozen Lake study (iftune.frozenlake): world, objectives, statistics and command line.

No test here asserts the paper's ordering of the methods: that is a measurement (docs/frozenlake.md).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from iftune import cli
from iftune.errors import UserError
from iftune.frozenlake import policy, study
from iftune.frozenlake.env import MAPS, build_lake, greedy_route, parse_map, target_policy, value_iteration
from iftune.frozenlake.methods import METHODS, Hyper, intuited_states, loss_fn, reference_terms

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world():
    return study.make_world(study.Settings(seeds=3))


def test_value_iteration_finds_the_six_step_route_on_the_ring():
    lake = build_lake(MAPS["ring5"])
    q = value_iteration(lake, discount=0.9)
    route = greedy_route(lake, q)
    assert route == [0, 5, 10, 15, 20, 21, 22]  # down the left side, then right to G
    assert lake.routes[0] == route and len(lake.routes[1]) - 1 == 10
    # Q*(s, a) = discount^(steps to G after a, under pi*): down is 6 steps in all; right is
    # cheapest undone by stepping back (1 + 1 + 6 steps), not by the 10-step route.
    assert q[0, 1] == pytest.approx(0.9**5) and q[0, 2] == pytest.approx(0.9**7)
    assert lake.route_actions(route) == [1, 1, 1, 1, 2, 2]


def test_named_maps_have_two_routes_and_the_shared_one_shares_its_tail():
    for name in MAPS:
        best, other = build_lake(MAPS[name]).routes
        assert len(best) < len(other)
    best, other = build_lake(MAPS["shared"]).routes
    assert best[-3:] == other[-3:] and best[0] == other[0]


def test_target_policy_mixes_softmax_and_uniform():
    q = np.array([[1.0, 0.0, 0.0, 0.0]])
    p = target_policy(q, tau=0.5, eps=0.2)
    soft = np.exp([2.0, 0, 0, 0]) / np.exp([2.0, 0, 0, 0]).sum()
    np.testing.assert_allclose(p[0], 0.8 * soft + 0.05)


def test_theta_star_fits_pi_star(world):
    kl = policy.kl_to(world.theta_star, world.pi_star, world.states)
    assert float(kl.max()) < 1e-4
    assert float(policy.kl_to(world.theta0, world.pi_star, world.states).min()) > 0.1


def test_seeds_are_independent_in_the_batch(world):
    """Seed k's theta0 does not depend on the batch, and its gradient is its own loss's."""
    alone = policy.init_params([2], world.lake.n_states, 32)
    for a, b in zip(alone, world.theta0):
        assert torch.equal(a[0], b[2])
    fn = loss_fn("ift", Hyper())
    grads = []
    for params in (policy.clone(world.theta0, True), policy.clone(alone, True)):
        loss, _ = fn(params, world.task, {})
        loss.sum().backward()
        grads.append(params[0].grad)
    torch.testing.assert_close(grads[0][2], grads[1][0], rtol=0, atol=1e-12)


def test_ift_with_lam_and_gamma_zero_is_sft(world):
    params = world.theta0
    sft, _ = loss_fn("sft", Hyper())(params, world.task, {})
    ift0, _ = loss_fn("ift", Hyper(lam=0.0, gamma=0.0))(params, world.task, {})
    ift, _ = loss_fn("ift", Hyper())(params, world.task, {})
    torch.testing.assert_close(ift0, sft, rtol=0, atol=1e-12)
    assert not torch.allclose(ift, sft)


@pytest.mark.parametrize("method", METHODS)
def test_each_loss_falls_over_a_few_steps(world, method):
    fn = loss_fn(method, Hyper())
    ref = reference_terms(world.theta0, world.task)
    params = policy.clone(world.theta0, requires_grad=True)
    opt = torch.optim.Adam(params, lr=0.01)
    losses = []
    for _ in range(6):
        loss, _ = fn(params, world.task, ref)
        losses.append(loss.detach())
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    if method == "dpo":  # at the reference the margin is 0: -log sigmoid(0)
        torch.testing.assert_close(losses[0], torch.full_like(losses[0], math.log(2)))
    assert bool((losses[-1] < losses[0]).all())


def test_intuited_cells_leave_the_route_once_the_policy_errs(world):
    task = world.task
    # theta* follows the optimal route, so its intuition is the route itself.
    assert torch.equal(intuited_states(world.theta_star, task), task.chosen.expand(3, -1))
    # A policy that always moves right errs at every state of the route (down, down, ...).
    wrong = policy.clone(world.theta_star)
    wrong[3][:, 2] = 100.0
    further = intuited_states(wrong, task)
    assert further[0].tolist() == [0, 1, 6, 11, 16, 21]  # T(s_{i-1}, right); 6, 11, 16 are holes
    _, seen = loss_fn("ift", Hyper())(wrong, task, {})
    _, seen_sft = loss_fn("sft", Hyper())(wrong, task, {})
    off_route = set(seen[0].nonzero().flatten().tolist()) - set(task.chosen.tolist())
    assert off_route == {1, 6, 11, 16}
    assert int(seen_sft[0].sum()) == len(task.chosen)


def test_paired_statistics_on_known_values():
    a, b = np.array([1.0, 2.0, 3.0, 5.0]), np.array([2.0, 2.0, 1.0, 1.0])
    p = study.paired(a, b, "param_mse")  # lower is better: a wins once, ties once
    d = a - b
    assert p["mean_diff"] == pytest.approx(1.25)
    assert p["win_rate"] == pytest.approx((1 + 0.5) / 4)
    assert p["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / 2))
    assert study.paired(a, b, "success")["win_rate"] == pytest.approx((2 + 0.5) / 4)
    assert study.paired(a, a, "kl")["t"] is None


def test_command_line_writes_documented_outputs_in_seconds(tmp_path, capsys):
    t0 = time.perf_counter()
    rc = cli.main(["frozenlake", "--seeds", "2", "--steps", "20", "--output-dir", str(tmp_path)])
    assert rc == 0 and time.perf_counter() - t0 < 20
    out = capsys.readouterr().out
    assert out.startswith("| method | param MSE") and "| dpo vs ift |" in out
    assert (tmp_path / "frozenlake.png").stat().st_size > 1000
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["settings"]["seeds"] == 2 and res["settings"]["steps"] == 20
    assert res["steps"][0] == 0 and res["steps"][-1] == 20
    assert set(res["methods"]) == set(METHODS)
    for name in METHODS:
        for metric in study.METRICS:
            m = res["methods"][name][metric]
            assert {"mean", "std"} <= set(m) and len(m["per_seed"]) == 2
            assert len(m["per_step"]["mean"]) == len(res["steps"]) == len(m["per_step"]["std"])
    assert {"dpo_vs_ift", "ift_vs_orpo", "orpo_vs_sft", "ift_vs_sft"} <= set(res["paired"])
    for stats in res["paired"].values():
        for metric in study.METRICS:
            assert set(stats[metric]) == {"mean_diff", "win_rate", "t"}
    # Explored cells: SFT sees the 6 route states, DPO and ORPO both routes (6 + 10 - 1 shared).
    assert res["methods"]["sft"]["explored_cells"]["mean"] == 6
    assert res["methods"]["dpo"]["explored_cells"]["mean"] == 15


def test_sweep_writes_a_robustness_map(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(study, "BASES", ("init",))
    monkeypatch.setattr(study, "SWEEP_LRS", {"sgd": (0.1,), "adam": (0.01,)})
    monkeypatch.setattr(study, "SWEEP_STEPS", (3, 6))
    rc = cli.main(["frozenlake", "--sweep", "--seeds", "2", "--output-dir", str(tmp_path)])
    assert rc == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["n_settings"] == len(sweep["rows"]) == 4
    row = sweep["rows"][0]
    assert set(row["win_rate"]) == {"DPO>IFT", "IFT>ORPO", "ORPO>SFT", "IFT>SFT"}
    assert all(row["holds"][c] == (row["win_rate"][c] > 0.5) for c in row["holds"])
    assert (tmp_path / "sweep.png").exists() and "| init | sgd | 0.1 | 3 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "desc, what",
    [
        ("SFF/HHH/FFG", "no route"),
        ("/".join(["SFFFFFFF"] + ["FFFFFFFF"] * 5 + ["FFFFFFHH", "FFFFFFHG"]), "no route"),  # open, G walled off
        ("SFF/HHF/FFG", "only one route"),
        ("SFF/FFF/FFG", "more than two routes"),
        ("SFF/FHF/FFG", "both routes take 4 steps"),
    ],
)
def test_maps_without_exactly_two_routes_are_refused(desc, what, capsys, tmp_path):
    with pytest.raises(UserError, match=what):
        build_lake(parse_map(desc))
    rc = cli.main(["frozenlake", "--map", desc, "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("iftune frozenlake: error: ") and what in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--map", "SFX/FFG"], "unexpected letter"),
        (["--map", "SF/FFG"], "equal length"),
        (["--lam", "1.5"], "--lam"),
        (["--lr", "0"], "--lr"),
        (["--optimizer", "rmsprop"], "--optimizer"),
    ],
)
def test_bad_options_are_one_line_errors(argv, field, capsys):
    assert cli.main(["frozenlake", *argv]) == 2
    err = capsys.readouterr().err
    assert field in err and err.count("\n") == 1
