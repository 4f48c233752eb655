"""Build the pydantic request models of a policy from its observations, and flatten them.

Field order is input order: ``flatten`` concatenates the fields in the order the schema lists
them, lists expanded in place and booleans as 0/1.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, create_model

from policy_server.schema.config import ObservationSpec

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

_SCALARS: dict[str, Any] = {"int": int, "float": FiniteFloat, "bool": bool}
_EXAMPLES: dict[str, Any] = {"int": 0, "float": 0.0, "bool": False}


def resolve_widths(
    observations: dict[str, ObservationSpec], model_width: int | None, where: str = "observations"
) -> dict[str, int]:
    """Width of each field; one list of open length takes the columns the model has left.

    Raises ValueError naming the field when the widths cannot be determined.
    """
    open_fields = [name for name, spec in observations.items() if spec.width is None]
    fixed = sum(spec.width or 0 for spec in observations.values())
    if len(open_fields) > 1:
        raise ValueError(
            f"{where}.{open_fields[1]}: more than one list without a fixed length "
            f"({', '.join(open_fields)}); set min_items = max_items on all but one"
        )
    widths = {name: spec.width or 0 for name, spec in observations.items()}
    if open_fields:
        name = open_fields[0]
        if model_width is None:
            raise ValueError(f"{where}.{name}: set min_items = max_items (length unknown)")
        widths[name] = model_width - fixed
        spec = observations[name]
        lo, hi = spec.min_items or 0, spec.max_items
        if not lo <= widths[name] <= (hi if hi is not None else widths[name]):
            raise ValueError(
                f"{where}.{name}: the model leaves {widths[name]} columns for this list, "
                f"outside min_items={spec.min_items} / max_items={spec.max_items}"
            )
    return widths


def _field(spec: ObservationSpec, width: int) -> tuple[Any, Any]:
    if not spec.is_list:
        return _SCALARS[spec.type], Field(description=spec.description, examples=[_EXAMPLES[spec.type]])
    item = _SCALARS[spec.type[5:-1]]
    example = [_EXAMPLES[spec.type[5:-1]]] * width
    return list[item], Field(
        min_length=width, max_length=width, description=spec.description, examples=[example]
    )


def build_observation_model(
    model_name: str, observations: dict[str, ObservationSpec], widths: dict[str, int]
) -> type[BaseModel]:
    """A pydantic model with one required field per observation; unknown fields are refused."""
    fields = {name: _field(spec, widths[name]) for name, spec in observations.items()}
    return create_model(  # type: ignore[call-overload]
        model_name, __config__=ConfigDict(extra="forbid"), **fields
    )


def flatten(observations: list[BaseModel], names: list[str]) -> np.ndarray:
    """Observations → float32 array ``(B, obs_dim)`` in schema order."""
    get = attrgetter(*names)
    rows = [get(obs) for obs in observations]
    if len(names) == 1:
        rows = [(value,) for value in rows]
    if any(isinstance(value, list) for value in rows[0]):
        rows = [list(chain.from_iterable(v if isinstance(v, list) else (v,) for v in row)) for row in rows]
    return np.asarray(rows, dtype=np.float32)
