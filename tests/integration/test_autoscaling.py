"""`resources.num_replicas: auto` on real Ray Serve behind a real uvicorn gateway (the session's Ray,
8 logical CPUs): load raises the replica count, idleness lowers it, no request fails, and replicas
that Serve starts after an update serve the trained version."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import API_KEY, cart_fragment, running_server, training_schema
from ray import serve
from support import wait_until

from policy_server.gateway.app import build_app
from policy_server.serving.deployment import deployment_name
from policy_server.settings import Settings

AUTH = {"access-token": API_KEY}
PREFIX = "it-autoscale"
OBS = {"cart_position": 0.0, "cart_velocity": 0.1, "pole_angle": -0.02, "pole_angular_velocity": 0.0}
PPO = {"rollout_samples": 32, "num_minibatches": 2, "update_epochs": 1}
AUTOSCALED = {
    "num_cpus": 0.1, "num_replicas": "auto", "min_replicas": 1, "max_replicas": 3,
    "target_ongoing_requests": 1, "upscale_delay_s": 0, "downscale_delay_s": 1, "look_back_period_s": 12,
}


def running_replicas() -> int:
    status = serve.status().applications[f"{PREFIX}-cart"].deployments[deployment_name("cart")]
    return status.replica_states.get("RUNNING", 0)


def replica_versions() -> list[int]:
    handle = serve.get_deployment_handle(deployment_name("cart"), f"{PREFIX}-cart")
    return handle.broadcast("version").results(timeout_s=30)  # type: ignore[no-any-return]


def train_one_update(client: httpx.Client) -> int:
    """One rollout acted by version 0; returns the version the trainer published after it."""
    answer = client.post("/train/experience", json={"client_id": "driver", "fragments": [cart_fragment(0, steps=32, seed=0)]})
    assert answer.status_code == 200, answer.text
    return wait_until(lambda: client.get("/version").json()["model_version"], 30, 0.05, "no update was published")


@pytest.fixture()
def client(ray_session: int, model_dir: Path, tmp_path: Path) -> Iterator[httpx.Client]:
    schema = training_schema(model_dir, tmp_path / "ckpt", ppo=PPO)
    schema["policies"] = {"cart": schema["policies"]["cart"] | {"resources": AUTOSCALED}}
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    settings = Settings(schema_path=path, gateway_metrics_port=0, serve_app_prefix=PREFIX, seed=0)
    with running_server(build_app(settings)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        yield c


def test_load_scales_replicas_up_idleness_down_and_no_request_fails(client: httpx.Client) -> None:
    assert running_replicas() == 1
    trained = train_one_update(client)
    stop = threading.Event()
    answers: list[tuple[float, int, int]] = []  # (time, status, version)

    def drive() -> None:
        with httpx.Client(base_url=str(client.base_url), headers=AUTH, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/policies/cart/predict", json=OBS)
                answers.append((time.monotonic(), r.status_code, r.json().get("model_version", -1)))

    drivers = [threading.Thread(target=drive) for _ in range(4)]  # 4 in flight: Serve wants 4 replicas at target 1
    start = time.monotonic()
    for d in drivers:
        d.start()
    try:
        wait_until(lambda: running_replicas() == 3, 45, 0.2, lambda: f"{running_replicas()} replicas under load")
        scaled_up = time.monotonic()
        wait_until(lambda: set(replica_versions()) == {trained}, 10, 0.2,
                   lambda: f"replicas started after the update serve versions {replica_versions()}")
        caught_up = time.monotonic()
    finally:
        stop.set()
        for d in drivers:
            d.join()
    wait_until(lambda: running_replicas() == 1, 45, 0.2, lambda: f"{running_replicas()} replicas when idle")
    idle = time.monotonic()
    failed = [a for a in answers if a[1] != 200]
    stale = [a for a in answers if a[2] != trained]
    print(f"up after {scaled_up - start:.1f} s, every replica on version {trained} {caught_up - scaled_up:.1f} s "
          f"later, down {idle - caught_up:.1f} s after the load stopped; {len(answers)} requests, "
          f"{len(stale)} answered by an older version")
    assert failed == []
    assert len(answers) > 100
