"""The fine-tuning objectives compared in section 5.3, on a batch of per-seed policies.

Every loss returns one value per seed, shape (G,), and the cells its training inputs touched,
(G, n_states) bool, for the "explored grids" count. The data are the map's two routes: SFT and
IFT see only the optimal one (the target answer), DPO and ORPO the pair (chosen = optimal,
rejected = sub-optimal). A route of states s_0..s_n gives the positions (s_i, a_i), i < n,
where a_i is the action from s_i to s_{i+1}: the state is the "token", the action its label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

from iftune.frozenlake.env import Lake
from iftune.frozenlake.policy import Params, log_probs, one_hot
from iftune.objective import mix_embeddings, relation_weights

METHODS = ("sft", "ift", "dpo", "orpo", "ift-mix", "ift-count")


@dataclass
class Task:
    """The training data of one map, as tensors."""

    n_states: int
    transitions: torch.Tensor  # (nS, A) next state
    chosen: torch.Tensor  # (n,) states s_0..s_{n-1} of the optimal route
    chosen_actions: torch.Tensor  # (n,)
    rejected: torch.Tensor  # (m,) states of the sub-optimal route
    rejected_actions: torch.Tensor  # (m,)

    @classmethod
    def from_lake(cls, lake: Lake) -> Task:
        best, other = lake.routes
        return cls(
            n_states=lake.n_states,
            transitions=torch.as_tensor(lake.transitions),
            chosen=torch.tensor(best[:-1]),
            chosen_actions=torch.tensor(lake.route_actions(best)),
            rejected=torch.tensor(other[:-1]),
            rejected_actions=torch.tensor(lake.route_actions(other)),
        )


@dataclass
class Hyper:
    lam: float = 0.2
    gamma: float = 0.95
    beta_dpo: float = 0.1
    beta_orpo: float = 0.1
    propagation: str = "loss"


LossOut = tuple[torch.Tensor, torch.Tensor]


def route_logps(params: Params, states: torch.Tensor, actions: torch.Tensor, n_states: int) -> torch.Tensor:
    """Teacher-forced log pi(a_i | s_i) along a route, (G, n)."""
    g = params[0].shape[0]
    x = one_hot(states, n_states).expand(g, -1, -1)
    return log_probs(params, x).gather(-1, actions.expand(g, -1)[..., None])[..., 0]


def seen_cells(g: int, n_states: int, *state_sets: torch.Tensor) -> torch.Tensor:
    """(G, nS) bool: which cells appear among the given states (each (n,) or (G, n))."""
    seen = torch.zeros(g, n_states, dtype=torch.bool)
    for s in state_sets:
        seen.scatter_(1, s.expand(g, -1), True)
    return seen


def sft_loss(params: Params, task: Task, hp: Hyper, ref: dict) -> LossOut:
    """Teacher-forced NLL of the optimal route, averaged over its positions."""
    lp = route_logps(params, task.chosen, task.chosen_actions, task.n_states)
    return -lp.mean(-1), seen_cells(lp.shape[0], task.n_states, task.chosen)


def intuited_states(params: Params, task: Task) -> torch.Tensor:
    """s'_i = T(s_{i-1}, argmax pi(.|s_{i-1})) for i >= 1, and s'_0 = s_0 (docs/objective.md, step 2); (G, n).

    The policy's own greedy move from the previous target state: where it errs, s'_i is a
    cell off the route. No gradient flows through the choice."""
    g = params[0].shape[0]
    s = task.chosen
    with torch.no_grad():
        greedy = log_probs(params, one_hot(s[:-1], task.n_states).expand(g, -1, -1)).argmax(-1)
    nxt = task.transitions[s[:-1].expand(g, -1), greedy]
    return torch.cat([s[:1].expand(g, 1), nxt], 1)


def ift_loss(params: Params, task: Task, hp: Hyper, ref: dict) -> LossOut:
    """IFT (eq. 17 and 22): inputs (1-lam)*onehot(s_i) + lam*onehot(s'_i), positions weighted by
    `iftune.objective.relation_weights`, per-route mean as in docs/objective.md, step 6."""
    g = params[0].shape[0]
    further = intuited_states(params, task)
    x = mix_embeddings(one_hot(task.chosen, task.n_states).expand(g, -1, -1), one_hot(further, task.n_states), hp.lam)
    lp = log_probs(params, x).gather(-1, task.chosen_actions.expand(g, -1)[..., None])[..., 0]
    mask = torch.ones_like(lp)
    w = relation_weights(lp, mask, gamma=hp.gamma, propagation=hp.propagation)
    loss = -(lp * w).sum(-1) / mask.sum(-1)
    sets = (task.chosen, further) if hp.lam > 0 else (task.chosen,)
    return loss, seen_cells(g, task.n_states, *sets)


def dpo_loss(params: Params, task: Task, hp: Hyper, ref: dict) -> LossOut:
    """DPO: -log sigmoid(beta * (log-ratio of chosen - log-ratio of rejected)), reference = the start."""
    c = route_logps(params, task.chosen, task.chosen_actions, task.n_states).sum(-1)
    r = route_logps(params, task.rejected, task.rejected_actions, task.n_states).sum(-1)
    margin = (c - ref["chosen_sum"]) - (r - ref["rejected_sum"])
    return -F.logsigmoid(hp.beta_dpo * margin), seen_cells(c.shape[0], task.n_states, task.chosen, task.rejected)


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) with p = exp(mean_logp), stable near p = 1."""
    return mean_logp - torch.log(-torch.expm1(mean_logp.clamp_max(-1e-12)))


def orpo_loss(params: Params, task: Task, hp: Hyper, ref: dict) -> LossOut:
    """ORPO: NLL of chosen + beta * -log sigmoid(log odds(chosen) - log odds(rejected)),
    odds on length-averaged log-probs (Hong et al. 2024)."""
    c = route_logps(params, task.chosen, task.chosen_actions, task.n_states).mean(-1)
    r = route_logps(params, task.rejected, task.rejected_actions, task.n_states).mean(-1)
    ratio = -F.logsigmoid(_log_odds(c) - _log_odds(r))
    return -c + hp.beta_orpo * ratio, seen_cells(c.shape[0], task.n_states, task.chosen, task.rejected)


def reference_terms(start: Params, task: Task) -> dict:
    """What DPO needs from its frozen reference (the starting policy)."""
    with torch.no_grad():
        return {
            "chosen_sum": route_logps(start, task.chosen, task.chosen_actions, task.n_states).sum(-1),
            "rejected_sum": route_logps(start, task.rejected, task.rejected_actions, task.n_states).sum(-1),
        }


def loss_fn(method: str, hp: Hyper) -> Callable[[Params, Task, dict], LossOut]:
    """The loss of a method name; the IFT ablations are IFT with one option changed."""
    if method == "ift-mix":  # mixing only, no relation propagation
        hp = replace(hp, gamma=0.0)
    elif method == "ift-count":  # eq. 22 read literally: weights count the later positions
        hp = replace(hp, propagation="mask")
    fn = {
        "sft": sft_loss,
        "ift": ift_loss,
        "ift-mix": ift_loss,
        "ift-count": ift_loss,
        "dpo": dpo_loss,
        "orpo": orpo_loss,
    }[method]
    return lambda params, task, ref: fn(params, task, hp, ref)


__all__ = ["METHODS", "Hyper", "Task", "intuited_states", "loss_fn", "reference_terms"]
