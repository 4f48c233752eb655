"""Resolve a policy of the schema against its model file, once, at start-up.

Every disagreement between schema and model is a ``SchemaError`` that names the schema field and
both numbers, so a bad deployment never starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any

import gymnasium.spaces as gs
import numpy as np
from pydantic import BaseModel, Field, create_model

from policy_server.errors import SchemaError, summary
from policy_server.fields import StrictBool
from policy_server.policies.recurrent import StateLayout, StateShapeError, state_layout
from policy_server.policies.spaces import ActionSpace, make_action_space
from policy_server.policies.torch_policy import PolicyOutput, TorchPolicy
from policy_server.schema.config import DEFAULT_POLICY, PolicySpec, mask_field
from policy_server.schema.gym_spaces import model_input, parse_space
from policy_server.schema.observations import Widths, build_observation_model, resolve_widths
from policy_server.schema.space_inputs import input_space, mask_size


@dataclass(frozen=True)
class ServedPolicy:
    """A policy as resolved at start-up: its spec, action space sizes and model input.

    The model reads ``(B, *obs_shape)`` arrays of ``obs_dtype``; ``obs_dim`` is ``prod(obs_shape)``.
    A policy with an ``observation_space`` has ``obs_space`` (what requests carry) and ``mask_key``,
    the Dict key that holds its action mask (``action_space.mask``), left out of the model input.
    """

    spec: PolicySpec
    space: ActionSpace
    obs_dim: int
    observation_model: type[BaseModel] | None
    obs_shape: tuple[int, ...] = ()
    obs_dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype(np.float32))
    obs_space: gs.Space[Any] | None = None
    mask_key: str | None = None
    recurrent: StateLayout | None = None
    """A recurrent policy's state tensors (its model-input rows are ``[obs | packed state]``)."""
    mask_attribute: str | None = None
    """The observation model's attribute that holds the action mask (the schema's ``mask``
    observation, or a request's top-level ``action_mask``); not part of the model input."""

    @property
    def mask_name(self) -> str | None:
        """The request field that carries the action mask: the schema's ``mask`` observation or
        ``action_mask``; None when the action space takes no mask."""
        return (mask_field(self.spec.action_space) or "action_mask") if self.space.mask_width else None

    def __post_init__(self) -> None:
        if not self.obs_shape:  # Pathmind's observations: a flat float32 vector
            object.__setattr__(self, "obs_shape", (self.obs_dim,))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def field_names(self) -> list[str]:
        return list(self.spec.observations or {})

    @property
    def model_prefix(self) -> str:
        return model_prefix(self.spec.name)

    def describe(self) -> dict[str, Any]:
        described = {"obs_dim": self.obs_dim, "action_space": self.space.describe(), "observations": self.field_names}
        if self.obs_space is not None:
            described |= {"obs_shape": list(self.obs_shape), "obs_dtype": self.obs_dtype.name}
        return described if self.recurrent is None else described | {"state": self.recurrent.describe()}


def _where(spec: PolicySpec) -> str:
    return "parameters" if spec.name == DEFAULT_POLICY else f"policies.{spec.name}"


def resolve_policy(spec: PolicySpec) -> tuple[ServedPolicy, TorchPolicy]:
    """Load the model, check it against the schema, build the observation model."""
    where = _where(spec)
    layout = state_layout(spec.recurrent)
    try:
        policy = TorchPolicy.from_file(spec.model, state=layout)
    except Exception as exc:
        raise SchemaError(f"{where}.model: cannot load {spec.model}: {summary(exc)}") from exc
    policy.check_spec(spec, where)
    if spec.observation_space is not None:
        if layout is not None:
            raise SchemaError(f"{where}.recurrent: a recurrent policy takes Pathmind `observations` (flat float "
                              "rows); an `observation_space` policy is served feed-forward")
        return _resolve_space_policy(spec, policy), policy
    model_width = policy.input_width()
    obs_where = "observations" if spec.name == DEFAULT_POLICY else f"policies.{spec.name}.observations"
    widths: Widths = {}
    mask = mask_field(spec.action_space)
    inputs = {name: o for name, o in (spec.observations or {}).items() if name != mask}  # the mask is no input
    if inputs:
        try:
            widths = resolve_widths(inputs, model_width, obs_where)
        except ValueError as exc:
            raise SchemaError(str(exc)) from exc
        if None in widths.values():  # several open lists share the columns the model leaves
            assert model_width is not None  # resolve_widths refuses them otherwise
            obs_dim = model_width
        else:
            obs_dim = sum(width for width in widths.values() if width is not None)
        if model_width is not None and model_width != obs_dim and policy.exact_width():
            raise SchemaError(
                f"{obs_where}: the observation widths sum to {obs_dim} but the model "
                f"{spec.model.name} takes inputs of width {model_width}"
            )
    elif model_width is None:
        raise SchemaError(f"{obs_where}: not given, and the input width of {spec.model.name} cannot be read")
    else:
        obs_dim = model_width
    if layout is not None:
        out = probe_recurrent(policy, layout, obs_dim, where, spec.model.name)
    else:
        out = probe(policy, obs_dim, model_width, obs_where, spec.model.name)
    try:
        heads = out.heads[:len(out.heads) - len(layout.shapes)] if layout is not None else out.heads
        space = make_action_space(spec.action_space, heads, f"{where}.action_space")
    except ValueError as exc:
        raise SchemaError(str(exc)) from exc
    model, attribute = None, None
    if spec.observations:
        model, attribute = _observation_model(spec, space, widths, obs_dim)
    return ServedPolicy(spec, space, obs_dim, model, recurrent=layout, mask_attribute=attribute), policy


def _observation_model(
    spec: PolicySpec, space: ActionSpace, widths: Widths, obs_dim: int
) -> tuple[type[BaseModel], str | None]:
    """The request model of a policy's observations, and the attribute that holds its action mask:
    the schema's ``mask`` observation (of the space's mask width), or else, for a space that takes
    masks, an optional top-level ``action_mask``."""
    assert spec.observations is not None
    name, mask = f"{model_prefix(spec.name)}Observation", mask_field(spec.action_space)
    if mask is not None:
        given = spec.observations[mask].width
        if given not in (None, space.mask_width):
            raise SchemaError(f"{_where(spec)}.action_space.mask: the observation {mask!r} holds {given} values; "
                              f"the action space has {space.mask_width} actions")
        widths = {n: space.mask_width if n == mask else widths[n] for n in spec.observations}
        model = build_observation_model(name, spec.observations, widths, obs_dim + space.mask_width)
        return model, next(a for a, f in model.model_fields.items() if f.alias == mask)
    model = build_observation_model(name, spec.observations, widths, obs_dim)
    if not space.mask_width or "action_mask" in spec.observations:
        return model, None
    width = space.mask_width
    masked = create_model(  # type: ignore[call-overload]
        name, __base__=model, __doc__=model.__doc__,
        action_mask=(list[StrictBool] | None, Field(
            None, min_length=width, max_length=width,
            description=f"Optional: the legal actions, {width} booleans (true = allowed); a masked action "
                        "gets probability 0.")),
    )
    return masked, "action_mask"


def probe(policy: TorchPolicy, obs_dim: int, model_width: int | None, obs_where: str, name: str) -> PolicyOutput:
    """A feed-forward policy's outputs for two zero rows; SchemaError when it rejects them."""
    try:
        return policy.forward(np.zeros((2, obs_dim), dtype=np.float32))
    except Exception as exc:
        hint = f" (its first layer takes inputs of width {model_width})" if model_width not in (None, obs_dim) else ""
        raise SchemaError(
            f"{obs_where}: the observation widths sum to {obs_dim} but the model "
            f"{name} rejects inputs of that width{hint}: {summary(exc)}"
        ) from exc


def probe_recurrent(policy: TorchPolicy, layout: StateLayout, obs_dim: int, where: str, name: str) -> PolicyOutput:
    """A recurrent policy's outputs for two zero rows and a zero state: the model must take
    ``(obs, *state)`` and return ``(*heads, *new_state)`` of the schema's shapes, or a SchemaError
    names ``recurrent.state`` (and the tensor and both shapes where they differ)."""
    args = ", ".join(f"{name} (2, {', '.join(map(str, shape))})" for name, shape in layout.shapes.items())
    try:
        return policy.forward(np.zeros((2, obs_dim + layout.width), dtype=np.float32))
    except StateShapeError as exc:
        field = f"{where}.{exc}" if str(exc).startswith("recurrent.") else f"{where}.recurrent.state: {exc}"
        raise SchemaError(field) from exc
    except Exception as exc:
        raise SchemaError(
            f"{where}.recurrent.state: the model {name} rejects (obs (2, {obs_dim}), {args}): "
            f"{summary(exc)}; a recurrent model takes (obs, *state) and returns (*heads, *new_state)"
        ) from exc


def _resolve_space_policy(spec: PolicySpec, policy: TorchPolicy) -> ServedPolicy:
    """A policy with an ``observation_space``: probe the model with a zero batch of its input."""
    where = _where(spec)
    space_where = "observation_space" if spec.name == DEFAULT_POLICY else f"{where}.observation_space"
    assert spec.observation_space is not None
    obs_space = parse_space(spec.observation_space, space_where)
    mask_key = getattr(spec.action_space, "mask", None)  # a key of the action spec from issue 15's masks
    dict_mask = mask_key if isinstance(obs_space, gs.Dict) and mask_key in obs_space.spaces else None
    if mask_key is not None and dict_mask is None:
        input_space(obs_space, mask_key, f"{where}.action_space.mask")  # raises, naming the field
    shape, dtype = model_input(input_space(obs_space, dict_mask, f"{where}.action_space.mask"))
    try:
        out = policy.forward(np.zeros((2, *shape), dtype=dtype))
    except Exception as exc:
        raise SchemaError(
            f"{space_where}: the model {spec.model.name} rejects inputs of shape (B, {', '.join(map(str, shape))}) "
            f"{dtype} (the model input of this space): {summary(exc)}"
        ) from exc
    try:
        space = make_action_space(spec.action_space, out.heads, f"{where}.action_space")
    except ValueError as exc:
        raise SchemaError(str(exc)) from exc
    width, needed = mask_size(obs_space, dict_mask), space.mask_width or None
    if width is not None and width != needed:
        raise SchemaError(f"{space_where}.spaces.{dict_mask}: the action mask has {width} values but the "
                          f"action space takes {needed if needed is not None else 'no mask'}")
    return ServedPolicy(spec, space, prod(shape), None, shape, dtype, obs_space, dict_mask)


def resolve_candidate(served: ServedPolicy) -> TorchPolicy | None:
    """Load the policy's candidate (``canary.model``) and check it against the stable model: the
    same input width and action space, or a SchemaError naming ``<policy>.canary.model``. None when
    the policy has no candidate."""
    canary = served.spec.canary
    if canary is None:
        return None
    field = f"{_where(served.spec)}.canary.model"
    try:
        candidate, model = resolve_policy(served.spec.model_copy(update={"model": canary.model, "canary": None}))
    except SchemaError as exc:
        raise SchemaError(f"{field}: {canary.model.name}: {exc.message}") from exc
    if (candidate.obs_shape, candidate.obs_dtype) != (served.obs_shape, served.obs_dtype):
        def shown(p: ServedPolicy) -> str:
            return f"width {p.obs_dim}" if p.spec.observation_space is None else f"{list(p.obs_shape)} {p.obs_dtype}"

        raise SchemaError(
            f"{field}: {canary.model.name} takes inputs of {shown(candidate)}, "
            f"the policy's model {served.spec.model.name} {shown(served)}")
    if candidate.space.describe() != served.space.describe():
        raise SchemaError(
            f"{field}: {canary.model.name} acts in {candidate.space.describe()}, "
            f"the policy's model {served.spec.model.name} in {served.space.describe()}")
    return model


def model_prefix(name: str) -> str:
    """What the names of a policy's generated request models start with: nothing for the policy of
    a single-policy schema, else its name in CamelCase (``cart-pole`` → ``CartPole``)."""
    if name == DEFAULT_POLICY:
        return ""
    return "".join(part.capitalize() for part in name.replace("-", "_").split("_"))
