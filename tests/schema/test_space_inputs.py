"""Observations of a Gymnasium space: checked with NumPy, named at the first bad value, flattened
as Gymnasium flattens them."""

from __future__ import annotations

import time

import gymnasium.spaces as gs
import numpy as np
import pytest

from policy_server.errors import InvalidRequest, SchemaError
from policy_server.schema.space_inputs import input_space, json_schema, mask_size, read_batch, read_one

IMAGE = gs.Box(0, 255, (84, 84, 4), np.uint8)
DICT = gs.Dict({
    "pos": gs.Box(-1.0, 1.0, (3,), np.float32),
    "gear": gs.Discrete(5, start=1),
    "buttons": gs.MultiBinary(2),
    "cmds": gs.MultiDiscrete([3, 2]),
    "legal": gs.MultiBinary(4),
})
DICT_OBS = {"pos": [0.5, -1, 0.25], "gear": 2, "buttons": [1, 0], "cmds": [2, 1], "legal": [True, False, True, True]}


def bad(space: gs.Space, value: object, field: str, batch: bool = False) -> str:
    """The message of the 422, which must name ``field``."""
    with pytest.raises(InvalidRequest) as caught:
        (read_batch if batch else read_one)(space, value, "body.obs")
    assert [f.field for f in caught.value.fields] == [field], caught.value.message
    return caught.value.fields[0].message


def test_a_box_reaches_the_model_as_it_is() -> None:
    image = np.random.default_rng(0).integers(0, 256, (84, 84, 4))
    rows, mask = read_one(IMAGE, image.tolist(), "body.obs")
    assert rows.dtype == np.uint8 and rows.shape == (1, 84, 84, 4) and np.array_equal(rows[0], image) and mask is None
    batch, _ = read_batch(IMAGE, [image.tolist(), image.tolist()], "body.obs")
    assert batch.shape == (2, 84, 84, 4) and batch.dtype == np.uint8
    floats, _ = read_one(gs.Box(-np.inf, np.inf, (2,), np.float64), [1, 0.1], "body.obs")
    assert floats.dtype == np.float64 and floats.tolist() == [[1.0, 0.1]]


def test_other_spaces_are_flattened_as_gymnasium_does_and_the_mask_entry_is_split_off() -> None:
    rows, mask = read_batch(DICT, [DICT_OBS, DICT_OBS | {"gear": 5}], "body.obs", mask_key="legal")
    model_space = input_space(DICT, "legal", "action_space.mask")
    expected = gs.flatten(model_space, {
        "pos": np.array([0.5, -1, 0.25], np.float32), "gear": np.int64(2), "buttons": np.array([1, 0], np.int8),
        "cmds": np.array([2, 1])})
    assert rows.dtype == np.float32 and rows.shape == (2, gs.flatdim(model_space)) == (2, 3 + 5 + 2 + 5)
    np.testing.assert_array_equal(rows[0], expected)
    assert rows[1, 2 + 5 + 4] == 1.0  # gear 5: the last of the one-hot (start 1), after buttons and cmds
    assert mask is not None and mask.dtype == bool and mask.tolist() == [[True, False, True, True]] * 2
    assert mask_size(DICT, "legal") == 4 and mask_size(DICT, None) is None
    tuple_rows, _ = read_one(gs.Tuple([gs.Discrete(2), gs.Box(0, 1, (1,))]), [1, [0.5]], "body.obs")
    assert tuple_rows.tolist() == [[0.0, 1.0, 0.5]]


@pytest.mark.parametrize(
    ("value", "field", "message"),
    [
        ([[[0] * 4] * 84] * 83, "body.obs", "expected 84 values (shape [84, 84, 4]), got 83"),
        ([[[0] * 4] * 84] * 83 + [[[0] * 4] * 84 + [[0, 0, 0]]], "body.obs.83", "expected 84 values (shape [84, 4]), got 85"),
        ([[[0] * 4] * 84] * 40 + [[[0] * 4] * 10 + [[0, 0, 0]] + [[0] * 4] * 73] + [[[0] * 4] * 84] * 43,
         "body.obs.40.10", "expected 4 values (shape [4]), got 3"),
        ([[[0] * 4] * 84] * 83 + [[[0] * 4] * 83 + [[0, 0, 0, {"a": 1}]]], "body.obs.83.83.3", "expected integers of uint8, got {'a': 1}"),
        ([[[0] * 4] * 84] * 83 + [[[0] * 4] * 83 + [[0, 0, 256, 0]]], "body.obs.83.83.2", "256 is above the space's high 255"),
        ([[[0] * 4] * 84] * 2 + [[[0] * 4] * 84] * 81 + [[[0] * 4] * 5 + [[0, -1, 0, 0]] + [[0] * 4] * 78],
         "body.obs.83.5.1", "-1 is below the space's low 0"),
        ([[[0] * 4] * 84] * 83 + [[[0] * 4] * 83 + [[0, 1.5, 0, 0]]], "body.obs.83.83.1",
         "expected integers of uint8, got 1.5"),
        ([[[0] * 4] * 84] * 83 + [[[0] * 4] * 83 + [[0, 0, "7", 0]]], "body.obs.83.83.2", "expected integers of uint8, got '7'"),
        ([[[True] * 4] * 84] * 84, "body.obs.0.0.0", "expected integers of uint8, got True"),
        ([[[0] * 4] * 84] * 83 + [[[0] * 4] * 83 + [[0, 0, 2**70, 0]]], "body.obs.83.83.2", "1180591620717411303424 is out of the range of uint8"),
        ([[[0] * 4] * 84] * 83 + [[[0] * 4] * 83 + [[0, 0, 0, True]]], "body.obs.83.83.3", "expected integers of uint8, got True"),
        ([[[0] * 4] * 84] * 83 + [[[0] * 4] * 83 + [[0, 0, 0, None]]], "body.obs.83.83.3", "expected integers of uint8, got None"),
        (7, "body.obs", "expected a list of shape [84, 84, 4], got 7"),
    ],
)
def test_an_image_names_its_first_bad_value(value: object, field: str, message: str) -> None:
    assert bad(IMAGE, value, field).startswith(message)


def test_floats_must_be_finite_at_the_boxs_precision() -> None:
    box = gs.Box(-np.inf, np.inf, (3,), np.float32)
    assert "is not finite as float32" in bad(box, [0.0, 1e39, 0.0], "body.obs.1")
    assert "is not finite as float32" in bad(box, [0.0, 0.0, float("nan")], "body.obs.2")
    assert read_one(gs.Box(-np.inf, np.inf, (1,), np.float64), [1e39], "body.obs")[0].tolist() == [[1e39]]
    assert "above the space's high 2.5" in bad(gs.Box(0.0, 2.5, (2,), np.float32), [[0, 1], [2, 3]], "body.obs.1.1", batch=True)


def test_every_other_space_names_its_first_bad_value() -> None:
    assert "missing" in bad(DICT, {k: v for k, v in DICT_OBS.items() if k != "gear"}, "body.obs.gear")
    assert "unknown key" in bad(DICT, DICT_OBS | {"speed": 1}, "body.obs.speed")
    assert "an object with keys" in bad(DICT, [1, 2], "body.obs")
    assert "outside [1, 6)" in bad(DICT, DICT_OBS | {"gear": 0}, "body.obs.gear")
    assert "an integer in [1, 6)" in bad(DICT, DICT_OBS | {"gear": True}, "body.obs.gear")
    assert "not 0 or 1 (MultiBinary)" in bad(DICT, DICT_OBS | {"buttons": [2, 0]}, "body.obs.buttons.0")
    assert "expected integers of float32, got '1'" not in bad(DICT, DICT_OBS | {"pos": [0, "1", 0]}, "body.obs.pos.1")
    assert bad(DICT, DICT_OBS | {"pos": [0, False, 0]}, "body.obs.pos.1") == "expected numbers of float32, got False"
    assert "within [start, start + nvec)" in bad(DICT, DICT_OBS | {"cmds": [2, 2]}, "body.obs.cmds.1")
    assert "above the space's high 1.0" in bad(DICT, [DICT_OBS, DICT_OBS | {"pos": [0, 0, 2]}], "body.obs.1.pos.2", batch=True)
    pair = gs.Tuple([gs.Discrete(2), gs.Box(0, 1, (1,))])
    assert "a list of 2 values (Tuple)" in bad(pair, [1], "body.obs")
    assert "outside [0, 2)" in bad(pair, [2, [0.5]], "body.obs.0")


def test_the_mask_entry_must_be_a_multi_binary_of_a_dict() -> None:
    assert input_space(DICT, None, "m") is DICT
    with pytest.raises(SchemaError, match=r"action_space.mask: 'mask' is no key of the observation_space \(its keys"):
        input_space(DICT, "mask", "action_space.mask")
    with pytest.raises(SchemaError, match="is no key of the observation_space .it is no Dict"):
        input_space(IMAGE, "legal", "action_space.mask")
    with pytest.raises(SchemaError, match="must be a multi_binary entry"):
        input_space(DICT, "gear", "action_space.mask")


def test_the_json_schema_documents_the_nested_arrays() -> None:
    image = json_schema(IMAGE)
    assert (image["minItems"], image["items"]["minItems"], image["items"]["items"]["maxItems"]) == (84, 84, 4)
    assert image["items"]["items"]["items"] == {"type": "integer", "minimum": 0, "maximum": 255}
    described = json_schema(DICT)
    assert described["required"] == list(DICT.spaces) and described["additionalProperties"] is False
    assert described["properties"]["gear"] == {"type": "integer", "minimum": 1, "maximum": 5}
    assert described["properties"]["pos"]["items"] == {"type": "number", "minimum": -1.0, "maximum": 1.0}
    assert json_schema(gs.Tuple([gs.Discrete(2)]))["prefixItems"] == [{"type": "integer", "minimum": 0, "maximum": 1}]


def test_an_84x84x4_image_is_checked_in_milliseconds() -> None:
    image = np.random.default_rng(1).integers(0, 256, (84, 84, 4)).tolist()
    read_one(IMAGE, image, "body.obs")
    start = time.perf_counter()
    for _ in range(5):
        read_one(IMAGE, image, "body.obs")
    per_image = (time.perf_counter() - start) / 5
    assert per_image < 0.05  # about 2 ms here; a pydantic model of the nested lists about 8 ms
