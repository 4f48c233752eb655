"""A safetensors ``/train/experience`` body read without HTTP (``gateway.training.binary``): a
tensor whose rows differ from the other step tensors' is the one named; action masks travel as
tensors and read as the JSON form's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import CART_OBSERVATIONS, cart_fragment

from policy_server.errors import InvalidRequest
from policy_server.export import MLPPolicy, export_module
from policy_server.gateway.training.binary import experience
from policy_server.gateway.training.experience import ExperienceRequest, to_batch
from policy_server.policies.served import ServedPolicy, resolve_policy
from policy_server.schema.config import parse_schema

META = {"client_id": "c1", "model_version": "0"}
ROBOT = {"type": "dict", "spaces": {"pos": {"type": "box", "shape": [2], "low": -1, "high": 1},
                                    "gear": {"type": "discrete", "n": 3}}}


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServedPolicy]:
    """``cart``: Pathmind observations (4 floats), 2 actions; ``robot``: a Dict space, 3 actions;
    ``legal``: the robot with a Dict mask entry ``legal``."""
    root = tmp_path_factory.mktemp("binary-experience")
    torch.manual_seed(0)
    export_module(MLPPolicy(4, [8], nvec=[2]), 4, root / "cart.pt2")
    export_module(MLPPolicy(5, [8], nvec=[3]), 5, root / "robot.pt2")
    schema = {"policies": {
        "cart": {"observations": CART_OBSERVATIONS, "model": "cart.pt2", "action_space": {"type": "discrete", "n": 2}},
        "robot": {"observation_space": ROBOT, "model": "robot.pt2"},
        "legal": {"model": "robot.pt2", "action_space": {"type": "discrete", "mask": "legal"},
                  "observation_space": {"type": "dict", "spaces": ROBOT["spaces"] | {"legal": {"type": "multi_binary", "n": 3}}}},
    }}
    parsed = parse_schema(schema, root).policies
    return {name: resolve_policy(spec)[0] for name, spec in parsed.items()}


def cart_steps(n: int = 8) -> dict[str, np.ndarray]:
    fragment = cart_fragment(steps=n)
    obs = np.array(fragment["observations"], np.float32)
    return {"obs": obs[:-1], "next_obs": obs[1:], "actions": np.array(fragment["actions"]),
            "rewards": np.ones(n, np.float32), "log_probs": np.full(n, -0.69, np.float32),
            "terminated": np.arange(n) == n - 1, "truncated": np.zeros(n, bool)}


def robot_steps(n: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    pos, gear = rng.uniform(-1, 1, (n + 1, 2)).astype(np.float32), rng.integers(0, 3, n + 1)
    return {"obs.pos": pos[:-1], "obs.gear": gear[:-1], "next_obs.pos": pos[1:], "next_obs.gear": gear[1:],
            "actions": rng.integers(0, 3, n), "rewards": np.ones(n, np.float32)}


def refusal(tensors: dict[str, np.ndarray], policy: ServedPolicy) -> list[dict[str, Any]]:
    with pytest.raises(InvalidRequest) as caught:
        experience(safetensors.numpy.save(tensors, metadata=META), policy, 4096)
    return [{"field": f.field, "message": f.message} for f in caught.value.fields]


def test_whole_bodies_are_read(policies: dict[str, ServedPolicy]) -> None:
    for name, steps in (("cart", cart_steps()), ("robot", robot_steps())):
        batch, _ = experience(safetensors.numpy.save(steps, metadata=META), policies[name], 4096)
        assert len(batch.rewards) == 8 and batch.obs.shape[0] == batch.next_obs.shape[0] == 8, name


@pytest.mark.parametrize("name", list(cart_steps()))
def test_a_tensor_with_one_row_too_few_or_too_many_is_the_one_named(policies: dict[str, ServedPolicy], name: str) -> None:
    for rows in (7, 9):
        tensors = cart_steps()
        tensors[name] = np.concatenate([tensors[name], tensors[name]])[:rows]
        fields = refusal(tensors, policies["cart"])
        assert [f["field"] for f in fields] == [f"body.{name}"], (rows, fields)
        assert fields[0]["message"].startswith(f"{rows} rows, but ") and "have 8: one row per step" in fields[0]["message"]


@pytest.mark.parametrize("name", list(robot_steps()))
def test_a_dict_entry_or_step_tensor_with_other_rows_is_the_one_named(policies: dict[str, ServedPolicy], name: str) -> None:
    tensors = robot_steps()
    tensors[name] = tensors[name][:7]
    assert [f["field"] for f in refusal(tensors, policies["robot"])] == [f"body.{name}"]


def test_two_tensors_of_other_rows_are_both_named(policies: dict[str, ServedPolicy]) -> None:
    tensors = cart_steps()
    tensors["rewards"], tensors["log_probs"] = tensors["rewards"][:5], tensors["log_probs"][:6]
    assert [f["field"] for f in refusal(tensors, policies["cart"])] == ["body.rewards", "body.log_probs"]


def test_a_tensor_of_the_wrong_rank_is_named_by_its_own_check(policies: dict[str, ServedPolicy]) -> None:
    tensors = cart_steps()
    tensors["rewards"] = tensors["rewards"][:, None]
    assert refusal(tensors, policies["cart"]) == [{"field": "body.rewards", "message": "shape [8, 1], expected [8]"}]


MASKS = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]], bool)


def test_masks_travel_as_tensors_and_read_as_the_json_steps_do(policies: dict[str, ServedPolicy]) -> None:
    tensors = robot_steps(4) | {"action_mask": MASKS, "next_action_mask": np.roll(MASKS, 1, axis=0)}
    tensors["next_action_mask"][3] = False  # a next state may allow nothing (a terminal one)
    batch, _ = experience(safetensors.numpy.save(tensors, metadata=META), policies["robot"], 4096)
    json_steps = [{"obs": {"pos": tensors["obs.pos"][i].tolist(), "gear": int(tensors["obs.gear"][i])},
                   "next_obs": {"pos": tensors["next_obs.pos"][i].tolist(), "gear": int(tensors["next_obs.gear"][i])},
                   "action": int(tensors["actions"][i]), "reward": 1.0, "model_version": 0,
                   "action_mask": tensors["action_mask"][i].tolist(),
                   "next_action_mask": tensors["next_action_mask"][i].tolist()} for i in range(4)]
    expected = to_batch(ExperienceRequest.model_validate({"client_id": "c1", "steps": json_steps}), policies["robot"], 4096)
    assert batch.masks is not None and batch.next_masks is not None and expected.masks is not None
    assert (batch.masks == expected.masks).all() and (batch.next_masks == expected.next_masks).all()
    unmasked, _ = experience(safetensors.numpy.save(robot_steps(4), metadata=META), policies["robot"], 4096)
    assert unmasked.masks is None and unmasked.next_masks is None


def test_a_dict_mask_entry_is_a_mask_and_action_mask_wins_over_it(policies: dict[str, ServedPolicy]) -> None:
    entry = robot_steps(4) | {"obs.legal": MASKS.astype(np.uint8), "next_obs.legal": MASKS[::-1].astype(np.uint8)}
    batch, _ = experience(safetensors.numpy.save(entry, metadata=META), policies["legal"], 4096)
    assert batch.masks.tolist() == MASKS.tolist() and batch.next_masks.tolist() == MASKS[::-1].tolist()  # type: ignore[union-attr]
    given = np.ones((4, 3), bool)
    batch, _ = experience(safetensors.numpy.save(entry | {"action_mask": given}, metadata=META), policies["legal"], 4096)
    assert batch.masks.tolist() == given.tolist()  # type: ignore[union-attr]


@pytest.mark.parametrize("name, value, field, words", [
    ("action_mask", MASKS[[0, 1, 2, 2]] * [[1], [1], [1], [0]], "body.action_mask.3", "allows none of the 3 actions"),
    ("action_mask", MASKS[:3], "body.action_mask", "3 rows, but"),
    ("next_action_mask", MASKS[:, :2], "body.next_action_mask", "shape [4, 2], expected [4, 3]"),
    ("action_mask", MASKS * 2, "body.action_mask", "value 2 at [0, 0]"),
    ("obs.legal", MASKS[:3], "body.obs.legal", "3 rows, but"),
    ("obs.legal", np.zeros((4, 3), bool), "body.obs.legal.0", "allows none of the 3 actions"),
])
def test_a_bad_mask_tensor_is_the_one_named(policies: dict[str, ServedPolicy], name: str, value: np.ndarray,
                                            field: str, words: str) -> None:
    fields = refusal(robot_steps(4) | {name: value}, policies["legal"])
    assert fields[0]["field"] == field and words in fields[0]["message"], fields


def test_a_mask_tensor_is_unknown_where_no_mask_is_taken(policies: dict[str, ServedPolicy]) -> None:
    assert refusal(robot_steps(4) | {"obs.legal": MASKS}, policies["robot"])[0]["field"] == "body.obs.legal"


@pytest.mark.parametrize("name", ["action_mask", "obs.legal"])
def test_an_action_its_own_mask_forbids_is_refused_naming_the_row(policies: dict[str, ServedPolicy], name: str) -> None:
    tensors = robot_steps(4) | {name: MASKS}  # the actions [2, 1, 0, 2] are legal (the tests above read them)
    tensors["actions"] = np.array([0, 0, 0, 1])  # rows 1 and 3 forbid them; the next states' masks do not matter
    assert refusal(tensors | {"next_action_mask": np.zeros((4, 3), bool)}, policies["legal"]) == [
        {"field": f"body.actions.{i}", "message": f"action {a} is one its action mask (body.{name}.{i}) forbids"}
        for i, a in ((1, 0), (3, 1))]
