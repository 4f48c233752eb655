"""Pathmind's `/collect_experience/` loop through a real uvicorn gateway and the trainer actor on Ray Serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import httpx
import yaml
from conftest import API_KEY, CART_OBSERVATIONS, running_server, training_schema
from support import wait_until

from policy_server.gateway.app import build_app
from policy_server.settings import Settings


def test_a_pathmind_client_loop_feeds_the_ray_trainer(ray_session: int, model_dir: Path, tmp_path: Path) -> None:
    schema = training_schema(model_dir, tmp_path / "ckpt", ppo={"rollout_samples": 32, "num_minibatches": 2})
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    settings = Settings(schema_path=path, gateway_metrics_port=0, serve_app_prefix="it-collect", seed=0)
    env = gym.make("CartPole-v1")
    steps = 0
    with running_server(build_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        for seed in range(4):
            obs, _ = env.reset(seed=seed)
            reward, done = 0.0, False
            while True:
                body = {"observation": dict(zip(CART_OBSERVATIONS, map(float, obs))), "reward": reward, "done": done}
                # as Pathmind's client sends it: trailing slash, key in the query
                answer = client.post(f"/collect_experience/?access-token={API_KEY}", json=body)
                assert answer.status_code == 200, answer.text
                if done:
                    break
                obs, r, terminated, truncated, _ = env.step(answer.json()["actions"][0])
                reward, done, steps = float(r), bool(terminated or truncated), steps + 1

        def updated() -> dict[str, Any] | None:
            status = client.get("/train/status", headers={"access-token": API_KEY}).json()
            return status if status["updates"] >= 1 else None

        # an update takes every row then waiting, so steps // 32 rows need not make as many updates
        status = wait_until(updated, 60, 0.1, lambda: str(client.get("/train/status", headers={"access-token": API_KEY}).json()))
    assert status["samples_received"] == steps and status["episodes"] == 4 and status["model_version"] >= 1
    assert status["samples_rejected"] == {"stale": 0, "malformed": 0}
