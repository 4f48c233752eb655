"""Shared field types (policy_server.fields): what their JSON schema documents."""

from __future__ import annotations

from pydantic import BaseModel, Field

from policy_server.fields import FLOAT32_MAX, STRICT, Float32


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
