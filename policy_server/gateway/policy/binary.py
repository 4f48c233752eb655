"""Binary request bodies beside JSON: one NumPy ``.npy`` array, or a safetensors file.

An 84×84×4 image is 28,224 numbers: about 100 kB of JSON text that the gateway parses and checks
number by number, or 28 kB of ``.npy`` that NumPy reads without a copy. The acting routes
(``/predict``, ``/predict_deterministic``, ``/distribution`` and their ``/batch`` forms) and
``/train/experience`` also take:

- ``Content-Type: application/x-npy``: one array (``numpy.save``): one observation of the policy's
  input shape, or a batch ``(B, ...)`` on the batch routes;
- ``Content-Type: application/safetensors`` (``safetensors.numpy.save``): the observation as the
  tensor ``obs`` (a Dict space's entries as ``obs.<key>``, a Tuple's as ``obs.<i>``), and for
  ``/train/experience`` the JSON form's step fields, one row per step (``training.binary``).

Every tensor is checked as strictly as JSON is, at the model's precision, before it reaches a
model; an error is the 422 envelope naming the tensor (``body``: the ``.npy`` array, ``body.obs``,
``body.obs.image``, ``body.rewards``) and the problem:

- dtype: a Box's own, or one NumPy casts to it safely (``np.can_cast(..., "safe")``: uint8,
  int16 or float16 → float32 and bool → uint8 are taken; float64 → float32, int32/int64 → float32
  and any float → an integer dtype are refused: they would round). Discrete, MultiBinary and
  MultiDiscrete take any bool or integer dtype but uint64 (their values are range-checked before
  any cast);
- shape exact; floats finite; values within the space's bounds (Box ``low``/``high``, ``n``,
  ``nvec``, 0/1 for MultiBinary); a batch of 1 to the JSON form's limit of observations.

Nothing is unpickled: ``.npy`` headers are read with NumPy's header functions and object dtypes
refused; safetensors holds no code by design. A truncated body is a 422; a body over the server's
limit (``POLICY_SERVER_MAX_BODY_BYTES``) a 413 (``gateway.limits``). Answers stay JSON.
"""

from __future__ import annotations

import io
import json
from math import prod
from typing import Any

import gymnasium.spaces as gs
import numpy as np
import safetensors
import safetensors.numpy

from policy_server.errors import InvalidRequest
from policy_server.gateway.policy.masks import combine_masks
from policy_server.policies.served import ServedPolicy
from policy_server.schema.space_inputs import input_space

NPY = "application/x-npy"
SAFETENSORS = "application/safetensors"
BINARY_TYPES = (NPY, SAFETENSORS)

NUMERIC = "biuf"  # bool, signed and unsigned integers, floats


def media_type(content_type: str | None) -> str:
    """``application/x-npy`` of ``application/x-npy; charset=...`` (lower case, no parameters)."""
    return (content_type or "").split(";")[0].strip().lower()


# --- reading a body -----------------------------------------------------------------------------


def read_npy(body: bytes, field: str = "body") -> np.ndarray:
    """The one array of a ``.npy`` body (format 1.0 or 2.0), never unpickled.

    Our own reader over NumPy's header functions, not ``np.load``: ``np.load`` allocates what the
    header declares before it reads the data, so a 100-byte body could ask for terabytes. Raises
    InvalidRequest naming ``field``: not ``.npy``, a header that does not parse, a dtype that is
    not numeric (objects, strings, records), data shorter or longer than the header says.
    """
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]}; 1.0 and 2.0 are read")
    except (ValueError, TypeError, SyntaxError) as exc:
        raise InvalidRequest.at(field, f"not a .npy array: {exc}") from None
    if dtype.kind not in NUMERIC or dtype.hasobject:
        raise InvalidRequest.at(field, f"dtype {dtype} is not a number type; send bool, integers or floats")
    if any(d < 0 for d in shape):
        raise InvalidRequest.at(field, f"negative dimension in the header's shape {list(shape)}")
    offset, size = stream.tell(), prod(shape) * dtype.itemsize
    if len(body) - offset != size:
        raise InvalidRequest.at(
            field, f"the header declares shape {list(shape)} of {dtype} ({size} bytes of data) but "
            f"{len(body) - offset} bytes follow it: truncated or padded")
    flat = np.frombuffer(body, dtype=dtype, count=prod(shape), offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


def read_safetensors(body: bytes, field: str = "body") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors of a safetensors body and its ``__metadata__`` (text to text); InvalidRequest
    naming ``field`` when it is not a whole safetensors file or holds a dtype NumPy lacks (bf16)."""
    try:
        tensors = safetensors.numpy.load(body)
    except (safetensors.SafetensorError, ValueError, TypeError, KeyError) as exc:
        raise InvalidRequest.at(field, f"not a safetensors file: {exc}") from None
    # the library returns the metadata only from a file on disk (safe_open): the header is an
    # 8-byte length and JSON, which it has just checked
    header = json.loads(body[8:8 + int.from_bytes(body[:8], "little")])
    return tensors, header.get("__metadata__") or {}


# --- checking tensors against a space -----------------------------------------------------------


def _index(flat_index: int, shape: tuple[int, ...]) -> list[int]:
    return [int(i) for i in np.unravel_index(flat_index, shape)]


def _at(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _first(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def _dtype_of(space: gs.Space[Any]) -> np.dtype[Any]:
    return np.dtype(space.dtype if space.dtype is not None else np.float32)


def check_tensor(array: np.ndarray, space: gs.Space[Any], field: str, batch: int | None) -> np.ndarray:
    """``array`` checked against a leaf space (Box, Discrete, MultiBinary, MultiDiscrete), as a
    writable copy of the space's dtype, of shape ``(batch, *space.shape)`` (``space.shape`` when
    ``batch`` is None). Raises InvalidRequest naming ``field``: dtype, shape, a value not finite
    or outside the space (the first one, with its index)."""
    want = _dtype_of(space)
    if isinstance(space, gs.Box):
        if not np.can_cast(array.dtype, want, "safe"):
            raise InvalidRequest.at(field, f"dtype {array.dtype} does not cast to {want} without "
                                    f"rounding; send {want}")
    elif array.dtype.kind not in "biu" or array.dtype == np.uint64:
        raise InvalidRequest.at(field, f"dtype {array.dtype}: a {type(space).__name__} takes bool or integers "
                                f"(int64 at most); send {want}")
    shape = tuple(space.shape) if batch is None else (batch, *space.shape)
    if array.shape != shape:
        raise InvalidRequest.at(field, f"shape {list(array.shape)}, expected {list(shape)}")
    if isinstance(space, gs.Box):
        values = array.astype(want)
        if want.kind == "f" and not np.isfinite(values).all():
            i = _first(~np.isfinite(values))
            raise InvalidRequest.at(field, f"value {values.flat[i]} at {_index(i, shape)} is not finite")
        low, high = np.broadcast_to(space.low, shape), np.broadcast_to(space.high, shape)
    else:
        values = array.astype(np.int64)
        low, high = _integer_bounds(space, shape)
    outside = (values < low) | (values > high)
    if outside.any():
        i = _first(outside)
        raise InvalidRequest.at(
            field, f"value {values.flat[i]} at {_index(i, shape)} is outside the space's [{low.flat[i]}, {high.flat[i]}]")
    return values.astype(want, copy=False)


def _integer_bounds(space: gs.Space[Any], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(space, gs.Discrete):
        low, high = np.int64(space.start), np.int64(space.start + space.n - 1)
    elif isinstance(space, gs.MultiBinary):
        low, high = np.int64(0), np.int64(1)
    elif isinstance(space, gs.MultiDiscrete):
        low, high = space.start.astype(np.int64), (space.start + space.nvec - 1).astype(np.int64)
    else:
        raise TypeError(f"no binary form for a {type(space).__name__} observation")
    return np.broadcast_to(low, shape), np.broadcast_to(high, shape)


def leaves(space: gs.Space[Any], name: str = "obs") -> list[tuple[str, gs.Space[Any]]]:
    """The tensors an observation of ``space`` travels as, in Gymnasium's flattening order:
    ``[("obs", box)]``, ``[("obs.image", box), ("obs.speed", box)]`` (a Dict), ``obs.0`` (a Tuple)."""
    if isinstance(space, gs.Dict):
        return [leaf for key, sub in space.spaces.items() for leaf in leaves(sub, f"{name}.{key}")]
    if isinstance(space, gs.Tuple):
        return [leaf for i, sub in enumerate(space.spaces) for leaf in leaves(sub, f"{name}.{i}")]
    return [(name, space)]


def flatten_batch(space: gs.Space[Any], values: np.ndarray) -> np.ndarray:
    """``gymnasium.spaces.flatten`` of each of ``B`` checked values of a leaf space, as float32
    ``(B, flatdim)`` (Discrete and MultiDiscrete one-hot): the row-wise equivalent of
    ``np.stack([flatten(space, v) for v in values]).astype(np.float32)``, without the Python loop."""
    b = len(values)
    if isinstance(space, gs.Discrete):
        out = np.zeros((b, int(space.n)), dtype=np.float32)
        out[np.arange(b), values - space.start] = 1
        return out
    if isinstance(space, gs.MultiDiscrete):
        offsets = np.concatenate([[0], np.cumsum(space.nvec.ravel())[:-1]])
        out = np.zeros((b, int(space.nvec.sum())), dtype=np.float32)
        hot = offsets + (values - space.start).reshape(b, -1)
        out[np.arange(b)[:, None], hot] = 1
        return out
    return values.reshape(b, -1).astype(np.float32)


def model_input(
    tensors: dict[str, np.ndarray], space: gs.Space[Any], where: str, batched: bool, max_batch: int,
    name: str = "obs",
) -> np.ndarray:
    """The model input of an observation (``batched``: of a batch) sent as ``tensors``: a Box's
    values as they are, ``(B, *shape)`` of its dtype; any other space flattened, float32
    ``(B, flatdim)`` (``B`` = 1 for one observation). ``where`` prefixes each tensor's name in
    errors (``body`` → ``body.obs.image``). Raises InvalidRequest: a tensor missing, a batch size
    outside 1..``max_batch`` or unequal between tensors, or as ``check_tensor``."""
    parts = leaves(space, name)
    missing = [tensor for tensor, _ in parts if tensor not in tensors]
    if missing:
        raise InvalidRequest.at(_at(where, missing[0]), "missing: the observation's tensors are "
                                f"{', '.join(tensor for tensor, _ in parts)}")
    batch = None
    if batched:
        first, sub = parts[0]
        shape = tensors[first].shape
        batch = shape[0] if len(shape) == len(sub.shape) + 1 else 0
        if not 1 <= batch <= max_batch:
            raise InvalidRequest.at(_at(where, first), f"shape {list(shape)}: a batch is shape (B, "
                                    f"{', '.join(map(str, sub.shape))}) with B from 1 to {max_batch}")
    checked = [check_tensor(tensors[tensor], sub, _at(where, tensor), batch) for tensor, sub in parts]
    if batch is None:
        checked = [values[None] for values in checked]
    if isinstance(space, gs.Box):
        return checked[0]
    return np.concatenate([flatten_batch(sub, values) for (_, sub), values in zip(parts, checked)], axis=1)


def unknown_tensors(tensors: dict[str, Any], known: list[str], where: str) -> None:
    """InvalidRequest naming the first tensor (or metadata key) not in ``known``: like our JSON
    request models, a binary body may hold nothing the server would ignore."""
    extra = sorted(set(tensors) - set(known))
    if extra:
        raise InvalidRequest.at(f"{where}.{extra[0]}", f"unknown; expected {', '.join(known)}")


def observations(
    body: bytes, media: str, policy: ServedPolicy, batched: bool, max_batch: int
) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """The model input of a binary acting body (``media``: ``NPY`` or ``SAFETENSORS``), the action
    mask ``(B, k)`` bool (None: every action allowed) and where each row is in the body (``body.3``,
    ``body.obs.3``; ``body`` / ``body.obs`` for one observation).

    The mask: a Dict space's mask entry (tensor ``obs.<key>``, required as in JSON) and the optional
    tensor ``action_mask`` (``(k,)`` or ``(B, k)``, bool or 0/1 integers), an action allowed where
    both allow it. Raises InvalidRequest naming the tensor."""
    space = observation_space(policy)
    if media == NPY:
        if isinstance(space, (gs.Dict, gs.Tuple)):
            raise InvalidRequest.at("body", f"a {type(space).__name__} observation is several tensors: send "
                                    "application/safetensors with tensors obs.<key>")
        obs = model_input({"body": read_npy(body)}, space, "", batched, max_batch, name="body")
        field, mask = "body", None
    else:
        tensors, _ = read_safetensors(body)
        masks = mask_tensors(policy)
        unknown_tensors(tensors, [name for name, _ in leaves(space)] + list(masks), "body")
        obs = model_input(tensors, space, "body", batched, max_batch)
        field, mask = "body.obs", _mask(tensors, masks, policy, len(obs) if batched else None)
    return obs, mask, ([f"{field}.{i}" for i in range(len(obs))] if batched else [field])


def mask_tensors(policy: ServedPolicy) -> dict[str, gs.MultiBinary]:
    """The tensors that may carry a policy's action mask, and their spaces: a Dict space's mask
    entry ``obs.<key>`` and ``action_mask`` (none for an action space that takes no mask)."""
    width = policy.space.mask_width or None
    if width is None:
        return {}
    entry = {}
    if policy.obs_space is not None and policy.mask_key is not None:
        entry = {f"obs.{policy.mask_key}": policy.obs_space.spaces[policy.mask_key]}  # type: ignore[attr-defined]
    return entry | {"action_mask": gs.MultiBinary(width)}


def _mask(
    tensors: dict[str, np.ndarray], masks: dict[str, gs.MultiBinary], policy: ServedPolicy, batch: int | None
) -> np.ndarray | None:
    """The action mask ``(B, k)`` bool of the mask tensors sent (the Dict entry is required); one
    that allows no action is named as its tensor (``body.action_mask``; a batch's row
    ``body.action_mask.3``), as ``masks.combine_masks`` names it."""
    mask_key = policy.mask_key
    if mask_key is not None and f"obs.{mask_key}" in masks and f"obs.{mask_key}" not in tensors:
        raise InvalidRequest.at(f"body.obs.{mask_key}", "missing: the action mask entry of the observation")
    parts = [(check_tensor(tensors[name], sub, f"body.{name}", batch).reshape(batch or 1, -1).astype(bool),
              [f"body.{name}.{i}" for i in range(batch)] if batch is not None else [f"body.{name}"])
             for name, sub in masks.items() if name in tensors]
    return combine_masks(policy.space, parts)


def observation_space(policy: ServedPolicy) -> gs.Space[Any]:
    """The space a binary body's observation is checked against: the policy's ``observation_space``
    less the Dict entry that holds the action mask (``mask_tensors``); for Pathmind's observations, their float32 ``(obs_dim,)`` rows, unbounded (each value
    finite as float32)."""
    if policy.obs_space is not None:
        return input_space(policy.obs_space, policy.mask_key, "action_space.mask")
    return gs.Box(-np.inf, np.inf, (policy.obs_dim,), np.float32)


def observation_docs(policy: ServedPolicy, max_batch: int, batched: bool) -> tuple[str | None, str]:
    """What the OpenAPI document says of an acting route's ``.npy`` body (None: a Dict or Tuple
    space has none) and of its safetensors body."""
    space = observation_space(policy)
    lead = [f"B (1 to {max_batch})"] if batched else []
    what = "A batch of observations" if batched else "One observation"

    def tensor(sub: gs.Space[Any]) -> str:
        return f"{_dtype_of(sub)} of shape [{', '.join(map(str, [*lead, *sub.shape]))}]"

    parts = leaves(space)
    several = isinstance(space, (gs.Dict, gs.Tuple))
    npy = None if several else f"{what} as one NumPy .npy array (numpy.save, no pickles): {tensor(parts[0][1])}."
    tensors = "; ".join(f"`{name}`: {tensor(sub)}" for name, sub in parts)
    masks = "; ".join(f"`{name}`{'' if name.startswith('obs.') else ' (optional)'}: the action mask, bool "
                      f"(or 0/1) of shape [{', '.join(map(str, [*lead, *sub.shape]))}], true = allowed"
                      for name, sub in mask_tensors(policy).items())
    return npy, f"{what} as safetensors (safetensors.numpy.save): {tensors}{'; ' + masks if masks else ''}."
