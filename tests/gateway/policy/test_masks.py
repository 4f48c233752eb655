"""Action masks through the policy endpoints (local backend, in-process): a schema's `mask`
observation and a request's top-level `action_mask`; multi_binary and tanh-squashed box answers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from policy_server.export import MLPPolicy, export_module
from policy_server.gateway.app import build_app
from policy_server.settings import Settings

KEY = {"access-token": "mask-key"}
BOARD = {"cells": [0.0, 1.0, 0.0], "legal": [True, False, True, False]}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("masks")
    torch.manual_seed(0)
    export_module(MLPPolicy(3, [8], nvec=[4]), 3, root / "board.pt2")
    export_module(MLPPolicy(3, [8], nvec=[3, 2]), 3, root / "md.pt2")
    export_module(MLPPolicy(3, [8], nvec=[5]), 3, root / "bits.pt2")
    export_module(MLPPolicy(3, [8], box_dim=2), 3, root / "squashed.pt2")
    vec = {"v": {"type": "List[float]", "min_items": 3, "max_items": 3}}
    schema = {
        "parameters": {"api_key": KEY["access-token"], "default_policy": "board"},
        "policies": {
            "board": {"model": "board.pt2", "action_space": {"type": "discrete", "mask": "legal"},
                      "observations": {"cells": {"type": "List[float]", "min_items": 3, "max_items": 3},
                                       "legal": {"type": "List[bool]"}}},
            "md": {"model": "md.pt2", "action_space": {"type": "multi_discrete"}, "observations": vec},
            "bits": {"model": "bits.pt2", "action_space": {"type": "multi_binary", "n": 5}, "observations": vec},
            "squashed": {"model": "squashed.pt2", "observations": vec,
                         "action_space": {"type": "box", "low": [-1, 0], "high": [1, 4], "squash": "tanh"}},
        },
    }
    (root / "schema.yaml").write_text(yaml.safe_dump(schema))
    settings = Settings(schema_path=root / "schema.yaml", backend="local", gateway_metrics_port=0, seed=0)
    with TestClient(build_app(settings)) as c:
        yield c


def test_a_schema_mask_gives_masked_actions_probability_zero(client: TestClient) -> None:
    dist = client.post("/policies/board/distribution", json=BOARD, headers=KEY).json()
    assert dist["probabilities"]["1"] == dist["probabilities"]["3"] == 0.0
    assert dist["probabilities"]["0"] + dist["probabilities"]["2"] == pytest.approx(1.0)
    for _ in range(30):
        assert client.post("/policies/board/predict", json=BOARD, headers=KEY).json()["action"] in (0, 2)
    best = client.post("/policies/board/predict_deterministic", json=BOARD, headers=KEY).json()
    assert best["action"] == max((0, 2), key=lambda a: dist["probabilities"][str(a)])
    batch = client.post("/policies/board/predict/batch", headers=KEY, json={"observations": [
        BOARD, BOARD | {"legal": [False, False, False, True]}]}).json()
    assert batch["results"][1]["action"] == 3 and batch["results"][1]["probability"] == pytest.approx(1.0)


def test_the_mask_observation_is_no_model_input(client: TestClient) -> None:
    raw = client.post("/policies/board/predict_raw", json={"obs": BOARD["cells"], "action_mask": BOARD["legal"]},
                      headers=KEY).json()
    assert raw["action"] in (0, 2)  # the model takes the 3 cells; the mask is not among its inputs
    wide = client.post("/policies/board/predict_raw", json={"obs": BOARD["cells"] + [1.0]}, headers=KEY)
    assert wide.status_code == 422


@pytest.mark.parametrize("body, field", [
    (BOARD | {"legal": [False] * 4}, "body.legal"),
    (BOARD | {"legal": [True] * 3}, "body.legal"),
])
def test_an_empty_or_misfit_mask_is_a_422_naming_it(client: TestClient, body: dict, field: str) -> None:
    for path in ("predict", "predict_deterministic", "distribution"):
        answer = client.post(f"/policies/board/{path}", json=body, headers=KEY)
        assert answer.status_code == 422, answer.text
        assert field in [f["field"] for f in answer.json()["error"]["fields"]]


def test_multi_discrete_masks_each_component_from_a_top_level_action_mask(client: TestClient) -> None:
    body = {"v": [0.1, 0.2, 0.3], "action_mask": [False, True, False, True, False]}
    dist = client.post("/policies/md/distribution", json=body, headers=KEY).json()
    assert dist["components"] == [{"0": 0.0, "1": 1.0, "2": 0.0}, {"0": 1.0, "1": 0.0}]
    assert client.post("/policies/md/predict", json=body, headers=KEY).json()["action"] == [1, 0]
    empty = client.post("/policies/md/predict", json=body | {"action_mask": [True, True, True, False, False]}, headers=KEY)
    assert empty.status_code == 422
    assert empty.json()["error"]["fields"][0] == {
        "field": "body.action_mask", "message": "component 1 of the action: the mask allows none of its 2 actions"}
    batch = client.post("/policies/md/predict_raw/batch", headers=KEY, json={
        "obs": [[0.0] * 3, [1.0] * 3], "action_mask": [[True] * 5, [True, True, True, False, False]]})
    assert batch.status_code == 422 and batch.json()["error"]["fields"][0]["field"] == "body.action_mask.1"


def test_multi_binary_and_tanh_box_answers(client: TestClient) -> None:
    bits = client.post("/policies/bits/predict", json={"v": [0.1, 0.2, 0.3]}, headers=KEY).json()
    assert len(bits["action"]) == 5 and set(bits["action"]) <= {0, 1} and 0 < bits["probability"] <= 1
    assert len(client.post("/policies/bits/distribution", json={"v": [0.1, 0.2, 0.3]}, headers=KEY).json()["bits"]) == 5
    act = client.post("/policies/squashed/predict", json={"v": [0.1, 0.2, 0.3]}, headers=KEY).json()
    assert -1 <= act["action"][0] <= 1 and 0 <= act["action"][1] <= 4 and "probability" not in act
    dist = client.post("/policies/squashed/distribution", json={"v": [0.1, 0.2, 0.3]}, headers=KEY).json()
    assert dist["squash"] == "tanh" and dist["low"] == [-1.0, 0.0] and dist["high"] == [1.0, 4.0]
