"""Shared field types (policy_server.fields): what they accept, refuse and document."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from policy_server.fields import (
    EXACT_INT_MAX,
    FLOAT32_LIMIT,
    FLOAT32_MAX,
    STRICT,
    ExactInt,
    Float32,
    StrictBool,
    Text,
    error_message,
)


class Bounded(BaseModel):
    model_config = STRICT

    plain: Float32 = 0.0
    closed: Float32 = Field(0.5, ge=0, le=10)
    open_below: Float32 = Field(1.0, gt=0)


def test_float32_documents_its_range_unless_the_field_declares_a_tighter_bound() -> None:
    props = Bounded.model_json_schema()["properties"]
    plain = props["plain"]
    assert (plain["exclusiveMinimum"], plain["exclusiveMaximum"]) == (-FLOAT32_LIMIT, FLOAT32_LIMIT)
    assert (props["closed"]["minimum"], props["closed"]["maximum"]) == (0, 10)
    assert "exclusiveMinimum" not in props["closed"] and "exclusiveMaximum" not in props["closed"]
    assert props["open_below"]["exclusiveMinimum"] == 0 and "minimum" not in props["open_below"]
    assert props["open_below"]["exclusiveMaximum"] == FLOAT32_LIMIT


def test_the_documented_float32_bound_is_where_float32_starts_rounding_to_inf() -> None:
    below = math.nextafter(FLOAT32_LIMIT, 0)
    assert struct.unpack("<f", struct.pack("<f", below))[0] == FLOAT32_MAX
    with pytest.raises(OverflowError):
        struct.pack("<f", FLOAT32_LIMIT)


@pytest.mark.parametrize("value", [FLOAT32_MAX, -FLOAT32_MAX, 3.4028235e38, 0, 1e38, -1e-45, 3])
def test_float32_accepts_what_a_float32_holds(value: float) -> None:
    assert TypeAdapter(Float32).validate_json(json.dumps(value)) == value
    assert np.isfinite(np.float32(value))


@pytest.mark.parametrize(
    "text", ["1e39", "-1e39", "3.4028236e38", repr(FLOAT32_LIMIT), "1" + "0" * 400, "-" + "9" * 400]
)
def test_float32_refuses_what_overflows_it_and_says_why(text: str) -> None:
    for value in (text, json.loads(text)):  # as pydantic parses JSON, and as FastAPI hands it over
        with pytest.raises(ValidationError) as info:
            TypeAdapter(Float32).validate_json(value) if isinstance(value, str) else TypeAdapter(Float32).validate_python(value)
        assert "overflows float32" in error_message(info.value.errors()[0])


@pytest.mark.parametrize("text", ["true", '"1.5"', "NaN", "Infinity", "null"])
def test_float32_takes_json_numbers_only(text: str) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(Float32).validate_json(text)


@pytest.mark.parametrize("text", ["16777217", "-16777217", "1" + "0" * 400, "true", '"5"', "2.5"])
def test_exact_int_refuses_what_float32_cannot_hold_exactly_or_is_no_integer(text: str) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(ExactInt).validate_json(text)
    assert TypeAdapter(ExactInt).validate_json(str(EXACT_INT_MAX)) == float(np.float32(EXACT_INT_MAX))


@pytest.mark.parametrize("text", ["1", "0", '"yes"', '"off"', '"true"'])
def test_strict_bool_takes_json_booleans_only(text: str) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(StrictBool).validate_json(text)


def test_text_refuses_a_lone_surrogate_and_says_where() -> None:
    with pytest.raises(ValidationError, match="lone surrogate .* at position 2"):
        TypeAdapter(Text).validate_python(json.loads('"ab\\ud800c"'))
    assert TypeAdapter(Text).validate_python("a \U0001f600 pair") == "a \U0001f600 pair"


def test_a_fields_own_bounds_still_hold() -> None:
    with pytest.raises(ValidationError):
        Bounded(open_below=-1.0)
    with pytest.raises(ValidationError):
        Bounded(closed=11.0)
