"""Observation request models built from the schema, and their flattening into model input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import BaseModel, ValidationError

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


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_float_is_refused(model: type[BaseModel], bad: float) -> None:
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
    out = flatten([model(**valid()), model(**second)], list(observations))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(
        out,
        np.array(
            [[7, 1.5, -2.0, 1, 0.25, 4, 5, 6], [-1, 0.0, 3.0, 0, 0.25, 0, 1, 2]], dtype=np.float32
        ),
    )


def test_flatten_uses_the_names_order_not_the_payload_order(model: type[BaseModel]) -> None:
    payload = dict(reversed(list(valid().items())))
    out = flatten([model(**payload)], ["id", "position", "free", "speed", "counts"])
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
    out = flatten([model(**values)], LPOC_NAMES)
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


def test_two_open_lists_are_refused() -> None:
    obs = specs(a={"type": "List[float]"}, b={"type": "int"}, c={"type": "List[int]", "min_items": 1})
    with pytest.raises(ValueError, match=r"observations\.c: more than one list .*\(a, c\)"):
        resolve_widths(obs, 10)


def test_open_list_without_a_model_width_is_refused() -> None:
    obs = specs(a={"type": "int"}, b={"type": "List[float]"})
    with pytest.raises(ValueError, match=r"observations\.b: set min_items = max_items"):
        resolve_widths(obs, None)
