"""Field types of our request models: numbers at the precision the models compute in, text that a
tokenizer can read, and JSON types taken strictly.

A JSON number such as ``1e39`` is a finite 64-bit float but overflows the float32 tensors every
model here uses; an integer such as ``10**400`` does not fit a float at all. Both are refused with
a 422 that names the field before they reach a tensor. JSON strings are refused where a number or a
boolean is expected, and numbers where a boolean is expected (``strict``); an integer is still a
valid float. The OpenAI-compatible models keep OpenAI's leniency and use only ``Float32`` and
``Text``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, Strict, ValidationError

from policy_server.errors import FieldError

FLOAT32_MAX = float.fromhex("0x1.fffffep+127")  # numpy.finfo(numpy.float32).max
FLOAT32_LIMIT = float.fromhex("0x1.ffffffp+127")  # half-way to 2**128: from here on, float32 rounds to inf
EXACT_INT_MAX = 2**24  # float32 holds every integer in [-2**24, 2**24] exactly

STRICT = ConfigDict(extra="forbid", strict=True)
"""The config of our own request models: unknown fields refused, JSON types taken strictly."""


def check_float32(value: float) -> float:
    """``value`` itself when a float32 holds it (rounds to a finite float32: |value| < FLOAT32_LIMIT);
    raises ValueError otherwise."""
    if not abs(value) < FLOAT32_LIMIT:
        raise ValueError(float32_message(value))
    return value


def float32_message(value: object) -> str:
    text = repr(value)
    shown = text if len(text) <= 24 else f"an integer of {len(text.lstrip('-'))} digits"
    return f"{shown} overflows float32 (largest magnitude {FLOAT32_MAX:.8g}): the model computes in float32"


def check_exact_int(value: int) -> int:
    """``value`` itself when float32 holds it exactly (|value| ≤ 2**24); raises ValueError otherwise."""
    if not -EXACT_INT_MAX <= value <= EXACT_INT_MAX:
        shown = str(value) if abs(value) < 10**20 else f"an integer of {len(str(abs(value)))} digits"
        raise ValueError(
            f"{shown} is outside [-{EXACT_INT_MAX}, {EXACT_INT_MAX}] (±2**24): the model reads its "
            "input as float32, which holds integers exactly only in that range"
        )
    return value


def check_text(value: str) -> str:
    """``value`` itself when it is valid Unicode; raises ValueError at a lone UTF-16 surrogate
    (``"\\ud800"`` is valid JSON but no tokenizer can encode it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"not valid Unicode: a lone surrogate {value[exc.start]!r} at position {exc.start}"
        ) from None
    return value


def _float32_bounds(schema: dict[str, Any]) -> None:
    """Document the float32 bound on each side where the field declares none of its own."""
    if "minimum" not in schema and "exclusiveMinimum" not in schema:
        schema["exclusiveMinimum"] = -FLOAT32_LIMIT
    if "maximum" not in schema and "exclusiveMaximum" not in schema:
        schema["exclusiveMaximum"] = FLOAT32_LIMIT


# A Python check, not Field(gt=..., lt=...): a field's own bounds (Field(gt=0)) would replace those
# of its type. It costs about 0.2 µs per number.
Float32 = Annotated[
    float,
    Strict(),
    Field(allow_inf_nan=False, json_schema_extra=_float32_bounds),
    AfterValidator(check_float32),
]
"""A JSON number (integer or not, never a string or boolean) that is finite as a float32."""

def integral(value: object) -> object:
    """``5.0`` → ``5``; anything else as it is. JSON has one number type, and JSON Schema's
    ``integer`` is any number with no fractional part, so a client (or a generator of clients)
    may send ``5.0`` for an integer."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


ExactInt = Annotated[
    int,
    Strict(),
    BeforeValidator(integral),
    Field(json_schema_extra={"minimum": -EXACT_INT_MAX, "maximum": EXACT_INT_MAX}),
    AfterValidator(check_exact_int),
]
"""A JSON integer (``5`` or ``5.0``, never a string or boolean) that a float32 input column holds
exactly (|x| ≤ 2**24)."""

StrictBool = Annotated[bool, Strict()]
"""A JSON boolean; 0, 1, "yes" and "off" are refused."""

Text = Annotated[str, AfterValidator(check_text)]
"""A string a tokenizer can encode (valid Unicode)."""


def error_message(err: Any) -> str:
    """The message of one pydantic error (``ErrorDetails``), in the words of the type that failed:
    a JSON integer too large for any float overflows float32 too, not just "a valid number"."""
    value = err.get("input")
    if err["type"] in ("float_type", "finite_number") and isinstance(value, int) and not isinstance(value, bool):
        return float32_message(value)  # strict floats take ints; this one does not fit a float
    return str(err["msg"])


def field_errors(exc: ValidationError, where: str, unknown: str = "unknown field") -> list[FieldError]:
    """pydantic's errors of a value validated by hand (not as a request body), named from ``where``
    on, e.g. ``body.dataset.3.value_target``; ``unknown`` is the message for a field the model lacks."""
    return [
        FieldError(
            ".".join([where, *map(str, err["loc"])]),
            unknown if err["type"] == "extra_forbidden" else error_message(err),
        )
        for err in exc.errors()
    ]


__all__ = [
    "EXACT_INT_MAX",
    "FLOAT32_LIMIT",
    "FLOAT32_MAX",
    "STRICT",
    "ExactInt",
    "Float32",
    "StrictBool",
    "Text",
    "check_exact_int",
    "check_float32",
    "check_text",
    "error_message",
    "field_errors",
    "integral",
]
