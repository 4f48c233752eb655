"""A served policy's spaces as Gymnasium spaces, written beside its log (``<policy>.spaces.json``).

The file holds Minari's own serialisation of the spaces (``minari.serialization``), so that an
export needs neither the schema nor the model: ``observation_space`` (the policy's, or a Box of
its model input), ``action_space``, and ``model_input`` (the logged rows' shape and dtype).
"""

from __future__ import annotations

from typing import Any

import gymnasium.spaces as gs
import numpy as np
from minari.serialization import deserialize_space, serialize_space

from policy_server.policies.served import ServedPolicy
from policy_server.policies.spaces import ActionSpace
from policy_server.schema.gym_spaces import default_bounds


def action_space(space: ActionSpace) -> gs.Space[Any]:
    """The Gymnasium form of a served action space (from its ``describe()``); raises ValueError
    for a kind that has none here."""
    d = space.describe()
    kind = d["type"]
    if kind == "discrete":
        return gs.Discrete(d["n"])
    if kind in ("tuple", "multi_discrete"):
        return gs.MultiDiscrete(d["nvec"])
    if kind == "multi_binary":
        return gs.MultiBinary(d["n"])
    if kind == "box":
        low = np.array([-np.inf if v is None else v for v in d["low"]], dtype=np.float32)
        high = np.array([np.inf if v is None else v for v in d["high"]], dtype=np.float32)
        return gs.Box(low.reshape(d["shape"]), high.reshape(d["shape"]), dtype=np.float32)
    raise ValueError(f"no Gymnasium form for the action space {kind!r}")


def model_input_box(shape: tuple[int, ...], dtype: np.dtype[Any]) -> gs.Box:
    """The model input as a Box: unbounded for floats, the dtype's range for integers."""
    low, high = default_bounds(np.dtype(dtype))
    return gs.Box(low, high, shape, dtype)


def spaces_doc(policy: ServedPolicy) -> dict[str, Any]:
    """What ``<policy>.spaces.json`` holds (raises ValueError as ``action_space``)."""
    # obs_shape / obs_dtype / obs_space / mask_key arrive with Gymnasium observation spaces (issue
    # 15); a Pathmind policy's model input is float32 (obs_dim,)
    shape = tuple(getattr(policy, "obs_shape", None) or (policy.obs_dim,))
    dtype = np.dtype(getattr(policy, "obs_dtype", np.float32))
    observation = getattr(policy, "obs_space", None)
    mask_key = getattr(policy, "mask_key", None)
    if isinstance(observation, gs.Dict) and mask_key is not None:  # the mask is not part of the model input
        observation = gs.Dict({k: v for k, v in observation.spaces.items() if k != mask_key})
    observation = observation or model_input_box(shape, dtype)
    return {
        "policy": policy.name,
        "observation_space": serialize_space(observation, to_string=False),
        "action_space": serialize_space(action_space(policy.space), to_string=False),
        "model_input": {"shape": list(shape), "dtype": dtype.str},
    }


def read_spaces(doc: dict[str, Any]) -> tuple[gs.Space[Any], gs.Space[Any], tuple[int, ...]]:
    """The observation space, action space and model-input shape of a ``spaces_doc``."""
    return (deserialize_space(doc["observation_space"]), deserialize_space(doc["action_space"]),
            tuple(doc["model_input"]["shape"]))
