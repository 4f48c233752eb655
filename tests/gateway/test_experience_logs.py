"""The experience log through the gateway (in-process, local backend): a thousand served decisions
and their rewards logged, rotated, exported to Minari and loaded back equal to what was served, a
DQN started from the log, and a full queue that drops and counts while requests stay 200."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import API_KEY, CART_OBSERVATIONS
from fastapi.testclient import TestClient

from policy_server.cli import export_minari
from policy_server.experience_log.files import log_files, read_log
from policy_server.experience_log.writer import ExperienceLog
from policy_server.gateway.app import build_app
from policy_server.settings import Settings

NAMES = list(CART_OBSERVATIONS)
ENVS, STEPS = 100, 10  # a vector of 100 environments, 10 batch requests: 1,000 decisions


def cart_app(tmp_path: Path, model_dir: Path, log: dict[str, Any], **training: Any) -> Any:
    schema = {"observations": CART_OBSERVATIONS, "parameters": {
        "api_key": API_KEY, "model": str(model_dir / "cart.pt2"), "action_space": {"type": "discrete", "n": 2},
        "experience_log": {"path": "log", "flush_s": 0.01, **log},
        "training": {"algorithm": "dqn", "checkpoint_dir": "checkpoints", "journal": False, "seed": 0,
                     "dqn": {"learning_starts": 10**6}, **training}}}
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema))
    return build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0))


def named(row: np.ndarray) -> dict[str, float]:
    return dict(zip(NAMES, row.tolist()))


def serve_a_vector(client: TestClient, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """STEPS batch requests of ENVS observations: the observations (STEPS+1, ENVS, 4; the last is
    after the last step), the answered actions (STEPS, ENVS) and each request's id."""
    obs = rng.uniform(-1, 1, (STEPS + 1, ENVS, 4)).astype(np.float32)
    actions, ids = np.zeros((STEPS, ENVS), dtype=np.int64), []
    for t in range(STEPS):
        answer = client.post("/predict/batch", json={"observations": [named(o) for o in obs[t]]},
                             headers={"X-Episode-ID": "vec"})
        assert answer.status_code == 200, answer.text
        actions[t] = [r["action"] for r in answer.json()["results"]]
        ids.append(answer.headers["x-request-id"])
    return obs, actions, ids


def send_rewards(client: TestClient, obs: np.ndarray, actions: np.ndarray, ids: list[str], rewards: np.ndarray) -> None:
    """Each environment's episode as a /train/experience fragment naming its decisions by request id and row."""
    fragments = [{"model_version": 0, "observations": obs[:, e].tolist(), "actions": actions[:, e].tolist(),
                  "rewards": rewards[:, e].tolist(), "terminated": True,
                  "request_ids": [f"{ids[t]}/{e}" for t in range(STEPS)]} for e in range(ENVS)]
    for chunk in range(0, ENVS, 20):
        answer = client.post("/train/experience", json={"client_id": "vec", "fragments": fragments[chunk:chunk + 20]})
        assert answer.status_code == 200, answer.text


def test_a_thousand_decisions_export_to_minari_as_served_and_start_a_dqn(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    app = cart_app(tmp_path, model_dir, {"max_file_mb": 0.02})
    with TestClient(app, headers={"access-token": API_KEY}) as client:
        obs, actions, ids = serve_a_vector(client, rng)
        rewards = rng.normal(size=(STEPS, ENVS)).astype(np.float32)
        send_rewards(client, obs, actions, ids, rewards)
        collected = []  # one Pathmind-style episode: the reward of each call is of the previous action
        for k in range(6):
            body = {"observation": named(obs[k, 0] + 5), "reward": float(k), "done": k == 5, "client_id": "c"}
            collected.append(client.post("/collect_experience", json=body).json()["action"])
    log = tmp_path / "log"
    assert len([p for p in log_files(log) if p.suffix == ".parquet"]) > 1  # rotated
    decisions = [r for r in read_log(log) if r.kind == "decision"]
    assert len(decisions) == ENVS * STEPS + 6 and {r.request_id for r in decisions} >= set(ids)

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    report = export_minari(str(log), "served/cart-v0")
    assert report == {"dataset_id": "served/cart-v0", "episodes": ENVS + 1, "steps": ENVS * STEPS + 5, "left_out_runs": 0}
    import minari

    by_first_obs = {tuple(e.observations[0]): e for e in minari.load_dataset("served/cart-v0").iterate_episodes()}
    for env in range(ENVS):
        e = by_first_obs[tuple(obs[0, env])]
        assert np.array_equal(e.observations, obs[:, env]) and np.array_equal(e.actions, actions[:, env])
        assert np.array_equal(e.rewards, rewards[:, env].astype(np.float64)) and e.terminations[-1]
    pathmind = by_first_obs[tuple(obs[0, 0] + 5)]
    assert np.array_equal(pathmind.observations, obs[:6, 0] + 5) and pathmind.actions.tolist() == collected[:5]
    assert pathmind.rewards.tolist() == [1, 2, 3, 4, 5] and pathmind.terminations.tolist() == [0, 0, 0, 0, 1]

    # a new DQN policy starts with the log's transitions in its replay buffer
    (tmp_path / "dqn").mkdir()
    dqn = cart_app(tmp_path / "dqn", model_dir, {}, from_log=str(log))
    with TestClient(dqn):
        stored = dqn.state.trainings["default"].trainer.trainer.learner.buffer.state_dict()
    logged = np.concatenate([rewards.ravel(), [1, 2, 3, 4, 5]]).astype(np.float32)
    assert np.array_equal(np.sort(stored["rewards"].numpy()), np.sort(logged))
    assert stored["terminated"].sum() == ENVS + 1


def test_a_full_queue_drops_and_counts_while_requests_stay_200_and_fast(tmp_path: Path, model_dir: Path) -> None:
    app = cart_app(tmp_path, model_dir, {})
    obs = named(np.zeros(4, dtype=np.float32))
    with TestClient(app, headers={"access-token": API_KEY}) as client:
        def timed(n: int) -> float:
            start = time.perf_counter()
            assert all(client.post("/predict", json=obs).status_code == 200 for _ in range(n))
            return time.perf_counter() - start

        timed(5)
        logging = timed(50)
        service = app.state.services["default"]
        working = service.experience_log
        stuck = ExperienceLog(working.spec.model_copy(update={"queue_size": 1}), "default", counters=working.counters)
        service.experience_log = stuck  # never opened: as a writer stuck on a hung disk
        full = timed(50)
        service.experience_log = working
    assert stuck.dropped["queue_full"] == 49
    dropped = app.state.metrics.registry.get_sample_value(
        "policy_server_experience_log_dropped_total", {"policy": "default", "reason": "queue_full"})
    assert dropped == 49
    assert full < 2 * logging + 1.0, (full, logging)


def test_image_observations_are_logged_and_exported_as_uint8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import minari
    import torch

    from policy_server.export import CNNPolicy, export_module

    torch.manual_seed(0)
    export_module(CNNPolicy((16, 16, 2), 3), (16, 16, 2), tmp_path / "cnn.pt2", dtype=torch.uint8)
    schema = {"observation_space": {"type": "box", "shape": [16, 16, 2], "dtype": "uint8", "low": 0, "high": 255},
              "parameters": {"api_key": API_KEY, "model": "cnn.pt2", "action_space": {"type": "discrete", "n": 3},
                             "experience_log": {"path": "log", "flush_s": 0.01}}}
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema))
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 2), dtype=np.uint8)
    app = build_app(Settings(schema_path=tmp_path / "schema.yaml", backend="local", gateway_metrics_port=0))
    with TestClient(app, headers={"access-token": API_KEY}) as client:
        actions = [client.post("/collect_experience", json={
            "observation": image.tolist(), "reward": float(k), "done": k == 5, "client_id": "cam"}).json()["action"]
            for k, image in enumerate(images)]
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    export_minari(str(tmp_path / "log"), "served/camera-v0")
    (episode,) = minari.load_dataset("served/camera-v0").iterate_episodes()
    assert episode.observations.dtype == np.uint8 and np.array_equal(episode.observations, images)
    assert episode.actions.tolist() == actions[:5] and episode.rewards.tolist() == [1, 2, 3, 4, 5]
