"""The public schema's observations → form field specs; form values → a request body.

A list field is entered either as one number per item (short lists) or as one text of
comma-separated numbers (``parse_list``), checked against the list's fixed length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["int", "float", "bool", "List[int]", "List[float]"]
ITEMS_WIDGET_MAX = 8  # lists up to this length get one number input per item, longer ones a text


class FormError(ValueError):
    """A form value the server would refuse; the message names the field."""


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: Kind
    length: int | None = None  # lists: the fixed length; None while unknown
    description: str | None = None

    @property
    def is_list(self) -> bool:
        return self.kind.startswith("List")

    @property
    def item_kind(self) -> Literal["int", "float", "bool"]:
        return self.kind[5:-1] if self.is_list else self.kind  # type: ignore[return-value]

    @property
    def per_item(self) -> bool:
        """Whether the form shows one number input per item (else a comma-separated text)."""
        return self.is_list and self.length is not None and self.length <= ITEMS_WIDGET_MAX

    @property
    def label(self) -> str:
        if not self.is_list:
            return self.name
        return f"{self.name} ({self.item_kind} × {self.length if self.length is not None else '?'})"

    def default(self) -> Any:
        zero: Any = {"int": 0, "float": 0.0, "bool": False}[self.item_kind]
        if not self.is_list:
            return zero
        return [zero] * (self.length or 0) if self.per_item else ", ".join(str(zero) for _ in range(self.length or 0))


def field_specs(observations: dict[str, dict[str, Any]] | None, obs_dim: int | None = None) -> list[FieldSpec]:
    """One spec per observation, in schema order (the model's input order).

    ``observations`` is a policy's ``observations`` of ``GET /schema``; ``obs_dim`` (from ``GET /``)
    gives the one list of open length the columns the others leave.
    """
    if not observations:
        return []
    specs: list[FieldSpec] = []
    for name, obs in observations.items():
        kind = obs["type"]
        lo, hi = obs.get("min_items"), obs.get("max_items")
        length = lo if kind.startswith("List") and lo is not None and lo == hi else None
        specs.append(FieldSpec(name, kind, length, obs.get("description")))
    open_lists = [s for s in specs if s.is_list and s.length is None]
    if obs_dim is not None and len(open_lists) == 1:
        fixed = sum(1 if not s.is_list else (s.length or 0) for s in specs)
        specs = [
            FieldSpec(s.name, s.kind, obs_dim - fixed, s.description) if s is open_lists[0] else s for s in specs
        ]
    return specs


def parse_list(text: str, spec: FieldSpec) -> list[int] | list[float]:
    """``"1, 2.5, 3"`` → numbers of the spec's item type, checked against its length."""
    parts = [p for p in text.replace(";", ",").replace("\n", ",").split(",") if p.strip()]
    values = [_number(p.strip(), spec, i) for i, p in enumerate(parts)]
    if spec.length is not None and len(values) != spec.length:
        raise FormError(f"{spec.name}: {len(values)} values given, it takes exactly {spec.length}")
    if not values:
        raise FormError(f"{spec.name}: give at least one value")
    return values  # type: ignore[return-value]


def _number(text: str, spec: FieldSpec, index: int) -> int | float:
    where = f"{spec.name}[{index}]" if spec.is_list else spec.name
    try:
        value = float(text)
    except ValueError:
        raise FormError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise FormError(f"{where}: {text!r} is not a finite number")
    if spec.item_kind == "int":
        if not value.is_integer():
            raise FormError(f"{where}: {text!r} is not a whole number")
        return int(value)
    return value


def coerce(spec: FieldSpec, value: Any) -> Any:
    """One form value → its JSON value (ints as ints, booleans as booleans, lists checked)."""
    if spec.kind == "bool":
        return bool(value)
    if spec.is_list:
        if isinstance(value, str):
            return parse_list(value, spec)
        values = [_number(str(v), spec, i) for i, v in enumerate(value)]
        if spec.length is not None and len(values) != spec.length:
            raise FormError(f"{spec.name}: {len(values)} values given, it takes exactly {spec.length}")
        return values
    return _number(str(value), spec, 0)


def request_body(specs: list[FieldSpec], values: dict[str, Any]) -> dict[str, Any]:
    """The observation object for ``/predict``; raises FormError naming every bad field."""
    body, errors = {}, []
    for spec in specs:
        if spec.name not in values:
            errors.append(f"{spec.name}: missing")
            continue
        try:
            body[spec.name] = coerce(spec, values[spec.name])
        except FormError as exc:
            errors.append(str(exc))
    if errors:
        raise FormError("; ".join(errors))
    return body
