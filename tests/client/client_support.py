"""What the client's tests share: servers in front of the local backend (no Ray, no mocks), the
CartPole schema the server trains, and the server's own log-probabilities to compare with."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
import yaml
from conftest import (
    API_KEY,
    BOX_OBS,
    CART_OBSERVATIONS,
    LPOC_OBS,
    TUPLE_OBS,
    multi_policy_schema,
    running_server,
)

from policy_server.client import PolicyClient
from policy_server.export import MLPPolicy, export_module
from policy_server.gateway.app import build_app
from policy_server.settings import Settings

AUTH = {"access-token": API_KEY}
OBS_BODIES = {"lpoc": LPOC_OBS, "tuple": TUPLE_OBS, "box": BOX_OBS}


def local_app(schema: dict[str, Any], folder: Path) -> Any:
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0, seed=0))


@contextmanager
def serving_server(model_dir: Path, folder: Path) -> Iterator[str]:
    """The discrete (lpoc, TorchScript), tuple and box policies; nothing trains. Yields the URL."""
    with running_server(local_app(multi_policy_schema(model_dir), folder)) as url:
        yield url


def cartpole_schema(folder: Path, algorithm: str = "ppo", **training: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    model = export_module(MLPPolicy(4, [16], nvec=[2]), 4, folder / "cartpole.pt2")
    hyper = {"ppo": {"rollout_samples": 64, "num_minibatches": 2, "update_epochs": 2},
             "dqn": {"learning_starts": 10_000}}[algorithm]
    return {
        "observations": CART_OBSERVATIONS,
        "parameters": {
            "api_key": API_KEY,
            "model": str(model),
            "action_space": {"type": "discrete", "n": 2, "names": ["left", "right"]},
            "training": {"algorithm": algorithm, algorithm: hyper, "checkpoint_dir": str(folder / "checkpoints"),
                         "seed": 0, **training},
        },
    }


@contextmanager
def trainable_server(folder: Path) -> Iterator[tuple[str, Any]]:
    """A CartPole policy that the server trains with PPO (64 samples per update): URL and app."""
    app = local_app(cartpole_schema(folder), folder)
    with running_server(app) as url:
        yield url, app


def expected_log_prob(url: str, policy: str, obs: dict[str, Any], action: Any) -> float:
    """The log-probability of ``action`` under the server's exact distribution."""
    answer = httpx.post(f"{url}/policies/{policy}/distribution", json=obs, headers=AUTH).json()
    if "components" in answer:
        return sum(math.log(c[str(a)]) for c, a in zip(answer["components"], action))
    names = httpx.get(f"{url}/").json()["policies"][policy]["action_space"]["names"]
    return math.log(answer["probabilities"][names[action]])


def steps_of(env: Any, client: PolicyClient, n: int, seed: int, version: int | None = None) -> None:
    """Log ``n`` steps of ``env`` (random actions) without posting them."""
    obs, _ = env.reset(seed=seed)
    for _ in range(n):
        action = int(env.action_space.sample())
        next_obs, reward, terminated, truncated, _ = env.step(action)
        client.log_step(obs, action, float(reward), terminated, truncated, next_obs, math.log(0.5), version)
        obs = next_obs if not (terminated or truncated) else env.reset()[0]
