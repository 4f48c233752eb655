"""Gymnasium environments as schemas: ``generate.py schema --env`` writes what an environment's
spaces say (its ``observation_space`` and ``action_space``), so the server and the environment agree.

The spaces are Gymnasium's own; ``schema.gym_spaces.describe_space`` writes the observation space,
``action_space_entry`` the action space in the schema's ``action_space`` form.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import gymnasium as gym
import gymnasium.spaces as gs
import numpy as np

from policy_server.errors import SchemaError
from policy_server.schema.gym_spaces import describe_space

ACTION_SPACES = ("Discrete", "MultiDiscrete", "MultiBinary", "Box")
"""The Gymnasium action spaces a schema serves."""


def make_env(env: str, env_kwargs: dict[str, Any] | None = None) -> gym.Env[Any, Any]:
    """The environment ``env`` names, made with ``env_kwargs``.

    ``env`` is a registered id (``CartPole-v1``; ``ALE/...`` ids register ale-py's games first),
    ``module:EnvId`` (Gymnasium imports the module, which registers the id), or an entry point:
    ``module:attr`` or ``path/to/file.py:attr``, a class or a function that returns an environment.
    Raises SchemaError when nothing of that name can be made.
    """
    kwargs = dict(env_kwargs or {})
    module, _, attr = env.rpartition(":")
    try:
        if module and not _registered_after_import(module, attr):
            made = _entry_point(module, attr)(**kwargs)
        else:
            if env.startswith("ALE/"):
                import ale_py  # ale-py registers its games only when asked (Gymnasium 1.x has no plugins)

                gym.register_envs(ale_py)
            made = gym.make(env, **kwargs)
    except SchemaError:
        raise
    except Exception as exc:
        raise SchemaError(f"--env {env}: cannot make the environment: {type(exc).__name__}: {exc}") from exc
    if not isinstance(made, gym.Env):
        raise SchemaError(f"--env {env}: gave a {type(made).__name__}, not a gymnasium.Env")
    return made


def _registered_after_import(module: str, env_id: str) -> bool:
    """Whether ``module:env_id`` is Gymnasium's ``module:EnvId`` form: importing ``module``
    registers ``env_id``. A ``.py`` path is never a module name."""
    if module.endswith(".py"):
        return False
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise SchemaError(f"--env {module}:{env_id}: cannot import {module}: {exc}") from exc
    return env_id in gym.registry


def _entry_point(module: str, attr: str) -> Any:
    """The class or function ``attr`` of a module (dotted name) or a Python file."""
    if module.endswith(".py"):
        path = Path(module)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if not path.is_file() or spec is None or spec.loader is None:
            raise SchemaError(f"--env {module}:{attr}: no such Python file")
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
    else:
        loaded = importlib.import_module(module)
    if not hasattr(loaded, attr):
        raise SchemaError(f"--env {module}:{attr}: {module} has no {attr!r} and registers no environment {attr!r}")
    return getattr(loaded, attr)


def action_space_entry(space: gs.Space[Any]) -> dict[str, Any]:
    """The schema's ``action_space`` for a Gymnasium action space: Discrete → ``discrete``,
    MultiDiscrete → ``multi_discrete``, MultiBinary → ``multi_binary``, Box → ``box`` with its
    shape and bounds (one number when equal everywhere, omitted when infinite).

    Raises SchemaError for another space, or a Discrete/MultiDiscrete that does not start at 0 (the
    server answers indices from 0).
    """
    if isinstance(space, gs.Discrete):
        _starts_at_zero(space.start, space)
        return {"type": "discrete", "n": int(space.n)}
    if isinstance(space, gs.MultiDiscrete):
        _starts_at_zero(space.start, space)
        if space.nvec.ndim != 1:
            raise SchemaError(f"action space {space}: a MultiDiscrete of nvec shape {space.nvec.shape} has no "
                              "schema form; flatten its nvec")
        return {"type": "multi_discrete", "nvec": [int(n) for n in space.nvec]}
    if isinstance(space, gs.MultiBinary):
        return {"type": "multi_binary", "n": int(np.prod(space.shape))}
    if isinstance(space, gs.Box):
        entry: dict[str, Any] = {"type": "box", "shape": [int(d) for d in space.shape]}
        for key, bound in (("low", space.low), ("high", space.high)):
            if np.isfinite(bound).any():
                values = [float(v) for v in np.asarray(bound, dtype=np.float64).ravel()]
                entry[key] = values[0] if len(set(values)) == 1 else values
        return entry
    raise SchemaError(f"action space {type(space).__name__} cannot be served; the server serves "
                      f"{', '.join(ACTION_SPACES)}")


def _starts_at_zero(start: Any, space: gs.Space[Any]) -> None:
    if np.any(np.asarray(start) != 0):
        raise SchemaError(f"action space {space}: starts at {np.asarray(start).tolist()}, but the server's actions "
                          "count from 0; wrap the environment (gymnasium.wrappers.TransformAction) to shift them")


def env_schema(env: gym.Env[Any, Any], model: str | None = None, api_key: str | None = None) -> dict[str, Any]:
    """A single-policy schema for ``env``: its ``observation_space`` (``describe_space``) and
    ``parameters.action_space`` (``action_space_entry``); ``model`` (a path relative to the schema's
    folder; None: the one model file in ``models/``) and ``api_key`` when given.

    Raises SchemaError for a space the server cannot serve (Graph, Text, Sequence, OneOf, ...).
    """
    try:
        observation_space = describe_space(env.observation_space)
    except SchemaError as exc:
        raise SchemaError(f"observation space {env.observation_space}: {exc.message}") from None
    parameters: dict[str, Any] = {"action_space": action_space_entry(env.action_space)}
    if model is not None:
        parameters["model"] = model
    if api_key is not None:
        parameters["api_key"] = api_key
    return {"observation_space": observation_space, "parameters": parameters}
