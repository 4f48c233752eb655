"""Shared field types (policy_server.fields): what they accept, refuse and document."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from policy_server.fields import EXACT_INT_MAX, FLOAT32_MAX, STRICT, ExactInt, Float32, StrictBool, Text


class Bounded(BaseModel):
    model_config = STRICT

    plain: Float32 = 0.0
    closed: Float32 = Field(0.5, ge=0, le=10)
    open_below: Float32 = Field(1.0, gt=0)


def test_float32_documents_its_range_unless_the_field_declares_a_tighter_bound() -> None:
    props = Bounded.model_json_schema()["properties"]
    assert (props["plain"]["minimum"], props["plain"]["maximum"]) == (-FLOAT32_MAX, FLOAT32_MAX)
    assert (props["closed"]["minimum"], props["closed"]["maximum"]) == (0, 10)
    assert props["open_below"]["exclusiveMinimum"] == 0 and "minimum" not in props["open_below"]
    assert props["open_below"]["maximum"] == FLOAT32_MAX


@pytest.mark.parametrize("value", [FLOAT32_MAX, -FLOAT32_MAX, 0, 1e38, -1e-45, 3])
def test_float32_accepts_what_a_float32_holds(value: float) -> None:
    assert TypeAdapter(Float32).validate_json(json.dumps(value)) == value
    assert np.isfinite(np.float32(value))


@pytest.mark.parametrize(
    "text", ["1e39", "-1e39", "3.4028236e38", repr(math.nextafter(FLOAT32_MAX, math.inf)), "1" + "0" * 400]
)
def test_float32_refuses_what_overflows_it_and_says_why(text: str) -> None:
    with pytest.raises(ValidationError, match="overflows float32"):
        TypeAdapter(Float32).validate_json(text)


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
