"""Experience on the wire → ExperienceBatch: every field checked, fragments and steps assembled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import (
    BIG_INT,
    BOX_OBSERVATIONS,
    CART_OBSERVATIONS,
    ODD_OBS,
    ONEHOT_OBS,
    TUPLE_OBSERVATIONS,
    inputs_schema,
)
from pydantic import ValidationError

from policy_server.errors import InvalidRequest
from policy_server.gateway.training.experience import ExperienceRequest, experience_model, to_batch
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


# --- issue 11: every number at float32 precision, JSON types strictly ----------------------------


def _cart_like(steps: int = 8, **over: Any) -> dict[str, Any]:
    return {"model_version": 0, "observations": [[0.0] * 4] * (steps + 1), "actions": [[0, 1]] * steps,
            "rewards": [1.0] * steps, "log_probs": [-0.5] * steps} | over


def _refused(policy: ServedPolicy, body: dict[str, Any]) -> list[str]:
    """The fields the policy's experience model names, as the gateway writes them."""
    with pytest.raises(ValidationError) as info:
        experience_model(policy).model_validate({"client_id": "c1"} | body)
    return [".".join(["body", *map(str, e["loc"])]) for e in info.value.errors()]


def test_the_issue_fragment_whose_last_reward_is_1e39_is_refused_naming_it(tuple_policy: ServedPolicy) -> None:
    fragment = _cart_like(rewards=[1.0] * 7 + [1e39])
    assert _refused(tuple_policy, {"fragments": [fragment]}) == ["body.fragments.0.rewards.7"]


STEP = {"obs": [0.0] * 4, "action": [0, 1], "reward": 1.0, "next_obs": [0.0] * 4, "model_version": 0}


@pytest.mark.parametrize(
    "body,field",
    [
        ({"fragments": [_cart_like(rewards=[-1e39] + [1.0] * 7)]}, "body.fragments.0.rewards.0"),
        ({"fragments": [_cart_like(rewards=[3.4028236e38] * 8)]}, "body.fragments.0.rewards.0"),
        ({"fragments": [_cart_like(log_probs=[-0.5] * 6 + [-1e39, -0.5])]}, "body.fragments.0.log_probs.6"),
        ({"fragments": [_cart_like(observations=[[0.0] * 4] * 8 + [[0.0, 1e39, 0.0, 0.0]])]},
         "body.fragments.0.observations.8.raw.1"),
        ({"fragments": [_cart_like(observations=[[0.0] * 4] * 8 + [[0.0, BIG_INT, 0.0, 0.0]])]},
         "body.fragments.0.observations.8.raw.1"),
        ({"fragments": [_cart_like(observations=[[0.0] * 4] * 8 + [[0.0] * 3])]}, "body.fragments.0.observations.8.raw"),
        ({"fragments": [_cart_like(observations=[[0.0] * 4] * 8 + [["0"] * 4])]}, "body.fragments.0.observations.8.raw.0"),
        ({"fragments": [_cart_like(observations=[[0.0] * 4] * 8 + [5])]}, "body.fragments.0.observations.8"),
        ({"fragments": [_cart_like(actions=[[0, 1]] * 7 + [[0, BIG_INT]])]}, "body.fragments.0.actions.7.vector.1"),
        ({"fragments": [_cart_like(actions=[[0, 1]] * 7 + [True])]}, "body.fragments.0.actions.7"),
        ({"fragments": [_cart_like(actions=[[0, 1]] * 7 + ["1"])]}, "body.fragments.0.actions.7"),
        ({"fragments": [_cart_like(model_version=BIG_INT)]}, "body.fragments.0.model_version"),
        ({"fragments": [_cart_like(model_version="0")]}, "body.fragments.0.model_version"),
        ({"fragments": [_cart_like(terminated="yes")]}, "body.fragments.0.terminated"),
        ({"fragments": [_cart_like(truncated=1)]}, "body.fragments.0.truncated"),
        ({"fragments": [_cart_like(rewards=[True] * 8)]}, "body.fragments.0.rewards.0"),
        ({"steps": [STEP | {"reward": 1e39}]}, "body.steps.0.reward"),
        ({"steps": [STEP | {"log_prob": -1e39}]}, "body.steps.0.log_prob"),
        ({"steps": [STEP, STEP | {"next_obs": [1e39] * 4}]}, "body.steps.1.next_obs.raw.0"),
        ({"steps": [STEP | {"action": BIG_INT}]}, "body.steps.0.action.index"),
        ({"steps": [STEP | {"terminated": "off"}]}, "body.steps.0.terminated"),
        ({"steps": [STEP | {"reward": "1.0"}]}, "body.steps.0.reward"),
        ({"fragments": [_cart_like()], "client_id": 5}, "body.client_id"),
    ],
)
def test_numbers_the_model_cannot_hold_and_wrong_json_types_are_refused_naming_them(
    tuple_policy: ServedPolicy, body: dict[str, Any], field: str
) -> None:
    assert field in _refused(tuple_policy, body)


def test_box_actions_are_checked_at_float32(box_policy: ServedPolicy) -> None:
    frag = {"model_version": 0, "observations": [[0.0] * 3] * 2, "actions": [[0.1, 1e39]], "rewards": [0.0]}
    assert _refused(box_policy, {"fragments": [frag]}) == ["body.fragments.0.actions.0.vector.1"]
    ok = experience_model(box_policy).model_validate({"client_id": "c", "fragments": [frag | {"actions": [[0.1, 3.4e38]]}]})
    assert to_batch(ok, box_policy, max_rows=10).actions.tolist() == [[np.float32(0.1), np.float32(3.4e38)]]


@pytest.mark.parametrize(
    "named,field",
    [
        ({"speed": 1e39, "sensors": [0, 0, 0]}, "body.fragments.0.observations.0.speed"),
        ({"speed": 0, "sensors": [0, -1e39, 0]}, "body.fragments.0.observations.0.sensors.1"),
        ({"speed": "0", "sensors": [0, 0, 0]}, "body.fragments.0.observations.0.speed"),
        ({"speed": 0, "sensors": [0, True, 0]}, "body.fragments.0.observations.0.sensors.1"),
    ],
)
def test_schema_form_observations_are_checked_at_float32_and_strictly(
    tuple_policy: ServedPolicy, named: dict[str, Any], field: str
) -> None:
    fragment = _fragment(observations=[named, [0.0] * 4, [0.0] * 4])
    request = experience_model(tuple_policy).model_validate({"client_id": "c1", "fragments": [fragment]})
    with pytest.raises(InvalidRequest) as info:
        to_batch(request, tuple_policy, max_rows=100)
    assert info.value.fields[0].field == field


@pytest.fixture(scope="module")
def inputs_policies(inputs_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServedPolicy]:
    folder = tmp_path_factory.mktemp("inputs")
    schema = parse_schema(inputs_schema(inputs_models, folder / "ckpt"), folder)
    return {name: resolve_policy(spec)[0] for name, spec in schema.policies.items()}


def test_schema_form_observations_with_odd_names_and_open_lists(inputs_policies: dict[str, ServedPolicy]) -> None:
    odd, onehot = inputs_policies["odd"], inputs_policies["onehot"]
    frag = {"model_version": 0, "observations": [ODD_OBS, [0.0] * 11], "actions": [3], "rewards": [1.0]}
    batch = to_batch(experience_model(odd).model_validate({"client_id": "c", "fragments": [frag]}), odd, max_rows=10)
    np.testing.assert_array_equal(batch.obs[0], [0.5, 2, 1, -1.5, 7, 1, 0.0, 1, 0, 1, 1])
    bad = frag | {"observations": [ODD_OBS | {"pos.x": 1e39, "actionMask": [True, 0, True, True]}, [0.0] * 11]}
    with pytest.raises(InvalidRequest) as info:
        to_batch(experience_model(odd).model_validate({"client_id": "c", "fragments": [bad]}), odd, max_rows=10)
    assert [f.field for f in info.value.fields] == [
        "body.fragments.0.observations.0.pos.x", "body.fragments.0.observations.0.actionMask.1",
    ]
    split = ONEHOT_OBS | {"table_1_node": [1, 0, 0], "table_2_node": [0, 0, 0, 0, 0, 0, 1]}
    frag = {"model_version": 0, "observations": [ONEHOT_OBS, split], "actions": [[0, 0]], "rewards": [1.0]}
    request = experience_model(onehot).model_validate({"client_id": "c", "fragments": [frag]})
    assert to_batch(request, onehot, max_rows=10).next_obs[0][:10].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    short = frag | {"observations": [ONEHOT_OBS, ONEHOT_OBS | {"table_6_target_node": []}]}
    with pytest.raises(InvalidRequest) as info:
        to_batch(experience_model(onehot).model_validate({"client_id": "c", "fragments": [short]}), onehot, max_rows=10)
    [error] = info.value.fields
    assert error.field == "body.fragments.0.observations.1"
    assert "table_6_target_node (0)" in error.message and "hold 55 values; the model needs 60" in error.message


def test_the_experience_model_declares_the_raw_width(tuple_policy: ServedPolicy, inputs_policies: dict[str, ServedPolicy]) -> None:
    for policy, width, prefix in ((tuple_policy, 4, ""), (inputs_policies["onehot"], 60, "Onehot")):
        model = experience_model(policy)
        assert model.__name__ == f"{prefix}ExperienceRequest"
        defs = model.model_json_schema()["$defs"]
        raw, named = defs[f"{prefix}Fragment"]["properties"]["observations"]["items"]["oneOf"]
        assert raw["minItems"] == raw["maxItems"] == width and named["type"] == "object"
        step_raw = defs[f"{prefix}Step"]["properties"]["next_obs"]["oneOf"][0]
        assert step_raw["minItems"] == step_raw["maxItems"] == width


def test_a_fragment_action_its_own_mask_forbids_is_refused_per_component(tuple_policy: ServedPolicy) -> None:
    # masks of [3, 2] side by side; the last (after the last action) may allow nothing: no action was taken there
    legal = [[True, True, True, False, True], [True, True, True, True, True], [False] * 5]
    assert _batch(tuple_policy, fragments=[_fragment(action_masks=legal)]).masks is not None
    forbids = [legal[0], [False, True, True, True, True], legal[2]]  # the second action, [0, 0], is 0 in component 0
    with pytest.raises(InvalidRequest) as info:
        _batch(tuple_policy, fragments=[_fragment(), _fragment(action_masks=forbids)])
    assert [(f.field, f.message) for f in info.value.fields] == [("body.fragments.1.actions.1",
        "action [0, 0]: its action mask (body.fragments.1.action_masks.1) forbids component 0 = 0")]


def test_a_step_whose_action_its_own_mask_forbids_is_refused_and_nothing_is_accepted(model_dir: Path) -> None:
    cart = _policy(model_dir, "cart.pt2", CART_OBSERVATIONS, "discrete")  # 2 actions
    steps = [{"obs": [0.0, 0.1, 0.2, 0.3], "action": a, "reward": 1.0, "next_obs": [1.0, 1.1, 1.2, 1.3],
              "model_version": 0, "action_mask": [False, True], "next_action_mask": [False, False]} for a in (1, 0, 0)]
    assert _batch(cart, steps=steps[:1]).masks.tolist() == [[False, True]]  # type: ignore[union-attr]
    with pytest.raises(InvalidRequest) as info:
        _batch(cart, steps=steps, fragments=[_fragment(actions=[[0], [1]], observations=[[0.0] * 4] * 3)])
    assert [(f.field, f.message) for f in info.value.fields] == [
        (f"body.steps.{i}.action", f"action 0 is one its action mask (body.steps.{i}.action_mask) forbids") for i in (1, 2)]


def test_one_step_is_a_batch_of_one(box_policy: ServedPolicy) -> None:
    step = {"obs": [0.0, 0.1, 0.2], "action": [0.5, -0.5], "reward": 1.0, "next_obs": [1.0, 1.1, 1.2], "model_version": 0}
    batch = _batch(box_policy, steps=[step])  # numpy could not compare 0 pairs of neighbours: a ValueError, a 500
    assert len(batch) == 1 and batch.segment_end.tolist() == [True]
