"""Training through a real uvicorn gateway and a trainer actor on real Ray Serve (one Ray per session)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from conftest import API_KEY, cart_fragment, running_server, training_schema
from support import live_actors, wait_until

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

AUTH = {"access-token": API_KEY}
OBS = {"cart_position": 0.0, "cart_velocity": 0.1, "pole_angle": -0.02, "pole_angular_velocity": 0.0}
PPO = {"rollout_samples": 32, "num_minibatches": 2, "update_epochs": 1}


@contextmanager
def training_server(
    model_dir: Path, folder: Path, prefix: str, replicas: int = 1, **training: Any
) -> Iterator[httpx.Client]:
    schema = training_schema(model_dir, folder / "ckpt", **training)
    schema["policies"]["cart"]["resources"]["num_replicas"] = replicas
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    settings = Settings(schema_path=path, gateway_metrics_port=0, serve_app_prefix=prefix, seed=0)
    with running_server(build_app(settings)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def server(ray_session: int, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    folder = tmp_path_factory.mktemp("train")
    with training_server(model_dir, folder, "it-train", replicas=2, ppo=PPO, checkpoint_every=5) as c:
        yield c


def train_one_update(client: httpx.Client, seed: int) -> int:
    """Send one rollout acted by the current version; wait until the trainer published the next."""
    version = client.get("/train/status").json()["model_version"]
    answer = client.post("/train/experience", json={"client_id": "driver", "fragments": [cart_fragment(version, steps=32, seed=seed)]})
    assert answer.status_code == 200, answer.text
    wait_until(lambda: client.get("/version").json()["model_version"] > version, 30, 0.02,
               "the update was not published")
    return version + 1


def test_twenty_updates_hot_swap_into_every_replica_without_a_failed_request(server: httpx.Client) -> None:
    url = str(server.base_url)
    stop = threading.Event()
    results: list[tuple[int, int]] = []  # (status, version)

    def load() -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/predict", json=OBS)
                results.append((r.status_code, r.json().get("model_version", -1)))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        start_version = server.get("/version").json()["model_version"]
        for i in range(20):
            train_one_update(server, seed=i)
    finally:
        stop.set()
        for t in threads:
            t.join()
    statuses = [s for s, _ in results]
    versions = {v for _, v in results}
    assert statuses.count(200) == len(statuses) and len(statuses) > 100
    assert server.get("/version").json()["model_version"] == start_version + 20
    assert len(versions) >= 10, f"answers came from only {sorted(versions)}"
    status = server.get("/train/status").json()
    assert status["updates"] >= 20 and status["last_checkpoint"] is not None
    final = start_version + 20
    served = {server.post("/predict", json=OBS).json()["model_version"] for _ in range(40)}
    assert served == {final}, f"a replica still serves {served - {final}}"  # both replicas swapped


def test_stale_and_malformed_samples_are_refused_over_ray(server: httpx.Client) -> None:
    train_one_update(server, seed=100)
    current = train_one_update(server, seed=101)
    stale = server.post("/train/experience", json={"client_id": "late", "fragments": [cart_fragment(current - 2, steps=32, seed=0)]})
    assert stale.status_code == 409 and stale.json()["error"]["code"] == "stale_samples"
    bad = cart_fragment(current, steps=32, seed=0)
    bad["actions"][3] = 7
    before = server.get("/train/status").json()
    malformed = server.post("/train/experience", json={"client_id": "bad", "fragments": [bad]})
    assert malformed.status_code == 422 and "actions.3" in malformed.json()["error"]["fields"][0]["field"]
    after = server.get("/train/status").json()
    assert after["samples_received"] == before["samples_received"]
    assert after["samples_rejected"]["malformed"] == before["samples_rejected"]["malformed"] + 32
    future = server.post("/train/experience", json={"client_id": "early", "fragments": [cart_fragment(current + 5)]})
    assert future.status_code == 422 and future.json()["error"]["fields"][0]["field"] == "body"  # from the actor


def test_training_metrics_reach_rays_export(server: httpx.Client, ray_session: int) -> None:
    train_one_update(server, seed=200)
    wanted = [
        "ray_policy_server_training_samples_total",
        "ray_policy_server_training_update_seconds",
        "ray_policy_server_training_active_clients",
        "ray_policy_server_training_model_version",
        "ray_policy_server_training_samples_rejected_total",
    ]

    def missing() -> list[str]:
        text = httpx.get(f"http://127.0.0.1:{ray_session}/metrics", timeout=10).text
        return [name for name in wanted if name not in text]

    # Ray exports metrics every few seconds
    wait_until(lambda: not missing(), 60, 1, lambda: f"missing from Ray's metrics: {missing()}")


def test_a_restarted_server_resumes_from_the_last_checkpoint(
    ray_session: int, model_dir: Path, tmp_path: Path
) -> None:
    with training_server(model_dir, tmp_path, "it-resume-a", ppo=PPO) as first:
        for i in range(3):
            train_one_update(first, seed=300 + i)
        weights = first.get("/weights").json()
        assert first.post("/train/stop").json()["last_checkpoint"] == "final"
    with training_server(model_dir, tmp_path, "it-resume-b", ppo=PPO, resume=True) as second:
        status = second.get("/train/status").json()
        assert status["updates"] == 3 and status["model_version"] == 3 and status["last_checkpoint"] == "final"
        resumed = second.get("/weights").json()
        assert resumed["model_version"] == 3 and resumed["weights"] == weights["weights"]
        assert train_one_update(second, seed=400) == 4


def test_a_poisoned_rollout_is_skipped_and_counted_and_replicas_refuse_nan_weights(
    server: httpx.Client, ray_session: int
) -> None:
    from ray import serve

    from policy_server.policies.codec import decode_weights
    from policy_server.serving.deployment import deployment_name

    status = server.get("/train/status").json()
    version, skipped = status["model_version"], status["skipped_updates"]
    # 3e38 is a valid float32 (the gateway accepts it); the discounted sums of it are not
    poisoned = cart_fragment(version, steps=32, seed=500, rewards=[3e38] * 32)
    assert server.post("/train/experience", json={"client_id": "poison", "fragments": [poisoned]}).status_code == 200

    def after_skip() -> dict[str, Any] | None:
        status = server.get("/train/status").json()
        return status if status["skipped_updates"] != skipped else None

    status = wait_until(after_skip, 30, message="the poisoned update was not skipped")
    assert status["model_version"] == version and "non-finite" in status["last_error"]

    weights = decode_weights(server.get("/weights").json()["weights"])
    name = min(weights)
    weights[name] = weights[name].copy()
    weights[name].flat[0] = np.nan
    handle = serve.get_deployment_handle(deployment_name("cart"), "it-train-cart")
    with pytest.raises(Exception, match="hold NaN or infinite values"):  # Ray wraps the ValueError
        handle.broadcast("set_weights", weights, version + 100).results(timeout_s=30)
    for _ in range(20):  # both replicas still serve the kept version, with finite answers
        answer = server.post("/predict", json=OBS)
        assert answer.status_code == 200 and answer.json()["model_version"] == version

    wanted = 'ray_policy_server_training_updates_skipped_total{'

    def exported() -> list[str]:
        return httpx.get(f"http://127.0.0.1:{ray_session}/metrics", timeout=10).text.splitlines()

    def counted() -> bool:
        return any(line.startswith(wanted) and 'reason="data"' in line for line in exported())

    # Ray exports metrics every few seconds
    wait_until(counted, 60, 1,
               lambda: f"no skipped-update counter on Ray's export: {[n for n in exported() if 'skipped' in n]}")


def test_a_killed_trainer_comes_back_with_every_acknowledged_step(server: httpx.Client) -> None:
    """SIGKILL to the trainer actor's process: its routes answer 503 with Retry-After until Ray has
    restarted it; it resumes the newest checkpoint past the served version, and the 20 steps it had
    acknowledged (in no checkpoint yet) come back from its journal: 12 more fill a 32-step rollout."""
    import os
    import signal

    def trainer_pid() -> int | None:
        return next(iter(live_actors("TrainerActor", "it-train-cart-trainer").values()), None)

    assert server.post("/train/save").status_code == 200  # the checkpoint it resumes (whatever ran before)
    version = server.get("/train/status").json()["model_version"]
    answer = server.post("/train/experience", json={"client_id": "kill", "fragments": [cart_fragment(version, steps=20, seed=70)]})
    assert answer.status_code == 200 and answer.json()["accepted"] == 20, answer.text
    killed = trainer_pid()
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    seen: list[int] = []

    def back() -> bool:
        status = server.get("/train/status")
        seen.append(status.status_code)
        if status.status_code == 503:
            assert "Retry-After" in status.headers and status.json()["error"]["code"] == "backend_unavailable"
        return status.status_code == 200 and trainer_pid() not in (None, killed)

    wait_until(back, 120, 0.2, lambda: f"statuses {seen[-5:]}, trainer pid {trainer_pid()}")
    assert set(seen) <= {200, 503}
    restarted = server.get("/train/status").json()
    assert restarted["model_version"] == version + 1 and restarted["state"] == "running", restarted
    more = server.post("/train/experience", json={"client_id": "kill", "fragments": [cart_fragment(version + 1, steps=12, seed=71)]})
    assert more.status_code == 200, more.text
    wait_until(lambda: server.get("/train/status").json()["model_version"] == version + 2, 60, 0.2,
               "the journaled steps did not come back: 12 steps alone do not fill a rollout")
