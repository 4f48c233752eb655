"""``generate.py import``: a schema from a Stable-Baselines3 file's spaces, or a check of a schema
against an SB3 or ONNX file, with the errors start-up would give."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from gymnasium import spaces

from policy_server.errors import SchemaError, summary
from policy_server.policies.served import resolve_policy
from policy_server.policies.torch_policy import TorchPolicy, model_format
from policy_server.schema.config import PolicySpec, load_schema


def action_space_doc(space: spaces.Space, squash: bool) -> dict[str, Any]:
    """The schema's ``action_space`` of a Gymnasium action space (a SAC box ``squash: tanh``)."""
    if isinstance(space, spaces.Discrete):
        return {"type": "discrete", "n": int(space.n)}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "tuple", "nvec": [int(n) for n in space.nvec.reshape(-1)]}
    if isinstance(space, spaces.MultiBinary):
        return {"type": "multi_binary", "n": int(np.prod(space.shape))}
    if isinstance(space, spaces.Box):
        doc: dict[str, Any] = {"type": "box", "shape": [int(np.prod(space.shape))],
                               "low": _bound(space.low), "high": _bound(space.high)}
        return doc | ({"squash": "tanh"} if squash else {})
    raise ValueError(f"action space {space} has no schema form")


def _bound(values: np.ndarray) -> float | list[float] | None:
    flat = [float(v) for v in values.reshape(-1)]
    if not all(np.isfinite(flat)):
        return None
    return flat[0] if len(set(flat)) == 1 else flat


def observation_doc(space: spaces.Space) -> dict[str, Any]:
    """The schema's observation part: ``observation_space`` (``schema.gym_spaces.describe_space``)
    once the schema serves it, else Pathmind ``observations`` (one float per column of a flat
    float ``Box``)."""
    if "observation_space" in PolicySpec.model_fields:
        from policy_server.schema.gym_spaces import describe_space

        return {"observation_space": describe_space(space)}
    if isinstance(space, spaces.Box) and len(space.shape) == 1 and np.issubdtype(space.dtype, np.floating):
        return {"observations": {f"obs_{i}": {"type": "float"} for i in range(space.shape[0])}}
    raise SchemaError(f"observation space {space}: only a flat float Box has a schema form on this server "
                      "(Pathmind observations) until it serves observation_space")


def schema_of(policy: TorchPolicy, model: Path, schema_dir: Path) -> dict[str, Any]:
    """A single-policy schema document that serves ``model`` (an SB3 file), written from its spaces."""
    if not hasattr(policy, "observation_space"):
        raise SchemaError(f"{model.name}: an {model.suffix} file holds no observation or action spaces; "
                          "write the schema yourself and check it with `import MODEL --schema schema.yaml`")
    squash = getattr(policy, "algorithm", None) == "SAC"
    space = action_space_doc(policy.action_space, squash)
    parameters = {"discrete": space["type"] != "box", "tuple": space["type"] == "tuple",
                  "model": os.path.relpath(model.resolve(), schema_dir.resolve()), "action_space": space}
    lstm = policy.lstm_shape() if hasattr(policy, "lstm_shape") else None
    if lstm is not None:
        parameters["recurrent"] = {"state": {"hidden": list(lstm), "cell": list(lstm)}}
    return observation_doc(policy.observation_space) | {"parameters": parameters}


def import_model(model: Path, out: Path | None = None, schema: Path | None = None,
                 policy: str | None = None) -> dict[str, Any]:
    """Read ``model`` (``.zip`` or ``.onnx``) with its own library; with ``schema``, check that
    schema's policy (``policy``, default: the default one) against it; else write a schema from
    the file's spaces to ``out`` (default: ``schema.yaml`` beside the model).

    Returns what start-up resolved (``ServedPolicy.describe``) and, when written, ``schema``.
    Raises SchemaError naming the field and both values where schema and file disagree, or the
    file does not load.
    """
    if model_format(model) not in ("sb3", "onnx"):
        raise SchemaError(f"{model}: import reads .zip (Stable-Baselines3) and .onnx files")
    if schema is not None:
        loaded = load_schema(schema)
        name = policy or loaded.default_policy or next(iter(loaded.policies))
        if name not in loaded.policies:
            raise SchemaError(f"policies.{name}: no such policy in {schema}; it has {sorted(loaded.policies)}")
        spec = loaded.policies[name].model_copy(update={"model": model.resolve()})
        return resolve_policy(spec)[0].describe()
    target = out or model.parent / "schema.yaml"
    try:
        policy_obj = TorchPolicy.from_file(model)
    except Exception as exc:
        raise SchemaError(f"{model}: cannot load: {summary(exc)}") from exc
    doc = schema_of(policy_obj, model, target.parent)
    target.write_text(yaml.safe_dump(doc, sort_keys=False))
    checked = load_schema(target).policies
    return resolve_policy(next(iter(checked.values())))[0].describe() | {"schema": str(target)}

