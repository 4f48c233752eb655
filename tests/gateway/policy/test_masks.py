"""Action masks through the policy endpoints (local backend, in-process): a schema's `mask`
observation and a request's top-level `action_mask`; multi_binary and tanh-squashed box answers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import torch
import yaml
from fastapi.testclient import TestClient

from policy_server.errors import InvalidRequest
from policy_server.export import MLPPolicy, export_module
from policy_server.gateway.app import build_app
from policy_server.gateway.policy.masks import combine_masks, forbidden_fields
from policy_server.policies.spaces import DiscreteSpace, TupleSpace
from policy_server.settings import Settings

KEY = {"access-token": "mask-key"}
BOARD = {"cells": [0.0, 1.0, 0.0], "legal": [True, False, True, False]}
ROBOT = {"type": "dict", "spaces": {"pos": {"type": "box", "shape": [2], "low": -1, "high": 1},
                                    "gear": {"type": "discrete", "n": 3}}}
POSE = {"pos": [0.5, -0.5], "gear": 2}
NONE_OF_3 = "the mask allows none of the 3 actions"
BOTH = "(an action must be allowed by both)"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("masks")
    torch.manual_seed(0)
    export_module(MLPPolicy(3, [8], nvec=[4]), 3, root / "board.pt2")
    export_module(MLPPolicy(3, [8], nvec=[3, 2]), 3, root / "md.pt2")
    export_module(MLPPolicy(3, [8], nvec=[5]), 3, root / "bits.pt2")
    export_module(MLPPolicy(3, [8], box_dim=2), 3, root / "squashed.pt2")
    export_module(MLPPolicy(5, [8], nvec=[3]), 5, root / "robot.pt2")
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
            "robot": {"model": "robot.pt2", "observation_space": ROBOT},
            "legal": {"model": "robot.pt2", "action_space": {"type": "discrete", "mask": "legal"},
                      "observation_space": {"type": "dict", "spaces": ROBOT["spaces"] | {
                          "legal": {"type": "multi_binary", "n": 3}}}},
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


def fields_of(answer: Any) -> list[dict[str, str]]:
    assert answer.status_code == 422, answer.text
    return answer.json()["error"]["fields"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", ["predict", "predict_deterministic", "distribution"])
def test_a_request_mask_that_allows_nothing_is_named_as_body_action_mask(client: TestClient, path: str) -> None:
    """Beside a space observation, with or without a Dict mask entry that allows something: the
    request's own mask is named, not ``body.obs.action_mask`` (no such field) nor ``body.obs.legal``."""
    none = [False] * 3
    for policy, obs in (("robot", POSE), ("legal", POSE | {"legal": [True] * 3})):
        one = client.post(f"/policies/{policy}/{path}", json={"obs": obs, "action_mask": none}, headers=KEY)
        assert fields_of(one) == [{"field": "body.action_mask", "message": NONE_OF_3}], policy
        batch = client.post(f"/policies/{policy}/{path}/batch", headers=KEY,
                            json={"obs": [obs, obs], "action_mask": [[True] * 3, none]})
        assert fields_of(batch) == [{"field": "body.action_mask.1", "message": NONE_OF_3}], policy


def test_a_dict_mask_entry_that_allows_nothing_is_named_as_itself(client: TestClient) -> None:
    empty = POSE | {"legal": [False] * 3}
    one = client.post("/policies/legal/predict", json={"obs": empty, "action_mask": [True] * 3}, headers=KEY)
    assert fields_of(one) == [{"field": "body.obs.legal", "message": NONE_OF_3}]
    batch = client.post("/policies/legal/predict/batch", json={"obs": [POSE | {"legal": [True] * 3}, empty]},
                        headers=KEY)
    assert fields_of(batch) == [{"field": "body.obs.1.legal", "message": NONE_OF_3}]
    collect = client.post("/policies/legal/collect_experience", json={"observation": empty}, headers=KEY)
    assert fields_of(collect) == [{"field": "body.observation.legal", "message": NONE_OF_3}]


def test_collect_experience_beside_a_space_observation_takes_the_request_mask(client: TestClient) -> None:
    """The request's ``action_mask`` beside a Dict observation with no mask entry (``robot``), and
    and-ed with the entry where there is one (``legal``): the one allowed action every time."""
    cases = (("robot", POSE, [False, True, False]), ("legal", POSE | {"legal": [True, True, False]}, [False, True, True]))
    for policy, obs, mask in cases:
        for step in range(20):
            answer = client.post(f"/policies/{policy}/collect_experience", headers=KEY,
                                 json={"observation": obs, "action_mask": mask, "client_id": "m"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["action"] == 1, (policy, step)
    none = client.post("/policies/robot/collect_experience", json={"observation": POSE, "action_mask": [False] * 3},
                       headers=KEY)
    assert fields_of(none) == [{"field": "body.action_mask", "message": NONE_OF_3}]


def test_two_masks_that_only_together_allow_nothing_are_both_named(client: TestClient) -> None:
    body = {"obs": POSE | {"legal": [True, False, False]}, "action_mask": [False, True, True]}
    assert fields_of(client.post("/policies/legal/predict", json=body, headers=KEY)) == [
        {"field": "body.obs.legal", "message": f"{NONE_OF_3} that body.action_mask allows {BOTH}"},
        {"field": "body.action_mask", "message": f"{NONE_OF_3} that body.obs.legal allows {BOTH}"},
    ]


def test_binary_masks_are_named_as_their_tensors(client: TestClient) -> None:
    tensors = {"obs.pos": np.array([0.5, -0.5], np.float32), "obs.gear": np.array(2), "obs.legal": np.ones(3, bool)}
    none = np.zeros(3, bool)
    for body, field in (
        (tensors | {"action_mask": none}, "body.action_mask"),
        (tensors | {"obs.legal": none}, "body.obs.legal"),
    ):
        answer = client.post("/policies/legal/predict", content=safetensors.numpy.save(body),
                             headers=KEY | {"content-type": "application/safetensors"})
        assert fields_of(answer) == [{"field": field, "message": NONE_OF_3}]
    batch = {k: np.stack([v, v]) for k, v in tensors.items()} | {"action_mask": np.stack([np.ones(3, bool), none])}
    answer = client.post("/policies/legal/predict/batch", content=safetensors.numpy.save(batch),
                         headers=KEY | {"content-type": "application/safetensors"})
    assert fields_of(answer) == [{"field": "body.action_mask.1", "message": NONE_OF_3}]


def test_combine_masks_names_the_part_at_fault_per_component() -> None:
    space = TupleSpace([3, 2])
    at = ["body.obs.0.legal", "body.obs.1.legal"]
    entry = np.array([[True, True, True, True, True], [True, True, True, True, True]])
    given = np.array([[True, False, False, True, False], [True, True, True, False, False]])
    with pytest.raises(InvalidRequest) as caught:
        combine_masks(space, [(entry, at), (given, ["body.action_mask.0", "body.action_mask.1"])])
    assert [(f.field, f.message) for f in caught.value.fields] == [
        ("body.action_mask.1", "component 1 of the action: the mask allows none of its 2 actions")]
    allowed = combine_masks(space, [(entry, at), (given[:1].repeat(2, axis=0), ["a.0", "a.1"])])
    assert allowed is not None and allowed.tolist() == [[True, False, False, True, False]] * 2
    assert combine_masks(space, []) is None


def test_forbidden_fields_name_the_first_10_rows_and_cut_the_masks_to_the_actions() -> None:
    space = DiscreteSpace(2)
    masks = np.array([[False, True]] * 13)  # a fragment's T+1 masks: the last one's row took no action
    fields = forbidden_fields(space, masks, np.zeros((12, 1), np.int64), [f"a.{i}" for i in range(12)],
                              [f"m.{i}" for i in range(13)])
    assert [f.field for f in fields] == [f"a.{i}" for i in range(10)]
    assert fields[0].message == "action 0 is one its action mask (m.0) forbids"
    assert forbidden_fields(space, None, np.zeros((1, 1), np.int64), ["a.0"], ["m.0"]) == []
    assert forbidden_fields(TupleSpace([2, 2]), np.array([[True, False, False, True]]), np.array([[1, 0]]), ["a.0"],
                            ["m.0"])[0].message == "action [1, 0]: its action mask (m.0) forbids component 0 = 1, component 1 = 0"
