"""Gymnasium spaces written as YAML, both ways: ``parse_space`` and ``describe_space``.

The YAML form of each space (``observation_space:`` in schema.yaml)::

    {type: box, shape: [84, 84, 4], dtype: uint8, low: 0, high: 255}
    {type: discrete, n: 5}                    # start: 0 by default
    {type: multi_binary, n: 4}                # n: an int or a shape list
    {type: multi_discrete, nvec: [3, 2]}      # start: zeros by default
    {type: dict, spaces: {image: {...}, speed: {...}}}
    {type: tuple, spaces: [{...}, {...}]}

A Box's ``dtype`` is float32 unless given; ``low`` / ``high`` are a number or nested lists that
broadcast to ``shape`` (NumPy's rule: ``[0, 0, 0]`` gives per-channel bounds of an image); an
omitted bound is unbounded for a float dtype and the dtype's range for an integer one. A Dict's
keys are sorted, as Gymnasium sorts them (its flattening order).

The spaces are Gymnasium's own (``gymnasium.spaces``): we only read and write their YAML form.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod
from typing import Annotated, Any, Literal

import gymnasium.spaces as gs
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from policy_server.errors import SchemaError

BOX_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16", "float32", "float64")
"""The dtypes a Box may name (``dtype:``)."""

SPACE_TYPES = ("box", "discrete", "multi_binary", "multi_discrete", "dict", "tuple")

_Size = Annotated[int, Field(gt=0)]


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Box(_Node):
    type: Literal["box"]
    shape: list[Annotated[int, Field(ge=0)]]
    dtype: str = "float32"
    low: Any = None
    high: Any = None


class _Discrete(_Node):
    type: Literal["discrete"]
    n: _Size
    start: int = 0


class _MultiBinary(_Node):
    type: Literal["multi_binary"]
    n: Any  # an int or a shape list: checked by ``_multi_binary`` (a pydantic union names both members)


class _MultiDiscrete(_Node):
    type: Literal["multi_discrete"]
    nvec: list[_Size] = Field(min_length=1)
    start: list[int] | None = None


class _Dict(_Node):
    type: Literal["dict"]
    spaces: dict[str, Any] = Field(min_length=1)


class _Tuple(_Node):
    type: Literal["tuple"]
    spaces: list[Any] = Field(min_length=1)


def parse_space(raw: Any, where: str) -> gs.Space[Any]:
    """The Gymnasium space that the YAML mapping ``raw`` describes.

    ``where`` is the field's location in schema.yaml (``policies.pong.observation_space``); every
    error names the location of the bad value below it. Raises SchemaError.
    """
    if not isinstance(raw, dict):
        raise SchemaError(f"{where}: a space is a mapping with a `type` ({', '.join(SPACE_TYPES)}), not {raw!r}")
    kind = raw.get("type")
    if kind not in _PARSERS:
        raise SchemaError(f"{where}.type: unknown space type {kind!r}; expected one of {', '.join(SPACE_TYPES)}")
    node_model, build = _PARSERS[kind]
    try:
        node = node_model.model_validate(raw)
    except ValidationError as exc:
        raise SchemaError("; ".join(_error_line(where, err) for err in exc.errors())) from None
    return build(node, where)


def describe_space(space: gs.Space[Any]) -> dict[str, Any]:
    """The YAML form of a Gymnasium space (``parse_space`` reads it back to an equal space).

    Defaults are left out (Box dtype float32, unbounded or full-range bounds, ``start`` 0), a bound
    equal everywhere is one number, float32 bounds are their shortest decimal. Raises SchemaError
    for a space type the schema cannot write (Text, Graph, Sequence, OneOf).
    """
    if isinstance(space, gs.Box):
        return _describe_box(space)
    if isinstance(space, gs.Discrete):
        return {"type": "discrete", "n": int(space.n)} | ({"start": int(space.start)} if space.start else {})
    if isinstance(space, gs.MultiBinary):
        n = space.n
        return {"type": "multi_binary", "n": int(n) if np.ndim(n) == 0 else [int(d) for d in n]}
    if isinstance(space, gs.MultiDiscrete):
        if space.nvec.ndim != 1:
            raise SchemaError(f"a MultiDiscrete of nvec shape {space.nvec.shape} has no schema form; flatten its nvec")
        starts = {"start": space.start.tolist()} if space.start.any() else {}
        return {"type": "multi_discrete", "nvec": space.nvec.tolist()} | starts
    if isinstance(space, gs.Dict):
        return {"type": "dict", "spaces": {str(key): describe_space(sub) for key, sub in space.spaces.items()}}
    if isinstance(space, gs.Tuple):
        return {"type": "tuple", "spaces": [describe_space(sub) for sub in space.spaces]}
    raise SchemaError(f"{type(space).__name__} spaces have no schema form; use one of {', '.join(SPACE_TYPES)}")


def model_input(space: gs.Space[Any]) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The model's input per row for observations of ``space``: a Box as it is (its shape and
    dtype); any other space flattened by ``gymnasium.spaces.flatten``, float32 ``(flatdim,)``."""
    if isinstance(space, gs.Box):
        return tuple(space.shape), np.dtype(space.dtype)
    return (int(gs.flatdim(space)),), np.dtype(np.float32)


def model_input_width(space: gs.Space[Any]) -> int:
    """Values per row of the model input (``prod`` of ``model_input``'s shape)."""
    return prod(model_input(space)[0])


# --- one parser per type ---------------------------------------------------------------------


def _box(node: _Box, where: str) -> gs.Box:
    if node.dtype not in BOX_DTYPES:
        raise SchemaError(f"{where}.dtype: unknown dtype {node.dtype!r}; expected one of {', '.join(BOX_DTYPES)}")
    dtype = np.dtype(node.dtype)
    shape = tuple(node.shape)
    default_low, default_high = default_bounds(dtype)
    if dtype.kind == "f":
        info = np.finfo(dtype)
        lo_limit, hi_limit = float(info.min), float(info.max)
    else:
        lo_limit, hi_limit = default_low, default_high
    low = _bound(node.low, default_low, shape, dtype, (lo_limit, hi_limit), f"{where}.low")
    high = _bound(node.high, default_high, shape, dtype, (lo_limit, hi_limit), f"{where}.high")
    bad = np.argwhere(low > high)
    if bad.size:
        index = tuple(int(i) for i in bad[0])
        raise SchemaError(f"{where}.low: {low[index].item()} > high {high[index].item()} at index {list(index)}")
    return gs.Box(low=low, high=high, shape=shape, dtype=dtype)


def default_bounds(dtype: np.dtype[Any]) -> tuple[float, float]:
    """A Box's bounds where the schema gives none: unbounded for a float dtype, the dtype's range
    (as Python ints) for an integer one."""
    if dtype.kind == "f":
        return -np.inf, np.inf
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _bound(
    value: Any, default: float, shape: tuple[int, ...], dtype: np.dtype[Any], limits: tuple[float, float], where: str
) -> np.ndarray:
    """One Box bound as an array of ``shape`` and ``dtype``, checked against the dtype's range."""
    if value is None:
        return np.full(shape, default, dtype=dtype)
    try:
        array = np.asarray(_nulls_as(value, default))
    except ValueError:  # ragged nested lists
        raise SchemaError(f"{where}: nested lists of unequal lengths; give a number or lists of shape {list(shape)}") from None
    if array.dtype.kind not in "iuf" or array.dtype == np.bool_:
        raise SchemaError(f"{where}: bounds are numbers (or nested lists of them), not {value!r}")
    if np.isnan(array).any():
        raise SchemaError(f"{where}: NaN is no bound")
    integral = dtype.kind != "f"
    if integral and array.dtype.kind == "f" and not np.all(np.isfinite(array) & (array == np.round(array))):
        raise SchemaError(f"{where}: a Box of dtype {dtype} has integer bounds, not {value!r}")
    finite = array[np.isfinite(array)]
    lo, hi = limits
    if finite.size and (finite.min() < lo or finite.max() > hi):
        raise SchemaError(f"{where}: {value!r} is outside the range of {dtype} [{lo:g}, {hi:g}]")
    try:
        broadcast = np.broadcast_to(array, shape)
    except ValueError:
        raise SchemaError(
            f"{where}: shape {list(array.shape)} does not broadcast to the Box's shape {list(shape)}"
        ) from None
    return broadcast.astype(dtype)


def _nulls_as(value: Any, default: float) -> Any:
    """``value`` with each null (JSON's form of an infinite bound, as ``GET /schema`` writes it)
    replaced by ``default``: unbounded for a float Box, the dtype's limit for an integer one."""
    if value is None:
        return default
    if isinstance(value, list):
        return [_nulls_as(v, default) for v in value]
    return value


def _discrete(node: _Discrete, where: str) -> gs.Discrete:
    return gs.Discrete(node.n, start=node.start)


def _multi_binary(node: _MultiBinary, where: str) -> gs.MultiBinary:
    shape = node.n if isinstance(node.n, list) and node.n else [node.n]
    if not all(type(d) is int and d > 0 for d in shape):
        raise SchemaError(f"{where}.n: a positive integer or a list of them (a shape), not {node.n!r}")
    return gs.MultiBinary(node.n)


def _multi_discrete(node: _MultiDiscrete, where: str) -> gs.MultiDiscrete:
    if node.start is not None and len(node.start) != len(node.nvec):
        raise SchemaError(f"{where}.start: {len(node.start)} entries but nvec has {len(node.nvec)}")
    return gs.MultiDiscrete(node.nvec, start=node.start)


def _dict(node: _Dict, where: str) -> gs.Dict:
    return gs.Dict({key: parse_space(sub, f"{where}.spaces.{key}") for key, sub in node.spaces.items()})


def _tuple(node: _Tuple, where: str) -> gs.Tuple:
    return gs.Tuple([parse_space(sub, f"{where}.spaces.{i}") for i, sub in enumerate(node.spaces)])


_PARSERS: dict[str, tuple[type[_Node], Callable[[Any, str], gs.Space[Any]]]] = {
    "box": (_Box, _box),
    "discrete": (_Discrete, _discrete),
    "multi_binary": (_MultiBinary, _multi_binary),
    "multi_discrete": (_MultiDiscrete, _multi_discrete),
    "dict": (_Dict, _dict),
    "tuple": (_Tuple, _tuple),
}


def _error_line(where: str, err: Any) -> str:
    loc = ".".join([where, *(str(p) for p in err["loc"])])
    return f"{loc}: {'unknown key' if err['type'] == 'extra_forbidden' else err['msg']}"


# --- describing a Box ------------------------------------------------------------------------


def _describe_box(space: gs.Box) -> dict[str, Any]:
    dtype = np.dtype(space.dtype)
    if dtype.name not in BOX_DTYPES:
        raise SchemaError(f"a Box of dtype {dtype} has no schema form; use one of {', '.join(BOX_DTYPES)}")
    described: dict[str, Any] = {"type": "box", "shape": [int(d) for d in space.shape]}
    if dtype != np.float32:
        described["dtype"] = dtype.name
    defaults = default_bounds(dtype)
    for key, bound, default in (("low", space.low, defaults[0]), ("high", space.high, defaults[1])):
        if not np.all(bound == default):
            described[key] = _bound_value(bound, dtype)
    return described


def _bound_value(bound: np.ndarray, dtype: np.dtype[Any]) -> Any:
    """One number when the bound is equal everywhere, else nested lists; float32 and float16
    values as their shortest decimal (0.1, not 0.10000000149011612)."""
    to_python: Callable[[Any], Any] = int if dtype.kind != "f" else (
        float if dtype == np.float64 else lambda x: float(str(x))
    )
    if bound.size and np.all(bound == bound.flat[0]):
        return to_python(bound.flat[0])
    return _nested(bound, to_python)


def _nested(array: np.ndarray, to_python: Callable[[Any], Any]) -> Any:
    if array.ndim == 0:
        return to_python(array[()])
    return [_nested(row, to_python) for row in array]
