"""The two-layer policy network of section 5.3, vectorized over seeds.

one-hot state -> Linear(n_states, hidden) -> ReLU -> Linear(hidden, 4) -> logits. All seeds'
networks live in one batch of parameters (leading axis = seed), so a training step for every
seed is a single pair of batched matmuls: a study of 20 seeds costs about what one seed does.
The first layer's weight is the "embedding table" of the states: a mixed input
`(1 - lam) * onehot(s) + lam * onehot(s')` (IFT) selects the matching mix of its rows.
"""

from __future__ import annotations

import math

import torch

DTYPE = torch.float64

Params = list[torch.Tensor]  # [W1 (G, nS, H), b1 (G, H), W2 (G, H, A), b2 (G, A)]


def init_params(seeds: list[int], n_states: int, hidden: int, n_actions: int = 4) -> Params:
    """One network per seed, each drawn like torch.nn.Linear's default (U(+-1/sqrt(fan_in)))
    from its own generator, so seed k's theta0 does not depend on how many seeds run."""
    per_seed = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        shapes = [
            ((n_states, hidden), n_states),
            ((hidden,), n_states),
            ((hidden, n_actions), hidden),
            ((n_actions,), hidden),
        ]
        per_seed.append(
            [(torch.rand(shape, generator=g, dtype=DTYPE) * 2 - 1) / math.sqrt(fan) for shape, fan in shapes]
        )
    return [torch.stack(ts) for ts in zip(*per_seed)]


def clone(params: Params, requires_grad: bool = False) -> Params:
    return [p.detach().clone().requires_grad_(requires_grad) for p in params]


def logits(params: Params, x: torch.Tensor) -> torch.Tensor:
    """x: (G, N, n_states) inputs (one-hot or mixed) -> (G, N, A) logits, one network per row g."""
    w1, b1, w2, b2 = params
    h = torch.relu(torch.baddbmm(b1[:, None], x, w1))
    return torch.baddbmm(b2[:, None], h, w2)


def log_probs(params: Params, x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits(params, x), -1)


def one_hot(states: torch.Tensor, n_states: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(states.long(), n_states).to(DTYPE)


def state_inputs(states: list[int] | torch.Tensor, n_states: int, n_groups: int) -> torch.Tensor:
    """The same states for every seed: (G, N, n_states) one-hot."""
    x = one_hot(torch.as_tensor(states), n_states)
    return x.expand(n_groups, *x.shape)


def flat(params: Params) -> torch.Tensor:
    """(G, P): every parameter of each seed's network in one row."""
    return torch.cat([p.detach().reshape(p.shape[0], -1) for p in params], 1)


def param_mse(params: Params, target: Params) -> torch.Tensor:
    """Mean squared distance between parameters, per seed (the paper's score)."""
    return (flat(params) - flat(target)).square().mean(1)


def kl_to(params: Params, target: torch.Tensor, states: list[int]) -> torch.Tensor:
    """KL(target || pi) averaged over `states`, per seed. target: (len(states), A) probabilities."""
    g, n_s = params[0].shape[0], params[0].shape[1]
    with torch.no_grad():
        lp = log_probs(params, state_inputs(states, n_s, g))
    t = target.to(DTYPE)
    return (t * (t.clamp_min(1e-300).log() - lp)).sum(-1).mean(-1)


def make_optimizer(params: Params, name: str, lr: float) -> torch.optim.Optimizer:
    """Elementwise optimizers, so each seed's update depends on its own slice only."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.Adam(params, lr=lr)


def fit_distribution(
    start: Params, target: torch.Tensor, states: list[int], *, steps: int = 5000, lr: float = 0.01, tol: float = 1e-5
) -> Params:
    """Train `start` on KL(target || pi) over `states` with Adam until every seed's KL < tol.

    Used for theta* (target pi*) and for the `uniform` start (target uniform).
    """
    params = clone(start, requires_grad=True)
    opt = torch.optim.Adam(params, lr=lr)
    g, n_s = start[0].shape[0], start[0].shape[1]
    x = state_inputs(states, n_s, g)
    t = target.to(DTYPE)
    neg_entropy = (t * t.clamp_min(1e-300).log()).sum(-1).mean(-1)
    for _ in range(steps):
        kl = neg_entropy - (t * log_probs(params, x)).sum(-1).mean(-1)
        if float(kl.detach().max()) < tol:
            break
        opt.zero_grad(set_to_none=True)
        kl.sum().backward()
        opt.step()
    return clone(params)
