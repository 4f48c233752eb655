"""End to end: a real uvicorn gateway in front of real Ray Serve deployments (one Ray per session)."""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from conftest import (
    API_KEY,
    BAD_POLICY_INPUTS,
    BOX_OBS,
    LPOC_OBS,
    ODD_OBS,
    ONEHOT_OBS,
    TUPLE_OBS,
    cart_fragment,
    free_port,
    inputs_schema,
    multi_policy_schema,
    running_server,
)
from support import wait_until

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

AUTH = {"access-token": API_KEY}
PREFIX = "it-serving"
POLICY_BODIES = {"lpoc": LPOC_OBS, "tuple": TUPLE_OBS, "box": BOX_OBS}


def lstm_model(folder: Path) -> Path:
    import torch

    from policy_server.policies.lstm import LSTMPolicy, export_recurrent

    torch.manual_seed(0)
    module = LSTMPolicy(3, 4, 2)
    return export_recurrent(module, 3, module.state_shapes(), folder / "lstm.pt", "torchscript")


@pytest.fixture(scope="module")
def server(ray_session: int, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    path = tmp_path_factory.mktemp("serve") / "schema.yaml"
    schema = multi_policy_schema(model_dir)
    schema["policies"]["memory"] = {  # recurrent, on 2 replicas: the state travels with the rows
        "observations": {"x": {"type": "List[float]", "min_items": 3, "max_items": 3}},
        "model": str(lstm_model(path.parent)), "action_space": {"type": "discrete", "n": 2},
        "recurrent": {"state": {"h": [1, 4], "c": [1, 4]}}, "resources": {"num_cpus": 0.1, "num_replicas": 2}}
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    metrics_port = free_port()
    settings = Settings(schema_path=path, gateway_metrics_port=metrics_port, serve_app_prefix=PREFIX, seed=0)
    app = build_app(settings)
    with running_server(app) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        yield {"url": url, "client": client, "app": app, "metrics_port": metrics_port,
               "ray_metrics_port": ray_session}


@pytest.mark.parametrize("policy", list(POLICY_BODIES))
def test_every_endpoint_answers_for_every_kind_of_policy(server: dict[str, Any], policy: str) -> None:
    client: httpx.Client = server["client"]
    obs = POLICY_BODIES[policy]
    base = f"/policies/{policy}"
    for endpoint in ["predict", "predict_deterministic", "distribution"]:
        single = client.post(f"{base}/{endpoint}", json=obs)
        assert single.status_code == 200, single.text
        assert single.json()["model_version"] == 0
        batch = client.post(f"{base}/{endpoint}/batch", json={"observations": [obs] * 5})
        assert batch.status_code == 200, batch.text
        assert len(batch.json()["results"]) == 5
    width = client.get("/").json()["policies"][policy]["obs_dim"]
    raw = client.post(f"{base}/predict_raw", json={"obs": [0.0] * width})
    assert raw.status_code == 200, raw.text
    raw_batch = client.post(f"{base}/predict_raw/batch", json={"obs": [[0.0] * width] * 3})
    assert len(raw_batch.json()["results"]) == 3


def test_answers_over_serve_match_the_in_process_model(server: dict[str, Any], model_dir: Path) -> None:
    from policy_server.policies.torch_policy import TorchPolicy

    client: httpx.Client = server["client"]
    probs = client.post("/distribution", json=LPOC_OBS).json()["probabilities"]
    logits = TorchPolicy.from_file(model_dir / "lpoc.pt").forward(np.array([[float(v) for v in LPOC_OBS.values()]])).heads[0][0]
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert list(probs.values()) == pytest.approx(expected, abs=1e-6)
    sample = client.post("/predict", json=LPOC_OBS).json()
    assert sample["probability"] == pytest.approx(math.exp(sample["log_prob"]))


def test_a_recurrent_policys_episodes_step_on_any_replica_with_the_state_kept_by_the_gateway(server: dict[str, Any]) -> None:
    from policy_server.policies.recurrent import StateLayout
    from policy_server.policies.torch_policy import TorchPolicy

    client: httpx.Client = server["client"]
    layout = StateLayout({"h": (1, 4), "c": (1, 4)})
    policy = TorchPolicy.from_file(server["app"].state.schema.policies["memory"].model, state=layout)
    observations = [[0.5, -1.0, 2.0], [1.0, 0.0, -0.5], [-2.0, 0.3, 0.1], [0.0, 0.0, 1.0]]
    episodes = {f"e{i}": layout.zeros(1) for i in range(6)}
    for step, obs in enumerate(observations):  # 6 episodes, concurrently in one batch and one by one
        batch = [{"x": obs, "episode_id": e, "episode_start": step == 0} for e in episodes]
        answers = client.post("/policies/memory/distribution/batch", json={"observations": batch[:3]}).json()["results"]
        answers += [client.post("/policies/memory/distribution", json=row).json() for row in batch[3:]]
        for (episode, state), answer in zip(list(episodes.items()), answers, strict=True):
            out = policy.forward(np.concatenate([np.array([obs], dtype=np.float32), state], axis=1))
            expected = np.exp(out.heads[0][0] - out.heads[0][0].max())
            assert list(answer["probabilities"].values()) == pytest.approx(expected / expected.sum(), abs=1e-5)
            assert answer["state_reset"] is False
            episodes[episode] = np.concatenate(out.heads[1:], axis=1)


def test_concurrent_requests_are_batched_and_all_answered(server: dict[str, Any]) -> None:
    url = server["url"]
    statuses: list[int] = []

    def worker() -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            statuses.extend(c.post("/predict", json=LPOC_OBS).status_code for _ in range(20))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 160
    metrics = httpx.get(f"http://127.0.0.1:{server['metrics_port']}/metrics").text
    rows = _metric(metrics, 'policy_server_batch_rows_sum{policy="lpoc"}')
    calls = _metric(metrics, 'policy_server_batch_rows_count{policy="lpoc"}')
    assert rows >= 160 and calls < rows  # some calls carried several requests


def test_auth_over_http(server: dict[str, Any]) -> None:
    url = server["url"]
    assert httpx.post(f"{url}/predict", json=LPOC_OBS).status_code == 401  # missing: RFC 9110's 401
    assert httpx.post(f"{url}/predict", json=LPOC_OBS, headers={"access-token": "nope"}).status_code == 403
    assert httpx.post(f"{url}/predict", json=LPOC_OBS, headers=AUTH).status_code == 200
    assert httpx.post(f"{url}/predict", json=LPOC_OBS, params=AUTH).status_code == 200
    assert httpx.post(f"{url}/predict", json=LPOC_OBS, cookies=AUTH).status_code == 200


JSON = {"content-type": "application/json"}
BAD_REQUESTS = {
    "wrong type": ("/predict", {"json": LPOC_OBS | {"is_up_free": "maybe"}}, 422, "body.is_up_free"),
    "missing field": ("/predict", {"json": {"id": 1}}, 422, "body.coordinates_0"),
    "unknown field": ("/predict", {"json": LPOC_OBS | {"z": 1}}, 422, "body.z"),
    "wrong list length": ("/policies/tuple/predict", {"json": TUPLE_OBS | {"sensors": [1.0]}}, 422, "body.sensors"),
    "NaN": ("/policies/box/predict", {"content": b'{"x": NaN, "y": 0, "flag": true}', "headers": JSON}, 422, "body.x"),
    "inf": ("/policies/box/predict", {"content": b'{"x": 0, "y": -Infinity, "flag": true}', "headers": JSON}, 422, "body.y"),
    "malformed JSON": ("/predict", {"content": b"{oops", "headers": JSON}, 422, None),
    "empty body": ("/predict", {"content": b"", "headers": JSON}, 422, None),
    "raw width": ("/predict_raw", {"json": {"obs": [0.0] * 3}}, 422, "body.obs"),
    "batch over limit": ("/predict/batch", {"json": {"observations": [LPOC_OBS] * 4097}}, 422, "body.observations"),
    "oversized body": ("/predict_raw", {"content": b'{"obs": [' + b"0," * 3_000_000 + b"0]}", "headers": JSON}, 413, None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_over_http_is_a_4xx_envelope_and_the_server_keeps_serving(server: dict[str, Any], case: str) -> None:
    client: httpx.Client = server["client"]
    path, kwargs, status, field = BAD_REQUESTS[case]
    if "headers" in kwargs:
        kwargs = kwargs | {"headers": AUTH | kwargs["headers"]}
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert error["status"] == status and error["message"]
    if field is not None:
        assert field in [f["field"] for f in error["fields"]]
    assert client.post("/predict", json=LPOC_OBS).status_code == 200


@pytest.mark.parametrize("case", list(BAD_POLICY_INPUTS))
def test_numbers_the_model_cannot_hold_and_wrong_json_types_are_422_over_serve(server: dict[str, Any], case: str) -> None:
    client: httpx.Client = server["client"]
    path, body, field = BAD_POLICY_INPUTS[case]
    r = client.post(path, content=body, headers=JSON)
    assert r.status_code == 422, r.text[:300]
    assert field in [f["field"] for f in r.json()["error"]["fields"]]
    assert client.post("/predict", json=LPOC_OBS).status_code == 200


@pytest.fixture(scope="module")
def inputs_server(ray_session: int, inputs_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """Pathmind's one-hot schema, any-text names with an action mask, and a trainable policy, on Serve."""
    folder = tmp_path_factory.mktemp("inputs")
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(inputs_schema(inputs_models, folder / "ckpt"), sort_keys=False, allow_unicode=True))
    settings = Settings(schema_path=path, gateway_metrics_port=free_port(), serve_app_prefix="it-inputs", seed=0)
    with running_server(build_app(settings)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
        yield client


def test_pathmind_one_hot_lists_and_odd_names_over_serve(inputs_server: httpx.Client) -> None:
    assert inputs_server.post("/policies/onehot/predict", json=ONEHOT_OBS).status_code == 200
    split = ONEHOT_OBS | {"table_1_node": [0, 1], "table_2_node": [0, 0, 0, 0, 0, 0, 0, 1]}
    assert inputs_server.post("/policies/onehot/predict/batch", json={"observations": [split, ONEHOT_OBS]}).status_code == 200
    short = ONEHOT_OBS | {"table_1_node": [0, 1]}
    r = inputs_server.post("/policies/onehot/predict/batch", json={"observations": [ONEHOT_OBS, short]})
    assert r.status_code == 422
    [field] = r.json()["error"]["fields"]
    assert field["field"] == "body.observations.1" and "hold 57 values; the model needs 60" in field["message"]
    assert inputs_server.post("/policies/odd/predict", json=ODD_OBS).status_code == 200
    for change, name in (({"pos.x": 1e39}, "body.pos.x"), ({"actionMask": [True, 1, True, True]}, "body.actionMask.1")):
        r = inputs_server.post("/policies/odd/predict", json=ODD_OBS | change)
        assert r.status_code == 422 and name in [f["field"] for f in r.json()["error"]["fields"]]


def test_a_reward_of_1e39_is_422_over_serve_and_training_goes_on(inputs_server: httpx.Client) -> None:
    fragment = cart_fragment(steps=8)
    fragment["rewards"][-1] = 1e39
    r = inputs_server.post("/train/experience", json={"client_id": "c1", "fragments": [fragment]})
    assert r.status_code == 422
    assert [f["field"] for f in r.json()["error"]["fields"]] == ["body.fragments.0.rewards.7"]
    ok = inputs_server.post("/train/experience", json={"client_id": "c1", "fragments": [cart_fragment(steps=8)]})
    assert ok.status_code == 200 and ok.json()["accepted"] == 8
    status = inputs_server.get("/train/status").json()
    assert status["samples_rejected"]["malformed"] == 8 and status["last_error"] is None


def test_a_model_error_in_a_replica_is_500_and_the_replica_keeps_serving(server: dict[str, Any]) -> None:
    client: httpx.Client = server["client"]
    r = client.post("/policies/faulty/predict", json={"a": 5000.0, "b": 0.0})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "model_error" and "boom" in r.json()["error"]["message"]
    for _ in range(3):
        assert client.post("/policies/faulty/predict", json={"a": 1.0, "b": 0.0}).status_code == 200


def test_weights_hot_swap_on_every_replica_without_failing_requests(server: dict[str, Any]) -> None:
    from ray import serve

    handle = serve.get_deployment_handle("policy-box", f"{PREFIX}-box")
    original = handle.get_weights.remote().result()
    url, statuses = server["url"], []
    versions: list[list[int]] = [[] for _ in range(4)]  # per client: threads append out of order
    stop = threading.Event()

    def load(seen: list[int]) -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/policies/box/predict_deterministic", json=BOX_OBS)
                statuses.append(r.status_code)
                seen.append(r.json().get("model_version"))

    threads = [threading.Thread(target=load, args=(seen,)) for seen in versions]
    for t in threads:
        t.start()
    try:
        for version in range(1, 6):
            shifted = {k: v + 0.01 * version for k, v in original.items()}
            assert handle.broadcast("set_weights", shifted, version).results() == [version]
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert statuses and set(statuses) == {200}
    for seen in versions:
        assert seen == sorted(seen)  # a client never sees a version go back
    final = server["client"].post("/policies/box/distribution", json=BOX_OBS).json()
    assert final["model_version"] == 5
    handle.broadcast("set_weights", original, 6).results()


def test_readiness_and_status(server: dict[str, Any]) -> None:
    ready = httpx.get(f"{server['url']}/health/ready")
    assert ready.status_code == 200
    assert ready.json()["policies"] == {"lpoc": True, "tuple": True, "box": True, "faulty": True, "memory": True}


def test_ray_metrics_export_serves_serve_and_replica_metrics(server: dict[str, Any]) -> None:
    server["client"].post("/predict", json=LPOC_OBS)
    url = f"http://127.0.0.1:{server['ray_metrics_port']}/metrics"

    def both_exported() -> str:
        text = httpx.get(url, timeout=10).text
        return text if "ray_serve_" in text and "ray_policy_server_replica_forward_seconds" in text else ""

    text = wait_until(both_exported, 90, 2, "Serve's or the replicas' metrics missing")  # exported every few seconds
    assert "ray_serve_" in text
    assert "ray_policy_server_replica_forward_seconds" in text


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_batches_take_the_direct_path_and_survive_a_broken_link(server: dict[str, Any]) -> None:
    from policy_server.serving.runtime.transports import DirectTransport

    client: httpx.Client = server["client"]
    backend = server["app"].state.services["lpoc"].backend
    assert isinstance(backend, DirectTransport)
    before = backend.fallbacks
    for _ in range(10):
        assert client.post("/predict", json=LPOC_OBS).status_code == 200
    assert backend.fallbacks == before  # sequential requests never needed the Serve handle
    links = [link for replica in backend.pool.replicas.values() for link in replica.idle]
    assert len(links) == sum(backend.pool.open_links().values()) >= 2
    for conn in links:  # break every link, as a restarted replica would
        fd = conn._writer.get_extra_info("socket").fileno()
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as dup:  # thread-safe, unlike the loop's
            dup.shutdown(socket.SHUT_RDWR)
    answers = [client.post("/predict", json=LPOC_OBS).status_code for _ in range(10)]
    assert answers == [200] * 10
    assert backend.fallbacks > before  # the broken links fell back to the handle ...
    wait_until(lambda: sum(backend.pool.open_links().values()) >= 2, 30, 0.1, "the links were not re-opened")  # ... and were re-opened
    fallbacks = backend.fallbacks
    for _ in range(5):
        assert client.post("/predict", json=LPOC_OBS).status_code == 200
    assert backend.fallbacks == fallbacks
