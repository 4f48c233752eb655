"""The HTTP API of a ``policies_dir`` policy in-process (TestClient, local runtime: no Ray)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import API_KEY
from fastapi.testclient import TestClient
from support import write_policy_files

from policy_server.gateway.app import build_app
from policy_server.policies.torch_policy import TorchPolicy
from policy_server.settings import Settings

OBS = {"a": 0.5, "b": -1.0, "c": 2.0, "d": 0.0}
IDS = [f"c{i:02d}" for i in range(6)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet")
    write_policy_files(root / "customers", IDS)
    return root


@pytest.fixture(scope="module")
def client(folder: Path) -> Iterator[TestClient]:
    schema = {
        "parameters": {"api_key": API_KEY, "default_policy": "fleet"},
        "policies": {"fleet": {
            "observations": {name: {"type": "float"} for name in OBS},
            "policies_dir": "customers",
            "action_space": {"type": "discrete", "names": ["hold", "buy", "sell"]},
            "resources": {"max_models_per_replica": 2},
        }},
    }
    (folder / "schema.yaml").write_text(yaml.safe_dump(schema))
    settings = Settings(schema_path=folder / "schema.yaml", backend="local", gateway_metrics_port=0, seed=0)
    with TestClient(build_app(settings), headers={"access-token": API_KEY}) as c:
        yield c


def expected_probabilities(folder: Path, policy_id: str) -> np.ndarray:
    logits = TorchPolicy.from_file(folder / "customers" / f"{policy_id}.pt").forward(
        np.array([list(OBS.values())], dtype=np.float32)).heads[0][0]
    return np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()


def test_the_path_and_the_header_select_the_id_and_answers_name_it(client: TestClient, folder: Path) -> None:
    for policy_id in IDS:
        by_path = client.post(f"/policies/fleet/ids/{policy_id}/distribution", json=OBS)
        by_header = client.post("/distribution", json=OBS, headers={"X-Policy-Id": policy_id})
        for answer in (by_path, by_header):
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert (body["policy_id"], body["model_version"]) == (policy_id, 0)
            assert list(body["probabilities"].values()) == pytest.approx(expected_probabilities(folder, policy_id), abs=1e-6)
    batch = client.post("/policies/fleet/ids/c01/predict/batch", json={"observations": [OBS] * 3}).json()
    assert batch["policy_id"] == "c01" and len(batch["results"]) == 3
    raw = client.post("/predict_raw", json={"obs": [0.0] * 4}, headers={"X-Policy-Id": "c02"}).json()
    assert raw["policy_id"] == "c02" and raw["action_name"] in ("hold", "buy", "sell")


def test_the_ids_are_listed_and_a_file_added_at_run_time_is_served(client: TestClient, folder: Path) -> None:
    assert client.get("/policies/fleet/ids").json() == {"policy": "fleet", "ids": IDS, "count": len(IDS)}
    assert client.post("/policies/fleet/ids/late/predict", json=OBS).status_code == 404
    write_policy_files(folder / "customers", ["late"])
    answer = client.post("/policies/fleet/ids/late/predict", json=OBS)
    assert answer.status_code == 200 and answer.json()["policy_id"] == "late"
    assert "late" in client.get("/ids").json()["ids"]


def test_an_unknown_or_missing_id_is_refused_by_name(client: TestClient) -> None:
    unknown = client.post("/policies/fleet/ids/initech/predict", json=OBS)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "not_found" and "'initech'" in unknown.json()["error"]["message"]
    assert client.post("/predict", json=OBS, headers={"X-Policy-Id": "../c00"}).status_code == 404
    missing = client.post("/predict", json=OBS)
    assert missing.status_code == 422
    assert [f["field"] for f in missing.json()["error"]["fields"]] == ["header.x-policy-id"]
    for one_model_route in ("/model", "/weights", "/version"):  # a policies_dir policy has no one model
        assert client.get(f"/policies/fleet{one_model_route}").status_code == 404


def test_a_malformed_file_is_a_model_error_for_its_id_alone(client: TestClient, folder: Path) -> None:
    (folder / "customers" / "broken.pt").write_bytes(b"not a model")
    try:
        answer = client.post("/policies/fleet/ids/broken/predict", json=OBS)
        assert answer.status_code == 500
        error = answer.json()["error"]
        assert error["code"] == "model_error" and error["message"].startswith("policy id 'broken': cannot load broken.pt")
        assert client.post("/policies/fleet/ids/c00/predict", json=OBS).status_code == 200
    finally:
        (folder / "customers" / "broken.pt").unlink()


def test_the_lru_holds_at_most_max_models_per_replica(client: TestClient) -> None:
    for policy_id in IDS:
        assert client.post(f"/policies/fleet/ids/{policy_id}/predict", json=OBS).status_code == 200
    [stats] = client.portal.call(client.app.state.services["fleet"].models.replica_stats)  # type: ignore[attr-defined]
    assert stats["loaded"] == IDS[-2:] and stats["evictions"] >= len(IDS) - 2


def test_requests_are_counted_per_policy_id(client: TestClient) -> None:
    client.post("/policies/fleet/ids/c03/predict", json=OBS)
    client.post("/policies/fleet/ids/nobody/predict", json=OBS)  # a 404: no label for an unchecked id
    registry = client.app.state.metrics.registry  # type: ignore[attr-defined]
    labels = {"policy": "fleet", "policy_id": "c03", "status": "200"}
    assert registry.get_sample_value("policy_server_policy_id_requests_total", labels) >= 1
    assert registry.get_sample_value("policy_server_policy_id_request_seconds_count", {"policy": "fleet", "policy_id": "c03"}) >= 1
    ids = {s.labels["policy_id"] for m in registry.collect() if m.name == "policy_server_policy_id_requests" for s in m.samples}
    assert "nobody" not in ids


def test_openapi_documents_the_id_routes_and_the_header(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    by_id = paths["/policies/fleet/ids/{policy_id}/predict"]["post"]
    assert [p["name"] for p in by_id["parameters"]] == ["policy_id"]
    plain = paths["/policies/fleet/predict"]["post"]
    assert [(p["name"], p["in"], p["required"]) for p in plain["parameters"]] == [("x-policy-id", "header", True)]
    assert "/policies/fleet/ids" in paths and "/policies/fleet/weights" not in paths


def test_a_binary_body_selects_the_id_by_path_and_by_header(client: TestClient) -> None:
    row = io.BytesIO()
    np.save(row, np.array(list(OBS.values()), dtype=np.float32))
    npy = {"content-type": "application/x-npy"}
    for policy_id in IDS[:2]:
        expected = client.post(f"/policies/fleet/ids/{policy_id}/distribution", json=OBS).json()
        by_path = client.post(f"/policies/fleet/ids/{policy_id}/distribution", content=row.getvalue(), headers=npy)
        by_header = client.post("/distribution", content=row.getvalue(), headers=npy | {"X-Policy-Id": policy_id})
        assert by_path.json() == by_header.json() == expected
    assert client.post("/distribution", content=row.getvalue(), headers=npy).status_code == 422  # no id: required
