"""Gymnasium spaces in YAML: every type of the schema, named errors, and round trips both ways."""

from __future__ import annotations

import gymnasium as gym
import gymnasium.spaces as gs
import numpy as np
import pytest
import yaml

from policy_server.errors import SchemaError
from policy_server.schema.gym_spaces import (
    BOX_DTYPES,
    describe_space,
    model_input,
    model_input_width,
    parse_space,
)

WHERE = "policies.p.observation_space"
INF, NAN = float("inf"), float("nan")

IMAGE = {"type": "box", "shape": [64, 64, 3], "dtype": "uint8", "low": 0, "high": 255}
DICT = {
    "type": "dict",
    "spaces": {
        "image": IMAGE,
        "speed": {"type": "box", "shape": [1], "low": -1.0, "high": 1.0},
        "gear": {"type": "discrete", "n": 5},
        "buttons": {"type": "multi_binary", "n": 4},
        "cmds": {"type": "multi_discrete", "nvec": [3, 2]},
        "legal": {"type": "multi_binary", "n": 6},
    },
}


def test_yaml_text_parses() -> None:
    raw = yaml.safe_load("{type: box, shape: [2], low: [-.inf, 0], high: 1.5}")
    assert parse_space(raw, WHERE) == gs.Box(np.array([-np.inf, 0.0], np.float32), np.float32(1.5), (2,), np.float32)


def test_every_type_parses_to_gymnasiums_space() -> None:
    space = parse_space(DICT, WHERE)
    assert space == gs.Dict({
        "image": gs.Box(0, 255, (64, 64, 3), np.uint8),
        "speed": gs.Box(-1.0, 1.0, (1,), np.float32),
        "gear": gs.Discrete(5),
        "buttons": gs.MultiBinary(4),
        "cmds": gs.MultiDiscrete([3, 2]),
        "legal": gs.MultiBinary(6),
    })
    assert list(space.spaces) == sorted(DICT["spaces"])  # Gymnasium's (flattening) order
    tuple_space = parse_space({"type": "tuple", "spaces": [{"type": "discrete", "n": 3, "start": -1},
                                                           {"type": "multi_binary", "n": [2, 3]}]}, WHERE)
    assert tuple_space == gs.Tuple([gs.Discrete(3, start=-1), gs.MultiBinary([2, 3])])


def test_box_defaults_and_bounds() -> None:
    unbounded = parse_space({"type": "box", "shape": [2]}, WHERE)
    assert unbounded.dtype == np.float32 and np.all(np.isneginf(unbounded.low)) and np.all(np.isposinf(unbounded.high))
    full = parse_space({"type": "box", "shape": [2], "dtype": "int16"}, WHERE)
    assert full.low.tolist() == [-(2**15)] * 2 and full.high.tolist() == [2**15 - 1] * 2
    channels = parse_space({"type": "box", "shape": [2, 2, 3], "dtype": "uint8", "high": [10, 20, 255]}, WHERE)
    assert channels.high[1, 0].tolist() == [10, 20, 255] and channels.low.max() == 0  # broadcast per channel
    nested = parse_space({"type": "box", "shape": [2], "low": [-1, -0.5], "high": [1, INF]}, WHERE)
    assert nested.low.tolist() == [-1.0, -0.5] and nested.high.tolist() == [1.0, INF]
    for dtype in BOX_DTYPES:
        assert parse_space({"type": "box", "shape": [1], "dtype": dtype}, WHERE).dtype == np.dtype(dtype)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1, 2], f"{WHERE}: a space is a mapping"),
        ({"type": "image"}, f"{WHERE}.type: unknown space type 'image'; expected one of box, discrete"),
        ({"shape": [2]}, f"{WHERE}.type: unknown space type None"),
        ({"type": "box", "shape": [2], "dtype": "uint9"}, f"{WHERE}.dtype: unknown dtype 'uint9'; expected one of uint8"),
        ({"type": "box", "shape": [2], "dtype": "bool"}, f"{WHERE}.dtype: unknown dtype 'bool'"),
        ({"type": "box", "dtype": "uint8"}, f"{WHERE}.shape: Field required"),
        ({"type": "box", "shape": [2], "size": 3}, f"{WHERE}.size: unknown key"),
        ({"type": "box", "shape": [2], "dtype": "uint8", "high": 300}, f"{WHERE}.high: 300 is outside the range of uint8"),
        ({"type": "box", "shape": [2], "dtype": "uint8", "low": -1}, f"{WHERE}.low: -1 is outside the range of uint8"),
        ({"type": "box", "shape": [2], "high": 1e39}, f"{WHERE}.high: 1e+39 is outside the range of float32"),
        ({"type": "box", "shape": [2], "dtype": "int32", "low": 0.5}, f"{WHERE}.low: a Box of dtype int32 has integer"),
        ({"type": "box", "shape": [2], "dtype": "int32", "low": -INF}, f"{WHERE}.low: a Box of dtype int32 has integer"),
        ({"type": "box", "shape": [2], "low": [0, 0, 0]}, f"{WHERE}.low: shape [3] does not broadcast to the Box's shape [2]"),
        ({"type": "box", "shape": [2], "low": [[0], [0, 1]]}, f"{WHERE}.low: nested lists of unequal lengths"),
        ({"type": "box", "shape": [2], "low": "zero"}, f"{WHERE}.low: bounds are numbers"),
        ({"type": "box", "shape": [2], "low": NAN}, f"{WHERE}.low: NaN is no bound"),
        ({"type": "box", "shape": [2], "low": [0, 2], "high": 1}, f"{WHERE}.low: 2.0 > high 1.0 at index [1]"),
        ({"type": "discrete", "n": 0}, f"{WHERE}.n: Input should be greater than 0"),
        ({"type": "discrete", "n": True}, f"{WHERE}.n: Input should be a valid integer"),
        ({"type": "multi_binary", "n": [2, 0]}, f"{WHERE}.n: a positive integer or a list of them"),
        ({"type": "multi_binary", "n": "4"}, f"{WHERE}.n: a positive integer or a list of them"),
        ({"type": "multi_discrete", "nvec": []}, f"{WHERE}.nvec: List should have at least 1 item"),
        ({"type": "multi_discrete", "nvec": [3, 2], "start": [0]}, f"{WHERE}.start: 1 entries but nvec has 2"),
        ({"type": "dict", "spaces": {}}, f"{WHERE}.spaces: Dictionary should have at least 1 item"),
        ({"type": "dict", "spaces": {"gear": {"type": "discrete"}}}, f"{WHERE}.spaces.gear.n: Field required"),
        ({"type": "tuple", "spaces": [{"type": "discrete", "n": 2}, {"type": "box", "shape": [-1]}]},
         f"{WHERE}.spaces.1.shape.0: Input should be greater than or equal to 0"),
    ],
)
def test_errors_name_the_field(raw: object, message: str) -> None:
    with pytest.raises(SchemaError) as caught:
        parse_space(raw, WHERE)
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        (IMAGE, {"type": "box", "shape": [64, 64, 3], "dtype": "uint8"}),  # 0..255 is uint8's range
        ({"type": "box", "shape": [2], "dtype": "float32", "low": -INF, "high": [0.1, 0.1]},
         {"type": "box", "shape": [2], "high": 0.1}),
        ({"type": "box", "shape": [2, 1], "dtype": "float64", "low": [[0.1], [0.2]]},
         {"type": "box", "shape": [2, 1], "dtype": "float64", "low": [[0.1], [0.2]]}),
        ({"type": "box", "shape": [], "dtype": "int8", "low": -3, "high": 3},
         {"type": "box", "shape": [], "dtype": "int8", "low": -3, "high": 3}),
        ({"type": "discrete", "n": 4, "start": 0}, {"type": "discrete", "n": 4}),
        ({"type": "discrete", "n": 4, "start": 2}, {"type": "discrete", "n": 4, "start": 2}),
        ({"type": "multi_binary", "n": [4]}, {"type": "multi_binary", "n": [4]}),
        ({"type": "multi_discrete", "nvec": [3, 2], "start": [0, 0]}, {"type": "multi_discrete", "nvec": [3, 2]}),
        ({"type": "multi_discrete", "nvec": [3, 2], "start": [1, 0]},
         {"type": "multi_discrete", "nvec": [3, 2], "start": [1, 0]}),
        (DICT, {"type": "dict", "spaces": {
            "buttons": {"type": "multi_binary", "n": 4},
            "cmds": {"type": "multi_discrete", "nvec": [3, 2]},
            "gear": {"type": "discrete", "n": 5},
            "image": {"type": "box", "shape": [64, 64, 3], "dtype": "uint8"},
            "legal": {"type": "multi_binary", "n": 6},
            "speed": {"type": "box", "shape": [1], "low": -1.0, "high": 1.0},
        }}),
        ({"type": "tuple", "spaces": [IMAGE, {"type": "discrete", "n": 2}]},
         {"type": "tuple", "spaces": [{"type": "box", "shape": [64, 64, 3], "dtype": "uint8"},
                                      {"type": "discrete", "n": 2}]}),
    ],
)
def test_describe_parse_gives_the_normalised_yaml(raw: dict, normalised: dict) -> None:
    described = describe_space(parse_space(raw, WHERE))
    assert described == normalised
    assert list(described.get("spaces", ())) == list(normalised.get("spaces", ()))  # dict key order too


@pytest.mark.parametrize(
    "space",
    [
        gym.make("CartPole-v1").observation_space,  # partly unbounded float32 bounds
        gs.Box(0, 255, (210, 160, 3), np.uint8),  # Pong's frames
        gs.Dict({"pos": gs.Box(-1.5, 2.5, (3,), np.float64), "mode": gs.Discrete(3, start=1),
                 "flags": gs.MultiBinary([2, 2]), "cmds": gs.MultiDiscrete([4, 2])}),
        gs.Tuple([gs.Box(np.array([0.0, -1.0], np.float32), np.float32(1.0), dtype=np.float32), gs.Discrete(7),
                  gs.Tuple([gs.MultiBinary(3)])]),
    ],
    ids=["cartpole", "pong", "dict", "tuple"],
)
def test_parse_describe_gives_the_space_back(space: gs.Space) -> None:
    assert parse_space(describe_space(space), WHERE) == space


def test_spaces_without_a_schema_form_are_refused() -> None:
    with pytest.raises(SchemaError, match="Text spaces have no schema form"):
        describe_space(gs.Text(5))
    with pytest.raises(SchemaError, match="a Box of dtype bool has no schema form"):
        describe_space(gs.Box(0, 1, (2,), np.bool_))


def test_model_input_is_the_box_as_it_is_and_every_other_space_flattened() -> None:
    assert model_input(parse_space(IMAGE, WHERE)) == ((64, 64, 3), np.dtype(np.uint8))
    space = parse_space(DICT, WHERE)
    # buttons 4 + cmds 3+2 + gear 5 (one-hot) + image 64*64*3 + legal 6 + speed 1
    width = 4 + 5 + 5 + 64 * 64 * 3 + 6 + 1
    assert model_input(space) == ((width,), np.dtype(np.float32)) and model_input_width(space) == width
    assert gs.flatten(space, space.sample()).shape == (width,)
