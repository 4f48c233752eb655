"""Build the pydantic request models of a policy from its observations, and flatten them.

Field order is input order: ``flatten`` concatenates the fields in the order the schema lists
them, lists expanded in place and booleans as 0/1. Every value is checked at the precision the
model reads it in (float32): floats finite as float32, integers within ±2**24, JSON types taken
strictly (``fields``).

A schema name is any text (``pos.x``, ``schema``, ``größe``, ``_id``): it is the field's alias, the
key JSON carries and the OpenAPI document shows. The Python attribute behind it is the name itself
where that is a plain identifier no ``BaseModel`` attribute shadows, else ``field_<position>``.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable
from functools import cache
from itertools import chain
from operator import attrgetter
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from policy_server.fields import STRICT, ExactInt, Float32, StrictBool
from policy_server.schema.config import ObservationSpec

_ITEMS: dict[str, Any] = {"int": ExactInt, "float": Float32, "bool": StrictBool}
_EXAMPLES: dict[str, Any] = {"int": 0, "float": 0.0, "bool": False}
_CONFIG = ConfigDict(**STRICT, validate_by_alias=True, validate_by_name=False)

Widths = dict[str, int | None]
"""Input columns of each observation; None for one of several open-length lists, whose lengths
are checked per request (together they fill the columns the other observations leave)."""


def resolve_widths(
    observations: dict[str, ObservationSpec], model_width: int | None, where: str = "observations"
) -> Widths:
    """Width of each field: one list of open length takes the columns the model has left; several
    share them, request by request (None).

    Raises ValueError naming the field when the widths cannot fit the model.
    """
    open_fields = [name for name, spec in observations.items() if spec.width is None]
    widths: Widths = {name: spec.width for name, spec in observations.items()}
    if not open_fields:
        return widths
    if model_width is None:
        raise ValueError(
            f"{where}.{open_fields[0]}: set min_items = max_items (length unknown: the model's input "
            "width cannot be read)"
        )
    left = model_width - sum(spec.width or 0 for spec in observations.values())
    specs = [observations[name] for name in open_fields]
    lo = sum(spec.min_items or 0 for spec in specs)
    hi = None if any(spec.max_items is None for spec in specs) else sum(spec.max_items or 0 for spec in specs)
    if not lo <= left <= (left if hi is None else hi):
        if len(specs) == 1:
            bounds = f"this list, outside min_items={specs[0].min_items} / max_items={specs[0].max_items}"
        else:
            bounds = f"the lists {', '.join(open_fields)}, whose min_items/max_items sum to {lo} / {hi}"
        raise ValueError(f"{where}.{open_fields[0]}: the model leaves {left} columns for {bounds}")
    if len(open_fields) == 1:
        widths[open_fields[0]] = left
    return widths


def _attribute_names(names: list[str]) -> list[str]:
    """The Python attribute of each field (see the module docstring); never two alike."""
    plain = {
        name for name in names
        if name.isidentifier() and not keyword.iskeyword(name) and not name.startswith(("_", "model_"))
        and not hasattr(BaseModel, name)
    }
    taken: set[str] = set()
    attributes = []
    for i, name in enumerate(names):
        attribute = name if name in plain else f"field_{i}"
        while attribute in taken or (attribute != name and attribute in plain):
            attribute += "_"
        taken.add(attribute)
        attributes.append(attribute)
    return attributes


def _open_example_widths(observations: dict[str, ObservationSpec], widths: Widths, left: int) -> dict[str, int]:
    """Lengths of the open lists in the documented example, adding up to ``left``: each at its
    min_items, the rest spread evenly over the lists with room."""
    lengths = {name: observations[name].min_items or 0 for name, width in widths.items() if width is None}
    rest = left - sum(lengths.values())
    for i, name in enumerate(lengths):
        share = -(-rest // (len(lengths) - i))  # ceil
        hi = observations[name].max_items
        extra = share if hi is None else min(share, hi - lengths[name])
        lengths[name] += extra
        rest -= extra
    return lengths


def _field(name: str, spec: ObservationSpec, width: int | None, left: int, example_width: int) -> tuple[Any, FieldInfo]:
    kind = spec.type.removeprefix("List[").removesuffix("]")
    if not spec.is_list:
        return _ITEMS[kind], Field(alias=name, description=spec.description, examples=[_EXAMPLES[kind]])
    description = spec.description
    if width is None:  # one of several open lists: its own bounds, never more than the columns left
        lo, hi = spec.min_items or 0, left if spec.max_items is None else min(spec.max_items, left)
        shared = f"Open length: the open-length lists together hold {left} values."
        description = f"{description} {shared}" if description else shared
    else:
        lo = hi = example_width = width
    return list[_ITEMS[kind]], Field(  # type: ignore[valid-type]
        alias=name, min_length=lo, max_length=hi, description=description,
        examples=[[_EXAMPLES[kind]] * example_width],
    )


def _check_open_widths(open_fields: dict[str, str], left: int, obs_dim: int) -> Callable[[BaseModel], BaseModel]:
    """The model validator of a schema with several open lists: their lengths fill ``left`` columns."""

    why = f"its input width {obs_dim} less {obs_dim - left} for the other observations" if left < obs_dim else "its input width"

    def check(obs: BaseModel) -> BaseModel:
        lengths = {name: len(getattr(obs, attribute)) for attribute, name in open_fields.items()}
        if sum(lengths.values()) != left:
            raise PydanticCustomError(
                "observation_width",
                "the open-length lists {lists} hold {total} values; the model needs {left} from them ({why})",
                {
                    "lists": ", ".join(f"{name} ({n})" for name, n in lengths.items()),
                    "total": sum(lengths.values()), "left": left, "why": why,
                },
            )
        return obs

    return check


def build_observation_model(
    model_name: str, observations: dict[str, ObservationSpec], widths: Widths, obs_dim: int | None = None
) -> type[BaseModel]:
    """A pydantic model with one required field per observation, keyed by the schema's names;
    unknown fields are refused. ``obs_dim`` (the model's input width) is needed when several lists
    are open (``widths`` None)."""
    fixed = sum(width for width in widths.values() if width is not None)
    left = (obs_dim if obs_dim is not None else fixed) - fixed
    examples = _open_example_widths(observations, widths, left)
    attributes = _attribute_names(list(observations))
    fields = {
        attribute: _field(name, spec, widths[name], left, examples.get(name, 0))
        for attribute, (name, spec) in zip(attributes, observations.items(), strict=True)
    }
    open_fields = {attribute: name for attribute, name in zip(attributes, observations) if widths[name] is None}
    validators = {}
    if open_fields:
        if obs_dim is None:
            raise ValueError(f"{model_name}: several open-length lists need the model's input width")
        validators["check_open_widths"] = model_validator(mode="after")(_check_open_widths(open_fields, left, obs_dim))
    return create_model(  # type: ignore[call-overload]
        model_name, __config__=_CONFIG, __validators__=validators, **fields
    )


@cache
def _reader(model: type[BaseModel], exclude: str | None) -> tuple[Callable[[BaseModel], Any], int]:
    names = [name for name in model.model_fields if name != exclude]
    return attrgetter(*names), len(names)


def flatten(
    observations: list[BaseModel], model: type[BaseModel] | None = None, exclude: str | None = None
) -> np.ndarray:
    """Observations of one generated model → float32 array ``(B, obs_dim)`` in schema order;
    ``model``: read only its fields (of observations of a model derived from it); ``exclude``: the
    attribute that is no model input (the action mask, ``ServedPolicy.mask_attribute``)."""
    get, n_fields = _reader(model or type(observations[0]), exclude)
    rows = [get(obs) for obs in observations]
    if n_fields == 1:
        rows = [(value,) for value in rows]
    if any(isinstance(value, list) for value in rows[0]):
        rows = [list(chain.from_iterable(v if isinstance(v, list) else (v,) for v in row)) for row in rows]
    return np.asarray(rows, dtype=np.float32)
