"""The "lpoc" grid world, and a policy for it trained by imitating a shortest-path expert.

The task (``GridWorld``): an 8 x 8 grid holds random obstacles and the three other agents, all
parked for the episode. One agent (``id`` 0-3) starts on a random free cell and must reach the
corner that belongs to its id, moving up, right, down or left. Stepping off the grid or into an
occupied cell is a collision and ends the episode; so does running out of ``max_steps``.

The agent sees only what the Pathmind "lpoc" schema lists, in this order (11 numbers):

* ``id``: which agent it is (its goal corner follows from it),
* ``coordinates_0``, ``coordinates_1``: its column x (0 = left) and row y (0 = bottom),
* for each direction up, right, down, left: ``has_<dir>_neighbour`` (the cell in that
  direction is on the grid) and ``is_<dir>_free`` (that cell is on the grid and empty).

Training is DAgger (Ross et al., 2011): roll out the current policy, label every state it visits
with the action of an expert that knows the whole map (a breadth-first-search shortest path),
add them to the data set, fit ``MLPPolicy(11, [64, 64], nvec=[4])`` by cross-entropy, repeat.
The policy sees one cell around itself and has no memory, so it cannot always match the expert
(with argmax actions it can walk in circles behind an obstacle): the evaluation reports its
success rate beside the expert's (the upper bound) and two random baselines.

    python examples/lpoc/train_policy.py            # about 1 minute on 2 CPU cores
"""

from __future__ import annotations

import random
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root: runs from a checkout, uninstalled
from policy_server.cli import parse_dataclass_args  # noqa: E402
from policy_server.export import MLPPolicy, export_module, write_schema  # noqa: E402

ACTIONS = ["up", "right", "down", "left"]
MOVES = [(0, 1), (1, 0), (0, -1), (-1, 0)]  # (dx, dy) of each action; y grows upwards
OBSERVATIONS = {"id": "int", "coordinates_0": "int", "coordinates_1": "int"} | {
    f"{key}_{d}_{suffix}": "bool" for d in ACTIONS for key, suffix in (("has", "neighbour"), ("is", "free"))
}
OBS_DIM = len(OBSERVATIONS)  # 11


class GridWorld:
    """One agent on a grid with obstacles and parked agents; reach the corner of your id."""

    def __init__(self, size: int = 8, n_agents: int = 4, obstacle_density: float = 0.15) -> None:
        self.size, self.n_agents, self.obstacle_density = size, n_agents, obstacle_density
        s = size - 1
        self.goals = [(s, s), (0, s), (0, 0), (s, 0)][:n_agents]  # agent id -> its corner
        self.max_steps = 4 * size

    def reset(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        while True:  # draw maps until the agent can reach its goal
            self.blocked = rng.random((self.size, self.size)) < self.obstacle_density  # [x, y]
            for corner in self.goals:
                self.blocked[corner] = False
            self.id = int(rng.integers(self.n_agents))
            goal = self.goals[self.id]
            cells = [(int(x), int(y)) for x, y in np.argwhere(~self.blocked) if (x, y) != goal]
            self.pos, *others = [cells[i] for i in rng.choice(len(cells), self.n_agents, replace=False)]
            for other in others:  # the other agents stay parked where they are
                self.blocked[other] = True
            self.dist = self._distances_to(goal)
            if self.dist[self.pos] < 10**6:
                break
        self.steps = 0
        return self.observe()

    def _on_grid(self, x: int, y: int) -> bool:
        return 0 <= x < self.size and 0 <= y < self.size

    def _distances_to(self, goal: tuple[int, int]) -> np.ndarray:
        """Breadth-first-search distance of every cell to ``goal`` (10**6: unreachable)."""
        dist = np.full((self.size, self.size), 10**6, dtype=np.int64)
        dist[goal] = 0
        queue = deque([goal])
        while queue:
            x, y = queue.popleft()
            for dx, dy in MOVES:
                nx, ny = x + dx, y + dy
                if self._on_grid(nx, ny) and not self.blocked[nx, ny] and dist[nx, ny] > dist[x, y] + 1:
                    dist[nx, ny] = dist[x, y] + 1
                    queue.append((nx, ny))
        return dist

    def observe(self) -> np.ndarray:
        x, y = self.pos
        obs = [self.id, x, y]
        for dx, dy in MOVES:
            on_grid = self._on_grid(x + dx, y + dy)
            obs += [on_grid, on_grid and not self.blocked[x + dx, y + dy]]
        return np.asarray(obs, dtype=np.float32)

    def step(self, action: int) -> tuple[np.ndarray, bool, str | None]:
        """Move; return (observation, done, outcome) with outcome 'success'/'collision'/'timeout'."""
        dx, dy = MOVES[action]
        x, y = self.pos[0] + dx, self.pos[1] + dy
        self.steps += 1
        if not self._on_grid(x, y) or self.blocked[x, y]:
            return self.observe(), True, "collision"
        self.pos = (x, y)
        if self.pos == self.goals[self.id]:
            return self.observe(), True, "success"
        if self.steps >= self.max_steps:
            return self.observe(), True, "timeout"
        return self.observe(), False, None

    def expert_action(self) -> int:
        """The first move of a shortest path to the goal (it sees the whole map)."""
        x, y = self.pos
        best = min(
            (self.dist[x + dx, y + dy], a)
            for a, (dx, dy) in enumerate(MOVES)
            if self._on_grid(x + dx, y + dy) and not self.blocked[x + dx, y + dy]
        )
        return best[1]


# --- policies as functions (env, observation) -> action, for rollouts and evaluation -----------

Policy = Callable[[GridWorld, np.ndarray], int]


def module_policy(module: Callable[[torch.Tensor], torch.Tensor]) -> Policy:
    def act(env: GridWorld, obs: np.ndarray) -> int:
        with torch.no_grad():
            return int(module(torch.as_tensor(obs)[None]).argmax(-1))
    return act


def sampling_policy(module: Callable[[torch.Tensor], torch.Tensor], seed: int) -> Policy:
    """Sample from the softmax of the logits (what the server's ``/predict`` does)."""
    generator = torch.Generator().manual_seed(seed)

    def act(env: GridWorld, obs: np.ndarray) -> int:
        with torch.no_grad():
            probs = module(torch.as_tensor(obs)[None]).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=generator))
    return act


def expert_policy(env: GridWorld, obs: np.ndarray) -> int:
    return env.expert_action()


def random_policy(rng: np.random.Generator) -> Policy:
    return lambda env, obs: int(rng.integers(4))


def random_free_policy(rng: np.random.Generator) -> Policy:
    """Uniform over the moves into free cells: never collides, wanders."""
    return lambda env, obs: int(rng.choice(np.flatnonzero(obs[4::2])))


def evaluate(policy: Policy, episodes: int, seed: int, env: GridWorld | None = None) -> dict[str, float]:
    """Rates of success / collision / timeout over ``episodes`` (episode i uses ``seed + i``)."""
    env = env or GridWorld()
    outcomes, success_steps = [], []
    for i in range(episodes):
        obs, done = env.reset(seed + i), False
        while not done:
            obs, done, outcome = env.step(policy(env, obs))
        outcomes.append(outcome)
        if outcome == "success":
            success_steps.append(env.steps)
    rates = {k: outcomes.count(k) / episodes for k in ("success", "collision", "timeout")}
    return rates | {"steps_on_success": float(np.mean(success_steps)) if success_steps else float("nan")}


# --- training ----------------------------------------------------------------------------------


@dataclass
class Args:
    seed: int = 1
    """seed of python, numpy and torch, and of the training episodes"""
    dagger_iterations: int = 10
    """rounds of: roll out the policy, label with the expert, refit"""
    episodes_per_iteration: int = 500
    """episodes rolled out in each round (the first round follows the expert)"""
    epochs: int = 30
    """passes over the aggregated data set in each round"""
    batch_size: int = 256
    """minibatch size of the cross-entropy fit"""
    learning_rate: float = 1e-3
    """Adam learning rate"""
    eval_episodes: int = 1000
    """evaluation episodes, on seeds the training never saw"""
    out_dir: str = str(HERE)
    """where models/lpoc.pt and schema.yaml are written"""


def train(args: Args) -> nn.Module:
    """DAgger with a shortest-path expert; return the trained ``MLPPolicy`` (logits over 4 moves)."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    env = GridWorld()
    policy = MLPPolicy(OBS_DIM, [64, 64], nvec=[len(ACTIONS)])
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate)
    states: list[np.ndarray] = []
    expert_actions: list[int] = []
    episode_seed = args.seed * 1_000_000  # training episodes: seeds [seed * 1e6, ...)

    for iteration in range(args.dagger_iterations):
        # 1. roll out (the expert in round 0, the learner after), label each state with the expert
        behaviour = expert_policy if iteration == 0 else module_policy(policy.eval())
        for _ in range(args.episodes_per_iteration):
            obs, done = env.reset(episode_seed), False
            episode_seed += 1
            while not done:
                states.append(obs)
                expert_actions.append(env.expert_action())
                obs, done, _ = env.step(behaviour(env, obs))

        # 2. fit the policy to all labels so far
        policy.train()
        x, y = torch.as_tensor(np.stack(states)), torch.as_tensor(expert_actions)
        for _ in range(args.epochs):
            perm = torch.randperm(len(x))
            for begin in range(0, len(x), args.batch_size):
                mb = perm[begin : begin + args.batch_size]
                loss = nn.functional.cross_entropy(policy(x[mb]), y[mb])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            accuracy = (policy(x).argmax(-1) == y).float().mean().item()
        print(f"round {iteration + 1:2d}/{args.dagger_iterations}  states {len(x):6d}  "
              f"loss {loss.item():.3f}  agreement with expert {accuracy:.3f}")
    return policy.eval()


def export(policy: nn.Module, out_dir: Path) -> None:
    model = export_module(policy, obs_dim=OBS_DIM, path=out_dir / "models" / "lpoc.pt", fmt="torchscript")
    schema = write_schema(
        out_dir / "schema.yaml",
        observations={name: {"type": kind} for name, kind in OBSERVATIONS.items()},
        action_space={"type": "discrete", "n": len(ACTIONS), "names": ACTIONS},
        model="models/lpoc.pt",
        api_key="1234567asdfgh",
    )
    print(f"wrote {model} and {schema}")


def main(args: Args) -> None:
    torch.set_num_threads(1)
    start = time.time()
    policy = train(args)
    print(f"training took {time.time() - start:.0f}s")
    eval_seed, rng = 10**9, np.random.default_rng(args.seed)  # seeds disjoint from training
    for name, pol in [
        ("trained policy, argmax", module_policy(policy)),
        ("trained policy, sampled", sampling_policy(policy, args.seed)),
        ("expert (sees the whole map)", expert_policy),
        ("random", random_policy(rng)),
        ("random over free moves", random_free_policy(rng)),
    ]:
        r = evaluate(pol, args.eval_episodes, eval_seed)
        print(f"{name:28s} success {r['success']:.3f}  collision {r['collision']:.3f}  "
              f"timeout {r['timeout']:.3f}  steps on success {r['steps_on_success']:.1f}")
    export(policy, Path(args.out_dir))


if __name__ == "__main__":
    main(parse_dataclass_args(Args, __doc__))
