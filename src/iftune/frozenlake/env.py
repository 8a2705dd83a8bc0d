"""The Frozen Lake world of the paper's section 5.3: maps, routes and the optimal policy.

Everything about the world comes from gymnasium's `FrozenLake-v1` (custom `desc`,
`is_slippery=False`): the transition table is read from `env.unwrapped.P`, rollouts run in
the env itself. The optimal action values Q* come from value iteration on that table, and
the policy network is later trained toward `pi* = (1 - eps) * softmax(Q*/tau) + eps/|A|`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from iftune.errors import UserError

N_ACTIONS = 4  # gymnasium's order: 0 left, 1 down, 2 right, 3 up
_MOVES = {(0, -1): 0, (1, 0): 1, (0, 1): 2, (-1, 0): 3}

# Named maps. Each has exactly two simple hole-free routes from S to G, of different lengths.
MAPS: dict[str, tuple[str, ...]] = {
    # The default: a ring around a block of holes; 6-step route down the left, 10-step one
    # along the top and right side.
    "ring5": ("SFFFF", "FHHHF", "FHHHF", "FHHHF", "FFGFF"),
    # The same shape on 4x4: 5 steps versus 7.
    "ring4": ("SFFF", "FHHF", "FHHF", "FFGF"),
    # The routes go round a ring and leave it through the same cell, so they share their
    # last three steps: 5 steps versus 9.
    "shared": ("SFFF", "FHHF", "FFFF", "HFHH", "HGHH"),
}
DEFAULT_MAP = "ring5"


def parse_map(spec: str) -> tuple[str, ...]:
    """A named map, or rows of S/F/H/G separated by '/' (e.g. 'SFF/FHF/FFG')."""
    if spec in MAPS:
        return MAPS[spec]
    rows = tuple(r for r in spec.strip().split("/"))
    if not rows or any(len(r) != len(rows[0]) or not r for r in rows):
        raise UserError(
            f"--map {spec!r}: expected one of {', '.join(MAPS)} or rows of equal length "
            "separated by '/', e.g. 'SFFF/FHHF/FHHF/FFGF'"
        )
    bad = sorted(set("".join(rows)) - set("SFHG"))
    if bad:
        raise UserError(f"--map {spec!r}: unexpected letter(s) {''.join(bad)}; expected only S, F, H, G")
    for letter in "SG":
        if "".join(rows).count(letter) != 1:
            raise UserError(f"--map {spec!r}: expected exactly one '{letter}'")
    return rows


@dataclass
class Lake:
    """One map with everything the study needs about it.

    States are gymnasium's: `row * ncol + col`. `routes` are the two hole-free simple routes,
    shortest first, as lists of states from S to G; `route_actions` the actions along them.
    """

    desc: tuple[str, ...]
    nrow: int
    ncol: int
    transitions: np.ndarray  # (nS, nA) next state, from env.unwrapped.P
    rewards: np.ndarray  # (nS, nA)
    done: np.ndarray  # (nS, nA) bool: the move ends the episode
    terminal: np.ndarray  # (nS,) bool: hole or goal
    start: int
    goal: int
    routes: list[list[int]] = field(default_factory=list)

    @property
    def n_states(self) -> int:
        return self.nrow * self.ncol

    @property
    def nonterminal(self) -> np.ndarray:
        return np.flatnonzero(~self.terminal)

    def route_actions(self, route: list[int]) -> list[int]:
        return [self.action_between(a, b) for a, b in zip(route[:-1], route[1:])]

    def action_between(self, a: int, b: int) -> int:
        (ra, ca), (rb, cb) = divmod(a, self.ncol), divmod(b, self.ncol)
        return _MOVES[(rb - ra, cb - ca)]

    def make_env(self) -> gym.Env:
        return gym.make("FrozenLake-v1", desc=list(self.desc), is_slippery=False)


def build_lake(desc: tuple[str, ...]) -> Lake:
    """Read the dynamics from gymnasium and check the map has exactly two routes."""
    env = gym.make("FrozenLake-v1", desc=list(desc), is_slippery=False)
    base = env.unwrapped
    n_s, n_a = base.observation_space.n, base.action_space.n
    nxt = np.zeros((n_s, n_a), dtype=np.int64)
    rew = np.zeros((n_s, n_a))
    done = np.zeros((n_s, n_a), dtype=bool)
    for s in range(n_s):
        for a in range(n_a):
            (prob, s2, r, d), *rest = base.P[s][a]
            assert prob == 1.0 and not rest, "is_slippery=False must be deterministic"
            nxt[s, a], rew[s, a], done[s, a] = s2, r, d
    env.close()
    flat = "".join(desc)
    lake = Lake(
        desc=tuple(desc),
        nrow=len(desc),
        ncol=len(desc[0]),
        transitions=nxt,
        rewards=rew,
        done=done,
        terminal=np.array([c in "HG" for c in flat]),
        start=flat.index("S"),
        goal=flat.index("G"),
    )
    lake.routes = find_routes(lake)
    return lake


def find_routes(lake: Lake, limit: int = 3, budget: int = 200_000) -> list[list[int]]:
    """The simple hole-free routes S -> G (depth-first, stops after `limit`); exactly two or UserError.

    `budget` bounds the cells the search may step on: an open map has exponentially many
    simple paths, and one with more than two routes is refused anyway."""
    shape = "/".join(lake.desc)
    found: list[list[int]] = []
    left = [budget]

    def walk(path: list[int]) -> None:
        s = path[-1]
        if s == lake.goal:
            found.append(list(path))
            return
        for a in range(N_ACTIONS):
            s2 = int(lake.transitions[s, a])
            if len(found) >= limit or s2 in path or (lake.terminal[s2] and s2 != lake.goal):
                continue
            left[0] -= 1
            if left[0] < 0:
                raise UserError(
                    f"map {shape!r} is too open to list its routes; the study needs "
                    "exactly two simple hole-free routes (one optimal, one sub-optimal)"
                )
            path.append(s2)
            walk(path)
            path.pop()

    if lake.n_states > 400:
        raise UserError(f"map {shape!r} has {lake.n_states} cells; expected at most 400")
    if _reachable(lake):
        walk([lake.start])
    if len(found) != 2:
        what = "no route" if not found else ("only one route" if len(found) == 1 else "more than two routes")
        raise UserError(
            f"map {shape!r} has {what} from S to G; the study needs exactly two simple "
            "hole-free routes (one optimal, one sub-optimal)"
        )
    found.sort(key=len)
    if len(found[0]) == len(found[1]):
        raise UserError(
            f"map {shape!r}: both routes take {len(found[0]) - 1} steps; the study needs one shorter (optimal) route"
        )
    return found


def _reachable(lake: Lake) -> bool:
    """Whether G can be reached from S without stepping into a hole (breadth-first)."""
    seen, frontier = {lake.start}, [lake.start]
    while frontier:
        s = frontier.pop()
        for s2 in map(int, lake.transitions[s]):
            if s2 not in seen and (not lake.terminal[s2] or s2 == lake.goal):
                seen.add(s2)
                frontier.append(s2)
    return lake.goal in seen


def value_iteration(lake: Lake, discount: float = 0.9, tol: float = 1e-12) -> np.ndarray:
    """Q*(s, a) on the deterministic table: Q = r + discount * max_a' Q(s', a') unless the move ends."""
    q = np.zeros((lake.n_states, N_ACTIONS))
    cont = (~lake.done).astype(float)
    for _ in range(10_000):
        v = q.max(1)
        q_new = lake.rewards + discount * cont * v[lake.transitions]
        q_new[lake.terminal] = 0.0
        if np.abs(q_new - q).max() < tol:
            return q_new
        q = q_new
    return q


def greedy_route(lake: Lake, q: np.ndarray) -> list[int]:
    """States visited by the greedy policy of Q from S (stops at a terminal or a repeat)."""
    route = [lake.start]
    while not lake.terminal[route[-1]] and len(route) <= lake.n_states:
        route.append(int(lake.transitions[route[-1], int(np.argmax(q[route[-1]]))]))
    return route


def target_policy(q: np.ndarray, tau: float, eps: float) -> np.ndarray:
    """pi* = (1 - eps) * softmax(Q*/tau) + eps/|A|, per state."""
    z = q / tau
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return (1 - eps) * p + eps / q.shape[1]


class Roller:
    """Greedy rollouts in the gymnasium env, memoized on the greedy action table."""

    def __init__(self, lake: Lake):
        self.lake = lake
        self.env = lake.make_env()
        self.cache: dict[bytes, tuple[bool, int]] = {}

    def __call__(self, actions: np.ndarray) -> tuple[bool, int]:
        """(reached G, steps taken). A deterministic policy that revisits a state loops
        forever, so the rollout stops there, as it does in a hole; length is then n_states."""
        key = np.asarray(actions, dtype=np.int8).tobytes()
        if key not in self.cache:
            self.cache[key] = self._roll(actions)
        return self.cache[key]

    def _roll(self, actions: np.ndarray) -> tuple[bool, int]:
        s, _ = self.env.reset(seed=0)
        seen = {int(s)}
        for step in range(1, self.lake.n_states + 1):
            s, reward, terminated, truncated, _ = self.env.step(int(actions[s]))
            if terminated or truncated or int(s) in seen:
                ok = bool(terminated and reward > 0)
                return ok, step if ok else self.lake.n_states
            seen.add(int(s))
        return False, self.lake.n_states
