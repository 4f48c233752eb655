"""1,000 policies of one schema served by 2 replicas of the real Ray Serve (``policies_dir``, Serve's
model multiplexing): each id answers with its own model, each replica's LRU stays bounded, and
unknown ids, malformed and new files, and a killed replica are handled."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from conftest import API_KEY, running_server
from support import live_actors, wait_until, write_policy_files

from policy_server.gateway.app import build_app
from policy_server.policies.torch_policy import TorchPolicy
from policy_server.settings import Settings

PREFIX = "it-mux"
IDS = [f"customer-{i:04d}" for i in range(1000)]
LRU = 8
OBS = {"a": 0.5, "b": -1.0, "c": 2.0, "d": 0.25}


@pytest.fixture(scope="module")
def fleet(ray_session: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("mux")
    started = time.monotonic()
    write_policy_files(root / "customers", IDS)
    print(f"{len(IDS)} policy files written in {time.monotonic() - started:.1f} s")
    schema = {
        "observations": {name: {"type": "float"} for name in OBS},
        "parameters": {"api_key": API_KEY, "policies_dir": "customers",
                       "resources": {"num_replicas": 2, "num_cpus": 0.25, "max_models_per_replica": LRU}},
    }
    (root / "schema.yaml").write_text(yaml.safe_dump(schema))
    app = build_app(Settings(schema_path=root / "schema.yaml", gateway_metrics_port=0, serve_app_prefix=PREFIX, seed=0))
    with running_server(app) as url, httpx.Client(base_url=url, headers={"access-token": API_KEY}, timeout=30) as client:
        yield {"client": client, "folder": root / "customers", "url": url}


def expected(folder: Path, policy_id: str) -> np.ndarray:
    """What ``policy_id``'s own model gives for ``OBS``: its action probabilities."""
    logits = TorchPolicy.from_file(folder / f"{policy_id}.pt").forward(np.array([list(OBS.values())], np.float32)).heads[0][0]
    return np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()


def probabilities(client: httpx.Client, policy_id: str) -> tuple[int, list[float] | str]:
    answer = client.post(f"/policies/default/ids/{policy_id}/distribution", json=OBS)
    if answer.status_code != 200:
        return answer.status_code, answer.text
    assert answer.json()["policy_id"] == policy_id
    return 200, list(answer.json()["probabilities"].values())


def replica_stats() -> list[dict[str, Any]]:
    from ray import serve

    return serve.get_deployment_handle("policy-default", f"{PREFIX}-default").broadcast("replica_stats").results()  # type: ignore[no-any-return]


def test_a_thousand_ids_each_answer_with_their_own_model_within_the_lru_bound(fleet: dict[str, Any]) -> None:
    client, folder = fleet["client"], fleet["folder"]
    assert client.get("/ids").json()["count"] == len(IDS)
    rng = random.Random(0)
    hot = IDS[:4]
    asked = rng.sample(IDS, 200) + hot * 25
    rng.shuffle(asked)
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: probabilities(client, i), asked))
    print(f"{len(asked)} requests over {len(set(asked))} ids in {time.monotonic() - started:.1f} s")
    for policy_id, (status, probs) in zip(asked, answers):
        assert status == 200, probs
        assert probs == pytest.approx(expected(folder, policy_id), abs=1e-6), policy_id
    stats = replica_stats()
    assert len(stats) == 2
    for replica in stats:
        assert len(replica["loaded"]) <= LRU and replica["loads"] > LRU and replica["evictions"] >= replica["loads"] - LRU


def test_unknown_malformed_and_new_files(fleet: dict[str, Any]) -> None:
    client, folder = fleet["client"], fleet["folder"]
    unknown = client.post("/policies/default/ids/customer-9999/predict", json=OBS)
    assert unknown.status_code == 404 and "'customer-9999'" in unknown.json()["error"]["message"]
    (folder / "broken.pt").write_bytes(b"not a model")
    broken = client.post("/predict", json=OBS, headers={"X-Policy-Id": "broken"})
    assert broken.status_code == 500, broken.text
    assert broken.json()["error"]["message"].startswith("policy id 'broken': cannot load broken.pt")
    assert probabilities(client, IDS[7])[0] == 200  # the replica serves on
    write_policy_files(folder, ["newcomer"])
    status, probs = probabilities(client, "newcomer")
    assert status == 200 and probs == pytest.approx(expected(folder, "newcomer"), abs=1e-6)


def test_ids_still_answer_after_a_replica_is_killed(fleet: dict[str, Any]) -> None:
    client = fleet["client"]
    replicas = live_actors(f"ServeReplica:{PREFIX}-default:policy-default")
    assert len(replicas) == 2
    victim = next(iter(replicas.values()))
    os.kill(victim, signal.SIGKILL)
    statuses: Counter[int] = Counter()

    def all_answer() -> bool:
        results = [probabilities(client, policy_id)[0] for policy_id in IDS[:20]]
        statuses.update(results)
        return results == [200] * 20

    wait_until(all_answer, 30, 0.2, lambda: f"statuses so far {statuses}")
    print(f"after the kill: {statuses}")
    assert statuses[200] >= 20 and set(statuses) <= {200, 503}, statuses
