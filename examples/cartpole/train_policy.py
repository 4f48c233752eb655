"""Train a PPO policy on Gymnasium ``CartPole-v1`` and export it for the policy server.

A single-file PPO in the style of cleanrl's ``ppo.py`` (same hyper-parameters, same variable
names as the PPO paper: advantages by GAE(lambda), clipped surrogate objective, value loss,
entropy bonus). The actor is ``policy_server.export.MLPPolicy(4, [64, 64], nvec=[2])``, which
maps the raw observation to two action logits; the critic is a separate MLP of the same shape.

After training, the actor is evaluated greedily (argmax action) over ``eval_episodes`` fresh
episodes and must reach a mean return of at least ``min_eval_return``; then it is exported as
TorchScript to ``models/cartpole.pt`` next to a matching ``schema.yaml``.

    python examples/cartpole/train_policy.py            # about 1 minute on 2 CPU cores
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root: runs from a checkout, uninstalled
from policy_server.cli import parse_dataclass_args  # noqa: E402
from policy_server.export import MLPPolicy, export_module, write_schema  # noqa: E402

OBSERVATIONS = ["cart_position", "cart_velocity", "pole_angle", "pole_angular_velocity"]


@dataclass
class Args:
    seed: int = 1
    """seed of python, numpy, torch and the environments"""
    env_id: str = "CartPole-v1"
    """the Gymnasium environment"""
    total_timesteps: int = 500_000
    """environment steps over all parallel environments"""
    learning_rate: float = 2.5e-4
    """Adam learning rate, annealed linearly to 0"""
    num_envs: int = 4
    """parallel (synchronous) environments"""
    num_steps: int = 128
    """steps per environment in each rollout"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """lambda of generalized advantage estimation"""
    num_minibatches: int = 4
    """minibatches per update epoch"""
    update_epochs: int = 4
    """epochs over each rollout"""
    clip_coef: float = 0.2
    """surrogate clipping coefficient epsilon"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    eval_episodes: int = 20
    """greedy evaluation episodes after training"""
    min_eval_return: float = 475.0
    """the mean greedy return the exported policy must reach (CartPole-v1's "solved" threshold)"""
    out_dir: str = str(HERE)
    """where models/cartpole.pt and schema.yaml are written"""
    stop_return: float = float("inf")
    """stop training as soon as the mean return of the last 20 training episodes reaches this
    (inf: never, train all total_timesteps); the benchmark's single-process floor uses 475"""


@dataclass(frozen=True)
class TrainResult:
    """The trained actor, and how far training went."""

    actor: nn.Module
    steps: int
    """environment steps taken (over all parallel environments)"""
    wall_s: float
    """seconds from the first reset to the end of training"""
    mean_return: float | None
    """mean return of the last 20 training episodes (None before 20 episodes)"""
    solved: bool
    """training stopped because mean_return reached stop_return"""


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


def make_actor(obs_dim: int, n_actions: int) -> MLPPolicy:
    actor = MLPPolicy(obs_dim, [64, 64], nvec=[n_actions])
    for module in actor.body:
        if isinstance(module, nn.Linear):
            layer_init(module)
    layer_init(actor.heads[0], std=0.01)
    return actor


def make_critic(obs_dim: int) -> nn.Sequential:
    return nn.Sequential(
        layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
        layer_init(nn.Linear(64, 64)), nn.Tanh(),
        layer_init(nn.Linear(64, 1), std=1.0),
    )


def evaluate(actor: nn.Module, env_id: str, episodes: int, seed: int) -> list[float]:
    """Greedy (argmax) returns of ``episodes`` episodes, episode ``i`` reset with ``seed + i``."""
    env = gym.make(env_id)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            with torch.no_grad():
                logits = actor(torch.as_tensor(obs, dtype=torch.float32)[None])
            obs, reward, terminated, truncated, _ = env.step(int(logits.argmax(-1)))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def train(args: Args) -> TrainResult:
    """Run PPO; return the trained actor (an ``MLPPolicy`` producing logits) and its progress.

    With a finite ``stop_return``, training stops at the step at which the mean return of the
    last 20 finished training episodes first reaches it (the rollout is not finished).
    """
    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    num_iterations = args.total_timesteps // batch_size

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(args.env_id) for _ in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,  # cleanrl's convention: reset in step
    )
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    obs_dim = envs.single_observation_space.shape[0]
    n_actions = int(envs.single_action_space.n)

    actor, critic = make_actor(obs_dim, n_actions), make_critic(obs_dim)
    params = list(actor.parameters()) + list(critic.parameters())
    optimizer = torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5)

    obs = torch.zeros((args.num_steps, args.num_envs, obs_dim))
    actions = torch.zeros((args.num_steps, args.num_envs), dtype=torch.long)
    log_probs = torch.zeros((args.num_steps, args.num_envs))
    rewards = torch.zeros((args.num_steps, args.num_envs))
    dones = torch.zeros((args.num_steps, args.num_envs))
    values = torch.zeros((args.num_steps, args.num_envs))

    global_step, start, recent_returns, solved = 0, time.time(), [], False
    next_obs = torch.as_tensor(envs.reset(seed=args.seed)[0], dtype=torch.float32)
    next_done = torch.zeros(args.num_envs)

    for iteration in range(1, num_iterations + 1):
        optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate

        # --- rollout ----------------------------------------------------------------------
        for step in range(args.num_steps):
            global_step += args.num_envs
            obs[step], dones[step] = next_obs, next_done
            with torch.no_grad():
                dist = Categorical(logits=actor(next_obs))
                action = dist.sample()
                values[step] = critic(next_obs).flatten()
            actions[step], log_probs[step] = action, dist.log_prob(action)
            next_obs_np, reward, terminated, truncated, info = envs.step(action.numpy())
            rewards[step] = torch.as_tensor(reward, dtype=torch.float32)
            next_obs = torch.as_tensor(next_obs_np, dtype=torch.float32)
            next_done = torch.as_tensor(np.logical_or(terminated, truncated), dtype=torch.float32)
            if "episode" in info:
                recent_returns += list(info["episode"]["r"][info["_episode"]])
                solved = len(recent_returns) >= 20 and np.mean(recent_returns[-20:]) >= args.stop_return
                if solved:
                    break
        if solved:
            print(f"mean return of the last 20 episodes {np.mean(recent_returns[-20:]):.1f} >= "
                  f"{args.stop_return} at step {global_step}, {time.time() - start:.1f}s")
            break

        # --- generalized advantage estimation --------------------------------------------
        with torch.no_grad():
            next_value = critic(next_obs).flatten()
            advantages = torch.zeros_like(rewards)
            lastgaelam = torch.zeros(args.num_envs)
            for t in reversed(range(args.num_steps)):
                nextnonterminal = 1.0 - (next_done if t == args.num_steps - 1 else dones[t + 1])
                nextvalues = next_value if t == args.num_steps - 1 else values[t + 1]
                delta = rewards[t] + args.gamma * nextvalues * nextnonterminal - values[t]
                lastgaelam = delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
                advantages[t] = lastgaelam
            returns = advantages + values

        b_obs, b_actions = obs.reshape(-1, obs_dim), actions.reshape(-1)
        b_log_probs, b_advantages = log_probs.reshape(-1), advantages.reshape(-1)
        b_returns = returns.reshape(-1)

        # --- PPO update: clipped surrogate + value loss - entropy bonus -------------------
        b_inds = np.arange(batch_size)
        for _ in range(args.update_epochs):
            np.random.shuffle(b_inds)
            for begin in range(0, batch_size, minibatch_size):
                mb = b_inds[begin : begin + minibatch_size]
                dist = Categorical(logits=actor(b_obs[mb]))
                new_log_prob, entropy = dist.log_prob(b_actions[mb]), dist.entropy()
                newvalue = critic(b_obs[mb]).flatten()
                ratio = (new_log_prob - b_log_probs[mb]).exp()

                mb_advantages = b_advantages[mb]
                mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()
                v_loss = 0.5 * ((newvalue - b_returns[mb]) ** 2).mean()
                loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss

                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()

        if iteration % 20 == 0 or iteration == num_iterations:
            mean_return = np.mean(recent_returns[-20:]) if recent_returns else float("nan")
            print(
                f"iter {iteration:4d}/{num_iterations}  step {global_step:7d}  "
                f"train return (last 20 episodes) {mean_return:6.1f}  {time.time() - start:5.1f}s"
            )

    envs.close()
    mean_return = float(np.mean(recent_returns[-20:])) if len(recent_returns) >= 20 else None
    return TrainResult(actor, global_step, time.time() - start, mean_return, solved)


def export(actor: nn.Module, out_dir: Path) -> None:
    model = export_module(actor, obs_dim=4, path=out_dir / "models" / "cartpole.pt", fmt="torchscript")
    schema = write_schema(
        out_dir / "schema.yaml",
        observations={name: {"type": "float"} for name in OBSERVATIONS},
        action_space={"type": "discrete", "n": 2, "names": ["left", "right"]},
        model="models/cartpole.pt",
        api_key="1234567asdfgh",
    )
    print(f"wrote {model} and {schema}")


def main(args: Args) -> None:
    torch.set_num_threads(1)  # small networks: one thread is faster than two on 2 cores
    start = time.time()
    actor = train(args).actor
    print(f"training took {time.time() - start:.0f}s")
    # Evaluation seeds are disjoint from the training seed's episodes.
    returns = evaluate(actor, args.env_id, args.eval_episodes, seed=10_000 + args.seed)
    print(f"greedy evaluation over {len(returns)} episodes: mean {np.mean(returns):.1f}, "
          f"min {np.min(returns):.0f}, max {np.max(returns):.0f}")
    assert np.mean(returns) >= args.min_eval_return, (
        f"mean greedy return {np.mean(returns):.1f} < {args.min_eval_return}: not exporting"
    )
    export(actor, Path(args.out_dir))


if __name__ == "__main__":
    main(parse_dataclass_args(Args, __doc__))
