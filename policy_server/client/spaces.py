"""An environment's Gymnasium spaces against the server's policy: the check ``run_env`` makes before
its first step, observations in the JSON form of the policy's ``observation_space``, a model's input
rows for local inference, and actions in the form ``env.step`` takes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium.spaces as gs
import numpy as np

from policy_server.errors import SchemaError
from policy_server.schema.gym_spaces import describe_space, model_input, parse_space


class SpaceMismatch(ValueError):
    """An environment's observation or action space is not what the server's policy serves; the
    message names both."""


def served_observation_space(described: Mapping[str, Any]) -> gs.Space[Any] | None:
    """The policy's ``observation_space`` (from ``ActingClient.describe()``), None for a policy with
    Pathmind ``observations``."""
    raw = described.get("observation_space")
    return None if raw is None else parse_space(raw, "observation_space")


def check_spaces(described: Mapping[str, Any], observation_space: gs.Space[Any], action_space: gs.Space[Any]) -> None:
    """Whether an environment's spaces (one sub-environment's, for a vector environment) are the
    served policy's (``ActingClient.describe()``), before a step is taken.

    Observations: a policy with an ``observation_space`` needs an equal space (Gymnasium's ``==``:
    type, shape, dtype and bounds); one with Pathmind ``observations`` a Dict whose keys are the
    fields, or a Box that flattens to the policy's ``obs_dim``. Actions: ``discrete`` n is
    ``Discrete(n)``, ``tuple``/``multi_discrete`` nvec ``MultiDiscrete(nvec)``, ``multi_binary`` n a
    ``MultiBinary`` of n bits, ``box`` a Box of its shape whose bounds are the server's where the
    server's are finite. Raises SpaceMismatch naming both spaces.
    """
    policy = described.get("name", "default")
    served_obs = served_observation_space(described)
    if served_obs is not None:
        if served_obs != observation_space:
            raise SpaceMismatch(
                f"the environment's observation space {_yaml(observation_space)} is not policy {policy}'s "
                f"observation_space {described['observation_space']}")
    else:
        _check_pathmind_observations(described, observation_space, policy)
    served_action = dict(described["action_space"])
    if not _same_action_space(served_action, action_space):
        served_action.pop("names", None)
        raise SpaceMismatch(
            f"the environment's action space {action_space} is not policy {policy}'s action_space {served_action}")


def _check_pathmind_observations(described: Mapping[str, Any], space: gs.Space[Any], policy: str) -> None:
    fields = list(described.get("observations") or [])
    if isinstance(space, gs.Dict):
        if sorted(space.spaces) != sorted(fields):
            raise SpaceMismatch(f"the environment's observations have keys {sorted(space.spaces)}, policy "
                                f"{policy}'s observations are {fields}")
        return
    if not isinstance(space, gs.Box):  # a flat vector is sent as it is: only a Box's observations are one
        raise SpaceMismatch(f"the environment's observation space {space} is no Box, but policy {policy} has "
                            f"Pathmind observations {fields}; serve it with the environment's observation_space "
                            "(python generate.py schema --env ...)")
    width = gs.flatdim(space)
    if width != described["obs_dim"]:
        raise SpaceMismatch(f"the environment's observation space {space} flattens to {width} values, policy "
                            f"{policy} takes {described['obs_dim']} (observations {fields})")


def _same_action_space(served: Mapping[str, Any], space: gs.Space[Any]) -> bool:
    kind = served["type"]
    if kind == "discrete":
        return isinstance(space, gs.Discrete) and space.start == 0 and int(space.n) == served["n"]
    if kind in ("tuple", "multi_discrete"):
        return (isinstance(space, gs.MultiDiscrete) and not space.start.any()
                and space.nvec.tolist() == list(served["nvec"]))
    if kind == "multi_binary":
        return isinstance(space, gs.MultiBinary) and int(np.prod(space.shape)) == int(served["n"])
    if kind == "box":
        if not isinstance(space, gs.Box) or list(space.shape) != list(served["shape"]):
            return False
        low, high = (np.asarray(space.low, np.float64).ravel(), np.asarray(space.high, np.float64).ravel())
        return _bounds_agree(served.get("low"), low) and _bounds_agree(served.get("high"), high)
    return False


def _bounds_agree(served: Sequence[float | None] | None, env: np.ndarray) -> bool:
    """The server's finite bounds (None where unbounded) are the environment's."""
    if served is None:
        return True
    values = np.array([np.nan if v is None else v for v in served], dtype=np.float64)
    given = ~np.isnan(values)
    return bool(np.allclose(values[given], env[given], rtol=1e-6))


def _yaml(space: gs.Space[Any]) -> Any:
    """A space in the schema's YAML form when it has one, else Gymnasium's own text."""
    try:
        return describe_space(space)
    except SchemaError:
        return str(space)


def space_json(space: gs.Space[Any], obs: Any) -> Any:
    """An observation of ``space`` in its JSON form: nested lists of a Box's shape (integers for an
    integer dtype), an int for Discrete, lists for MultiBinary and MultiDiscrete, an object for Dict
    and a list for Tuple."""
    if isinstance(space, gs.Dict):
        return {str(key): space_json(sub, obs[key]) for key, sub in space.spaces.items()}
    if isinstance(space, gs.Tuple):
        return [space_json(sub, value) for sub, value in zip(space.spaces, obs, strict=True)]
    if isinstance(space, gs.Discrete):
        return int(obs)
    return np.asarray(obs, dtype=space.dtype).tolist()


def model_rows(space: gs.Space[Any], observations: Sequence[Any]) -> np.ndarray:
    """The model's input for observations of ``space`` (the server's model-input rule): a Box's
    observations stacked as they are, ``(B, *shape)`` of its dtype; any other space's flattened by
    ``gymnasium.spaces.flatten``, float32 ``(B, flatdim)``."""
    shape, dtype = model_input(space)
    if isinstance(space, gs.Box):
        return np.stack([np.asarray(obs, dtype=dtype).reshape(shape) for obs in observations])
    return np.stack([gs.flatten(space, obs) for obs in observations]).astype(np.float32)


def env_action(space: gs.Space[Any], action: Any) -> Any:
    """A JSON action (an int or a list) in the form ``space.step`` takes: an int for Discrete, an
    array of the space's shape and dtype for MultiDiscrete, MultiBinary and Box."""
    if isinstance(space, gs.Discrete):
        return int(action)
    if isinstance(space, (gs.MultiDiscrete, gs.MultiBinary, gs.Box)):
        return np.asarray(action, dtype=space.dtype).reshape(space.shape)
    return np.asarray(action) if isinstance(action, list) else action
