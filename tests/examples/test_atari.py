"""examples/atari: copied, served, played through run_env (remote, vector; local), exact answers."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import gymnasium as gym
import httpx
import numpy as np
import pytest
import torch
from conftest import running_server

from policy_server import cli
from policy_server.client import PolicyClient, run_env
from policy_server.gateway.app import build_app
from policy_server.policies.torch_policy import TorchPolicy
from policy_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
KEY = "1234567asdfgh"


@pytest.fixture(scope="module")
def game() -> ModuleType:
    """examples/atari/game.py as a module (``make_env``)."""
    spec = importlib.util.spec_from_file_location("atari_game", ROOT / "examples" / "atari" / "game.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The example copied (its CNN built) into a fresh folder and served: URL and folder."""
    folder = tmp_path_factory.mktemp("atari")
    cli.copy_server_files(str(ROOT / "examples" / "atari"), str(folder))
    settings = Settings(schema_path=folder / "schema.yaml", backend="local", gateway_metrics_port=0, seed=0)
    with running_server(build_app(settings)) as url:
        yield url, folder


def test_the_served_cnn_plays_pong_through_run_env(served: tuple[str, Path], game: ModuleType) -> None:
    url, _ = served
    envs = gym.vector.SyncVectorEnv([game.make_env] * 2)
    with PolicyClient(url, KEY, inference="remote", seed=0) as client:
        stats = run_env(client, envs, max_steps=8, seed=0, train=False)
        assert client.describe()["observation_space"] == {"type": "box", "shape": [4, 84, 84], "dtype": "uint8"}
    envs.close()
    assert stats.steps == 8
    env = game.make_env()
    with PolicyClient(url, KEY, inference="local", seed=0) as client:
        stats = run_env(client, env, max_steps=4, seed=0, train=False)
    env.close()
    assert stats.steps == 4 and client.local_version == 0


def test_the_answer_is_the_models_own_distribution(served: tuple[str, Path], game: ModuleType) -> None:
    url, folder = served
    env = game.make_env()
    frames, _ = env.reset(seed=1)
    for _ in range(20):  # past the start, where the frames differ
        frames, *_ = env.step(0)
    env.close()
    assert frames.shape == (4, 84, 84) and frames.dtype == np.uint8 and frames.any()
    answer = httpx.post(f"{url}/distribution", json={"obs": frames.tolist()}, headers={"access-token": KEY})
    assert answer.status_code == 200, answer.text
    logits = TorchPolicy.from_file(folder / "models" / "atari_cnn.pt2").forward(frames[None]).heads[0]
    expected = torch.softmax(torch.as_tensor(logits[0], dtype=torch.float64), 0).numpy()
    served_probabilities = [answer.json()["probabilities"][str(a)] for a in range(6)]
    np.testing.assert_allclose(served_probabilities, expected, rtol=1e-5, atol=1e-7)
