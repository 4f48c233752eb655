"""Observation request models built from the schema, and their flattening into model input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

from policy_server.fields import FLOAT32_LIMIT, FLOAT32_MAX
from policy_server.schema.config import ObservationSpec
from policy_server.schema.observations import build_observation_model, flatten, resolve_widths


def specs(**types: dict) -> dict[str, ObservationSpec]:
    return {name: ObservationSpec(**kw) for name, kw in types.items()}


@pytest.fixture
def observations() -> dict[str, ObservationSpec]:
    return specs(
        id={"type": "int"},
        position={"type": "List[float]", "min_items": 2, "max_items": 2},
        free={"type": "bool"},
        speed={"type": "float"},
        counts={"type": "List[int]", "min_items": 3, "max_items": 3},
    )


@pytest.fixture
def model(observations: dict[str, ObservationSpec]) -> type[BaseModel]:
    return build_observation_model("Observation", observations, resolve_widths(observations, None))


def valid() -> dict:
    return {"id": 7, "position": [1.5, -2.0], "free": True, "speed": 0.25, "counts": [4, 5, 6]}


def error_locs(exc: ValidationError) -> list[tuple]:
    return [e["loc"] for e in exc.errors()]


def test_valid_observation_is_accepted(model: type[BaseModel]) -> None:
    obs = model(**valid())
    assert obs.position == [1.5, -2.0] and obs.free is True and obs.counts == [4, 5, 6]


def test_unknown_field_is_refused(model: type[BaseModel]) -> None:
    with pytest.raises(ValidationError) as info:
        model(**valid(), extra_field=1)
    assert [(e["loc"], e["type"]) for e in info.value.errors()] == [(("extra_field",), "extra_forbidden")]


def test_missing_field_is_refused(model: type[BaseModel]) -> None:
    data = valid()
    del data["free"]
    with pytest.raises(ValidationError) as info:
        model(**data)
    assert [(e["loc"], e["type"]) for e in info.value.errors()] == [(("free",), "missing")]


@pytest.mark.parametrize(
    "bad",
    # non-finite, and finite as a float64 but overflowing float32
    [math.nan, math.inf, -math.inf, 1e39, -1e39, 3.4028236e38, -3.4028236e38, 1e300, 10**39],
)
def test_a_float_that_float32_cannot_hold_is_refused(model: type[BaseModel], bad: float) -> None:
    with pytest.raises(ValidationError) as info:
        model(**(valid() | {"speed": bad}))
    assert error_locs(info.value) == [("speed",)]
    with pytest.raises(ValidationError) as info:
        model(**(valid() | {"position": [0.0, bad]}))
    assert error_locs(info.value) == [("position", 1)]


@pytest.mark.parametrize(
    "field,value,error",
    [
        ("position", [1.0], "too_short"),
        ("position", [1.0, 2.0, 3.0], "too_long"),
        ("counts", [], "too_short"),
    ],
)
def test_wrong_list_length_is_refused(
    model: type[BaseModel], field: str, value: list, error: str
) -> None:
    with pytest.raises(ValidationError) as info:
        model(**(valid() | {field: value}))
    assert [(e["loc"], e["type"]) for e in info.value.errors()] == [((field,), error)]


def test_model_fields_follow_schema_order(model: type[BaseModel]) -> None:
    assert list(model.model_fields) == ["id", "position", "free", "speed", "counts"]
    assert model.model_json_schema()["additionalProperties"] is False


def test_flatten_preserves_order_expands_lists_and_casts_bools(
    model: type[BaseModel], observations: dict[str, ObservationSpec]
) -> None:
    second = valid() | {"id": -1, "free": False, "position": [0.0, 3.0], "counts": [0, 1, 2]}
    out = flatten([model(**valid()), model(**second)])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(
        out,
        np.array(
            [[7, 1.5, -2.0, 1, 0.25, 4, 5, 6], [-1, 0.0, 3.0, 0, 0.25, 0, 1, 2]], dtype=np.float32
        ),
    )


def test_flatten_uses_the_schema_order_not_the_payload_order(model: type[BaseModel]) -> None:
    payload = dict(reversed(list(valid().items())))
    out = flatten([model(**payload)])
    np.testing.assert_array_equal(out[0], [7, 1.5, -2.0, 1, 0.25, 4, 5, 6])


LPOC_NAMES = [
    "id",
    "coordinates_0",
    "coordinates_1",
    "has_up_neighbour",
    "is_up_free",
    "has_right_neighbour",
    "is_right_free",
    "has_down_neighbour",
    "is_down_free",
    "has_left_neighbour",
    "is_left_free",
]


def test_lpoc_observations_flatten_to_eleven_columns() -> None:
    obs_specs = {n: ObservationSpec(type="int" if i < 3 else "bool") for i, n in enumerate(LPOC_NAMES)}
    model = build_observation_model("Lpoc", obs_specs, resolve_widths(obs_specs, None))
    values = {n: (10 * i if i < 3 else i % 2 == 0) for i, n in enumerate(LPOC_NAMES)}
    out = flatten([model(**values)])
    np.testing.assert_array_equal(out, [[0, 10, 20, 0, 1, 0, 1, 0, 1, 0, 1]])


# --- resolve_widths -------------------------------------------------------------------------


def test_fixed_widths_need_no_model() -> None:
    obs = specs(a={"type": "int"}, b={"type": "List[float]", "min_items": 4, "max_items": 4})
    assert resolve_widths(obs, None) == {"a": 1, "b": 4}
    assert resolve_widths(obs, 99) == {"a": 1, "b": 4}  # the caller compares the sum with the model


def test_one_open_list_takes_the_remaining_columns() -> None:
    obs = specs(
        a={"type": "int"},
        b={"type": "List[float]"},
        c={"type": "List[int]", "min_items": 2, "max_items": 2},
    )
    widths = resolve_widths(obs, 10)
    assert widths == {"a": 1, "b": 7, "c": 2}
    assert list(widths) == ["a", "b", "c"]
    model = build_observation_model("Obs", obs, widths)
    with pytest.raises(ValidationError):
        model(a=1, b=[0.0] * 6, c=[1, 2])
    assert model(a=1, b=[0.0] * 7, c=[1, 2]).b == [0.0] * 7


def test_open_list_within_its_bounds() -> None:
    obs = specs(a={"type": "List[float]", "min_items": 2, "max_items": 8})
    assert resolve_widths(obs, 5) == {"a": 5}
    bounds = r"observations\.a: the model leaves 9 columns.*min_items=2.*max_items=8"
    with pytest.raises(ValueError, match=bounds):
        resolve_widths(obs, 9)
    with pytest.raises(ValueError, match=r"observations\.a: the model leaves 1 columns"):
        resolve_widths(obs, 1)


def test_open_list_when_the_model_is_narrower_than_the_fixed_fields() -> None:
    obs = specs(a={"type": "List[int]", "min_items": 3, "max_items": 3}, b={"type": "List[float]"})
    with pytest.raises(ValueError, match=r"observations\.b: the model leaves -1 columns"):
        resolve_widths(obs, 2)


def test_several_open_lists_are_left_open_for_each_request() -> None:
    obs = specs(a={"type": "List[float]"}, b={"type": "int"}, c={"type": "List[int]", "min_items": 1})
    assert resolve_widths(obs, 10) == {"a": None, "b": 1, "c": None}


def test_several_open_lists_that_cannot_fill_the_model_are_refused() -> None:
    obs = specs(a={"type": "List[float]", "max_items": 2}, b={"type": "int"}, c={"type": "List[int]", "max_items": 3})
    with pytest.raises(ValueError, match=r"observations\.a: the model leaves 9 columns for the lists a, c, whose "
                                         r"min_items/max_items sum to 0 / 5"):
        resolve_widths(obs, 10)
    with pytest.raises(ValueError, match=r"observations\.a: set min_items = max_items"):
        resolve_widths(obs, None)


def test_open_list_without_a_model_width_is_refused() -> None:
    obs = specs(a={"type": "int"}, b={"type": "List[float]"})
    with pytest.raises(ValueError, match=r"observations\.b: set min_items = max_items"):
        resolve_widths(obs, None)


# --- every value at the precision the model reads it, JSON types strictly ---------------------

@pytest.mark.parametrize("value", [3.4028235e38, -3.4028235e38, FLOAT32_MAX, 1e-45, 5])
def test_a_float_that_float32_holds_is_accepted(model: type[BaseModel], value: float) -> None:
    out = flatten([model(**(valid() | {"speed": value, "position": [value, 0.0]}))])
    assert np.isfinite(out).all() and out[0, 4] == np.float32(value) and out[0, 1] == np.float32(value)


def test_an_overflowing_float_says_why(model: type[BaseModel]) -> None:
    with pytest.raises(ValidationError) as info:
        model(**(valid() | {"speed": 1e39}))
    assert "overflows float32" in info.value.errors()[0]["msg"]


@pytest.mark.parametrize("value", [10**400, -(10**400), 2**24 + 1, -(2**24) - 1, 2**63])
def test_an_int_beyond_2_to_the_24_is_refused_with_its_range_and_why(model: type[BaseModel], value: int) -> None:
    with pytest.raises(ValidationError) as info:
        model(**(valid() | {"id": value}))
    assert error_locs(info.value) == [("id",)]
    message = info.value.errors()[0]["msg"]
    assert "[-16777216, 16777216]" in message and "float32" in message and len(message) < 300
    with pytest.raises(ValidationError) as info:
        model(**(valid() | {"counts": [0, value, 0]}))
    assert error_locs(info.value) == [("counts", 1)]


@pytest.mark.parametrize("value", [2**24, -(2**24), 0])
def test_an_int_within_2_to_the_24_is_held_exactly(model: type[BaseModel], value: int) -> None:
    out = flatten([model(**(valid() | {"id": value, "counts": [value, 0, 0]}))])
    assert int(out[0, 0]) == value and int(out[0, 5]) == value


@pytest.mark.parametrize(
    "field,value",
    [
        ("id", True), ("id", "5"), ("id", 5.5), ("id", "1e3"),
        ("free", "yes"), ("free", "off"), ("free", 1), ("free", 0), ("free", "true"), ("free", "1"),
        ("speed", "0.5"), ("speed", True), ("speed", "NaN"),
        ("counts", [1, "2", 3]), ("counts", [1, True, 3]), ("position", [0.5, "1"]), ("position", [False, 0.0]),
    ],
)
def test_strings_and_booleans_are_not_numbers_and_numbers_are_not_booleans(
    model: type[BaseModel], field: str, value: object
) -> None:
    with pytest.raises(ValidationError) as info:
        model(**(valid() | {field: value}))
    assert all(loc[0] == field for loc in error_locs(info.value))


def test_the_json_schema_declares_the_float32_and_int_ranges(model: type[BaseModel]) -> None:
    props = model.model_json_schema()["properties"]
    speed = props["speed"]
    assert speed["exclusiveMaximum"] == FLOAT32_LIMIT and speed["exclusiveMinimum"] == -FLOAT32_LIMIT
    assert props["id"]["maximum"] == 2**24 and props["counts"]["items"]["minimum"] == -(2**24)
    assert props["counts"]["minItems"] == props["counts"]["maxItems"] == 3


# --- List[bool] -------------------------------------------------------------------------------


def test_a_list_of_bool_is_fed_as_zeros_and_ones() -> None:
    obs = specs(actionMask={"type": "List[bool]", "min_items": 4, "max_items": 4}, x={"type": "float"})
    model = build_observation_model("Masked", obs, resolve_widths(obs, None))
    out = flatten([model(actionMask=[True, False, False, True], x=0.5)])
    np.testing.assert_array_equal(out, [[1, 0, 0, 1, 0.5]])
    for bad in ([1, 0, 0, 1], ["yes", "no", "no", "yes"], [True, False, True]):
        with pytest.raises(ValidationError):
            model(actionMask=bad, x=0.5)


# --- names: any text is a field name --------------------------------------------------------

ODD_NAMES = ["pos.x", "a b", "x-y", "größe", "schema", "json", "model_config", "copy", "_id", "1", "yes",
             "class", "field_0", "model_dump", "__init__", "dict"]


def test_any_name_is_a_json_field_name_and_flattens_in_schema_order() -> None:
    obs = specs(**{name: {"type": "int"} for name in ODD_NAMES})
    model = build_observation_model("Odd", obs, resolve_widths(obs, None))
    payload = {name: i for i, name in enumerate(ODD_NAMES)}
    parsed = model.model_validate(dict(reversed(list(payload.items()))))
    np.testing.assert_array_equal(flatten([parsed, parsed]), [list(range(len(ODD_NAMES)))] * 2)
    schema = model.model_json_schema()
    assert list(schema["properties"]) == ODD_NAMES and schema["required"] == ODD_NAMES
    attributes = list(model.model_fields)
    assert len(set(attributes)) == len(ODD_NAMES) and all(a.isidentifier() for a in attributes)


def test_a_name_is_read_only_as_itself() -> None:
    obs = specs(**{"pos.x": {"type": "int"}, "schema": {"type": "int"}})
    model = build_observation_model("Odd", obs, resolve_widths(obs, None))
    with pytest.raises(ValidationError) as info:
        model.model_validate({"field_0": 1, "field_1": 2})  # the attributes behind the names are not fields
    assert {e["type"] for e in info.value.errors()} == {"missing", "extra_forbidden"}
    with pytest.raises(ValidationError) as info:
        model.model_validate({"pos.x": 1, "schema": 2, "pos": {"x": 1}})
    assert error_locs(info.value) == [("pos",)]


# --- several open-length lists (Pathmind's one-hot lists) --------------------------------------


def open_model() -> type[BaseModel]:
    obs = specs(
        a={"type": "List[int]"}, n={"type": "float"}, b={"type": "List[int]", "min_items": 1}, c={"type": "List[bool]"}
    )
    return build_observation_model("Open", obs, resolve_widths(obs, 8), obs_dim=8)


def test_open_lists_of_any_lengths_that_fill_the_model_are_accepted() -> None:
    model = open_model()
    rows = [model(a=[1, 0, 0], n=0.5, b=[0, 1], c=[True, False]), model(a=[], n=1.0, b=[1, 0, 0, 0, 0, 0], c=[True])]
    np.testing.assert_array_equal(flatten(rows), [[1, 0, 0, 0.5, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0, 1]])


@pytest.mark.parametrize("a,b,c,total", [([1, 0], [1], [], 3), ([1, 0, 0, 0], [0, 1, 0], [True], 8)])
def test_open_lists_that_do_not_fill_the_model_are_refused_naming_them_and_both_numbers(
    a: list[int], b: list[int], c: list[bool], total: int
) -> None:
    with pytest.raises(ValidationError) as info:
        open_model()(a=a, n=0.0, b=b, c=c)
    [error] = info.value.errors()
    assert error["type"] == "observation_width" and error["loc"] == ()
    assert error["msg"] == (
        f"the open-length lists a ({len(a)}), b ({len(b)}), c ({len(c)}) hold {total} values; "
        "the model needs 7 from them (its input width 8 less 1 for the other observations)"
    )


def test_open_lists_keep_their_own_bounds_and_document_the_shared_width() -> None:
    model = open_model()
    with pytest.raises(ValidationError) as info:
        model(a=[1, 0, 0, 0, 0, 0, 0], n=0.0, b=[], c=[])
    assert error_locs(info.value) == [("b",)]
    props = model.model_json_schema()["properties"]
    assert props["a"]["maxItems"] == 7 and props["b"]["minItems"] == 1 and "7 values" in props["a"]["description"]
    example = sum(len(props[name]["examples"][0]) for name in "abc")
    assert example == 7  # the documented example is a valid request
