"""Play the Atari game of examples/atari with the served CNN policy, through ``run_env``.

    python generate.py copy_server_files examples/atari && uvicorn app:app   # in one shell
    python examples/atari/play.py --steps 200 --envs 4                       # in another

``--envs 1`` plays one environment, one ``/predict`` per step; more play a Gymnasium vector
environment (``SyncVectorEnv``), one ``/predict/batch`` per vector step. ``--inference local``
downloads the model and acts here. Before the first step ``run_env`` checks that the environment's
spaces are the server's (a ``SpaceMismatch`` names both otherwise). Only acts (the example's schema
has no ``training`` section); prints the steps, finished episodes and steps per second.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]  # the repository root (runs from a checkout) and game.py
from game import GAME, make_env

from policy_server.cli import parse_dataclass_args
from policy_server.client import EnvStats, PolicyClient, run_env


@dataclass
class Args:
    server: str = "http://127.0.0.1:8000"
    """the policy server (with its url_path, if any)"""
    api_key: str = "1234567asdfgh"
    """the schema's api_key"""
    game: str = GAME
    """the ALE game (its action space must be the schema's)"""
    steps: int = 200
    """environment steps to play (over all environments)"""
    envs: int = 1
    """environments: more than 1 plays a SyncVectorEnv, one batch request per vector step"""
    inference: str = "remote"
    """remote (the server acts) or local (the downloaded model acts here)"""
    seed: int = 0


def play(args: Args) -> EnvStats:
    """Play ``args.steps`` steps of ``args.game``; the stats of what was played."""
    env = (make_env(args.game) if args.envs == 1
           else gym.vector.SyncVectorEnv([lambda: make_env(args.game)] * args.envs))
    with PolicyClient(args.server, args.api_key, inference=args.inference, seed=args.seed) as client:  # type: ignore[arg-type]
        stats = run_env(client, env, max_steps=args.steps, seed=args.seed, train=False)
    env.close()
    return stats


if __name__ == "__main__":
    stats = play(parse_dataclass_args(Args, __doc__))
    print(f"{stats.steps} steps, {stats.episodes} episodes finished (returns {stats.returns}), "
          f"{stats.steps / stats.wall_s:.0f} steps/s")
