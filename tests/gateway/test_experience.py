"""Experience on the wire → ExperienceBatch: every field checked, fragments and steps assembled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BOX_OBSERVATIONS, TUPLE_OBSERVATIONS
from pydantic import ValidationError

from policy_server.errors import InvalidRequest
from policy_server.gateway.experience import ExperienceRequest, to_batch
from policy_server.policies.served import ServedPolicy, resolve_policy
from policy_server.schema.config import parse_schema


def _policy(model_dir: Path, model: str, observations: dict[str, Any], space: str) -> ServedPolicy:
    params = {"model": str(model_dir / model), "action_space": {"type": space}}
    schema = parse_schema({"observations": observations, "parameters": params}, model_dir)
    return resolve_policy(schema.policies["default"])[0]


@pytest.fixture(scope="module")
def tuple_policy(model_dir: Path) -> ServedPolicy:
    return _policy(model_dir, "tuple.pt2", TUPLE_OBSERVATIONS, "tuple")  # obs width 4, actions nvec [3, 2]


@pytest.fixture(scope="module")
def box_policy(model_dir: Path) -> ServedPolicy:
    return _policy(model_dir, "box.pt2", BOX_OBSERVATIONS, "box")  # obs width 3, action dim 2


def _fragment(**over: Any) -> dict[str, Any]:
    frag = {
        "model_version": 0,
        "observations": [[0.0, 0.1, 0.2, 0.3], [1.0, 1.1, 1.2, 1.3], [2.0, 2.1, 2.2, 2.3]],
        "actions": [[2, 1], [0, 0]],
        "rewards": [1.0, 0.5],
        "log_probs": [-1.0, -2.0],
        "terminated": True,
    }
    return frag | over


def _batch(policy: ServedPolicy, **body: Any) -> Any:
    return to_batch(ExperienceRequest.model_validate({"client_id": "c1", **body}), policy, max_rows=100)


def test_a_fragment_becomes_consecutive_rows_with_next_observations(tuple_policy: ServedPolicy) -> None:
    batch = _batch(tuple_policy, fragments=[_fragment()])
    assert len(batch) == 2 and batch.client_id == "c1"
    np.testing.assert_array_equal(batch.next_obs[0], batch.obs[1])
    np.testing.assert_allclose(batch.next_obs[1], [2.0, 2.1, 2.2, 2.3])
    np.testing.assert_array_equal(batch.actions, [[2, 1], [0, 0]])
    assert batch.terminated.tolist() == [False, True] and batch.truncated.tolist() == [False, False]
    assert batch.segment_end.tolist() == [False, True]
    assert batch.log_probs.tolist() == [-1.0, -2.0]


def test_a_fragment_that_goes_on_ends_its_piece_without_ending_the_episode(tuple_policy: ServedPolicy) -> None:
    batch = _batch(tuple_policy, fragments=[_fragment(terminated=False, log_probs=None), _fragment(truncated=True, terminated=False)])
    assert batch.segment_end.tolist() == [False, True, False, True]
    assert not batch.terminated.any() and batch.truncated.tolist() == [False, False, False, True]
    assert np.isnan(batch.log_probs[:2]).all()


def test_observations_in_the_schema_form_are_flattened_in_schema_order(tuple_policy: ServedPolicy) -> None:
    named = {"speed": 0.5, "sensors": [0.1, -0.2, 0.3]}
    batch = _batch(tuple_policy, fragments=[_fragment(observations=[named, named, [0.0] * 4])])
    np.testing.assert_allclose(batch.obs[0], [0.5, 0.1, -0.2, 0.3])


def test_steps_that_follow_each_other_form_one_piece(box_policy: ServedPolicy) -> None:
    s = lambda o, n, **kw: {"obs": o, "action": [0.1, -0.1], "reward": 1.0, "next_obs": n, "model_version": 0} | kw
    steps = [s([0, 0, 0], [1, 1, 1]), s([1, 1, 1], [2, 2, 2]), s([5, 5, 5], [6, 6, 6], terminated=True), s([7, 7, 7], [8, 8, 8])]
    batch = _batch(box_policy, steps=steps)
    assert batch.segment_end.tolist() == [False, True, True, True]
    assert batch.actions.dtype == np.float32 and batch.actions.shape == (4, 2)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"observations": [[0.0] * 3, [0.0] * 4, [0.0] * 4]}, "body.fragments.0.observations.0"),
        ({"actions": [[3, 1], [0, 0]]}, "body.fragments.0.actions.0"),
        ({"actions": [[2], [0, 0]]}, "body.fragments.0.actions.0"),
        ({"actions": [[1.5, 1], [0, 0]]}, "body.fragments.0.actions.0"),
        ({"observations": [{"speed": 1, "sensors": [1, 2]}, [0.0] * 4, [0.0] * 4]}, "body.fragments.0.observations.0.sensors"),
        ({"observations": [{"speed": 1, "sensors": [1, 2, 3], "x": 1}, [0.0] * 4, [0.0] * 4]}, "body.fragments.0.observations.0.x"),
    ],
)
def test_a_malformed_sample_is_refused_naming_its_field(tuple_policy: ServedPolicy, change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        _batch(tuple_policy, fragments=[_fragment(**change)])
    assert info.value.fields[0].field == field


@pytest.mark.parametrize(
    "change",
    [
        {"rewards": [float("nan"), 0.0]},
        {"observations": [[float("inf")] * 4] * 3},
        {"rewards": [1.0]},
        {"log_probs": [-1.0]},
        {"model_version": -1},
        {"observations": [[0.0] * 4]},
    ],
)
def test_non_finite_values_and_wrong_lengths_fail_validation(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ExperienceRequest.model_validate({"client_id": "c1", "fragments": [_fragment(**change)]})


def test_an_empty_request_and_a_bad_client_id_fail_validation() -> None:
    with pytest.raises(ValidationError):
        ExperienceRequest.model_validate({"client_id": "c1"})
    with pytest.raises(ValidationError):
        ExperienceRequest.model_validate({"client_id": "../etc", "fragments": [_fragment()]})


def test_box_actions_need_the_action_width(box_policy: ServedPolicy) -> None:
    frag = {"model_version": 0, "observations": [[0.0] * 3] * 2, "actions": [[0.1, 0.2, 0.3]], "rewards": [0.0]}
    with pytest.raises(InvalidRequest, match="expected an action of 2 values"):
        _batch(box_policy, fragments=[frag])


def test_too_many_rows_in_one_request_are_refused(tuple_policy: ServedPolicy) -> None:
    request = ExperienceRequest.model_validate({"client_id": "c", "fragments": [_fragment()] * 3})
    with pytest.raises(InvalidRequest, match="at most 5"):
        to_batch(request, tuple_policy, max_rows=5)
