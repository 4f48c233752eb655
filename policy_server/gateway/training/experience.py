"""Experience on the wire, and its conversion into a validated ``ExperienceBatch``.

Clients send episode fragments (T+1 observations, T actions and rewards: nothing sent twice) or
single steps (each with its next observation). Observations come raw (a flat list) or in the
schema's own form. Every field is checked before anything reaches a trainer: one bad value and
the whole request is refused with a 422 that names it.
"""

from __future__ import annotations

import dataclasses
from copy import copy
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    WithJsonSchema,
    create_model,
    model_validator,
)

from policy_server.errors import FieldError, InvalidRequest
from policy_server.fields import STRICT, ExactInt, Float32, StrictBool, field_errors
from policy_server.gateway.policy.masks import forbidden_fields
from policy_server.policies.served import ServedPolicy
from policy_server.policies.spaces import BoxSpace, DiscreteSpace, TupleSpace
from policy_server.schema.observations import flatten
from policy_server.schema.space_inputs import json_schema, read_batch, read_one
from policy_server.training.experience import ExperienceBatch

CLIENT_ID_PATTERN = r"^[A-Za-z0-9_.:-]+$"
ModelVersion = Annotated[int, Field(ge=0, le=np.iinfo(np.int64).max)]
ActingVariant = Literal["stable", "canary"] | None
RequestRef = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}(/[0-9]{1,9})?$")]
REQUEST_IDS_DOC = ("The `X-Request-ID` of the answer that chose each action (`<id>/<row>` for row `row` of a batch "
                   "answer): a policy with an `experience_log` joins these rewards to its logged decisions by them.")
VARIANT_DOC = ("The `variant` of the answers that chose the actions (`stable` or `canary`); with it, a policy "
               "with a candidate version counts episode returns per version (`GET .../versions`).")


def _form(value: Any) -> str | None:
    # the JSON type picks the form, so a bad value gets one error (its form's), not one per form
    return "raw" if isinstance(value, list) else "named" if isinstance(value, dict) else None


def observation_type(width: int | None = None) -> Any:
    """An observation: raw (a flat list of ``width`` numbers) or in the schema's own form (an object,
    checked against the policy's observation model in ``to_batch``). Errors in a raw one carry
    ``raw`` in their location (``observations.3.raw.1``): pydantic names the form it checked."""
    raw = list[Float32] if width is None else Annotated[list[Float32], Field(min_length=width, max_length=width)]
    return Annotated[
        Annotated[raw, Tag("raw")] | Annotated[dict[str, Any], Tag("named")],
        Discriminator(_form, custom_error_type="observation_form",
                      custom_error_message="an observation is a list of numbers or an object of the schema's fields"),
    ]


def _kind(value: Any) -> str | None:
    if isinstance(value, list):
        return "vector"
    if isinstance(value, float) and value.is_integer():  # 2.0 is JSON Schema's integer 2
        return "index"
    return "index" if isinstance(value, int) and not isinstance(value, bool) else None


ActionValue = Annotated[
    Annotated[ExactInt, Tag("index")] | Annotated[list[Float32], Tag("vector")],
    Discriminator(_kind, custom_error_type="action_form",
                  custom_error_message="an action is an integer index or a list of numbers"),
]


class _Wire(BaseModel):
    model_config = STRICT


class Fragment(_Wire):
    """Consecutive steps of one episode, acted by one model version."""

    model_version: ModelVersion = Field(description="The model version that chose these actions.")
    observations: list[observation_type()] = Field(  # type: ignore[valid-type]
        min_length=2, description="T+1 observations: the last is the one after the last step."
    )
    actions: list[ActionValue] = Field(min_length=1, description="T actions.")
    rewards: list[Float32] = Field(min_length=1, description="T rewards.")
    log_probs: list[Float32] | None = Field(
        None, description="T log-probabilities of the actions under the acting model (PPO needs them)."
    )
    action_masks: list[list[StrictBool]] | None = Field(
        None, description="The legal actions (true = allowed) at each observation: T+1 masks (or T: the last "
        "observation's allows every action). Named observations may carry theirs instead (the schema's "
        "`mask` field, or `action_mask`). PPO and DQN train with the masks."
    )
    terminated: StrictBool = Field(False, description="The last step ended the episode in a terminal state.")
    truncated: StrictBool = Field(False, description="The last step ended the episode by a limit (bootstraps).")
    variant: ActingVariant = Field(None, description=VARIANT_DOC)
    request_ids: list[RequestRef] | None = Field(None, description=f"T request ids. {REQUEST_IDS_DOC}")

    @model_validator(mode="after")
    def _lengths(self) -> Fragment:
        t = len(self.actions)
        if len(self.observations) != t + 1 or len(self.rewards) != t:
            raise ValueError(
                f"a fragment of {t} actions needs {t + 1} observations and {t} rewards; "
                f"got {len(self.observations)} and {len(self.rewards)}"
            )
        if self.log_probs is not None and len(self.log_probs) != t:
            raise ValueError(f"log_probs has {len(self.log_probs)} entries for {t} actions")
        if self.action_masks is not None and len(self.action_masks) not in (t, t + 1):
            raise ValueError(f"action_masks has {len(self.action_masks)} entries for {t + 1} observations")
        if self.request_ids is not None and len(self.request_ids) != t:
            raise ValueError(f"request_ids has {len(self.request_ids)} entries for {t} actions")
        return self


class Step(_Wire):
    """One transition."""

    obs: observation_type()  # type: ignore[valid-type]
    action: ActionValue
    reward: Float32
    next_obs: observation_type()  # type: ignore[valid-type]
    terminated: StrictBool = False
    truncated: StrictBool = False
    log_prob: Float32 | None = None
    action_mask: list[StrictBool] | None = Field(None, description="The legal actions at `obs` (true = allowed).")
    next_action_mask: list[StrictBool] | None = Field(None, description="The legal actions at `next_obs`.")
    model_version: ModelVersion
    variant: ActingVariant = Field(None, description=VARIANT_DOC)
    request_id: RequestRef | None = Field(None, description=REQUEST_IDS_DOC)


class ExperienceRequest(_Wire):
    client_id: str = Field(min_length=1, max_length=128, pattern=CLIENT_ID_PATTERN)
    fragments: list[Fragment] = Field(default_factory=list)
    steps: list[Step] = Field(default_factory=list)

    @model_validator(mode="after")
    def _not_empty(self) -> ExperienceRequest:
        if not self.fragments and not self.steps:
            raise ValueError("send at least one fragment or step")
        return self

    @property
    def rows(self) -> int:
        return sum(len(f.actions) for f in self.fragments) + len(self.steps)

    @property
    def refs(self) -> list[str | None]:
        """Each row's request id (``request_ids``, ``request_id``), in ``to_batch``'s row order."""
        refs: list[str | None] = [r for f in self.fragments for r in (f.request_ids or [None] * len(f.actions))]
        return refs + [s.request_id for s in self.steps]


def row_width(policy: ServedPolicy) -> int:
    """Values of an experience row: the observation's, and a recurrent policy's state behind it
    (``obs``: the state the step started from; ``next_obs``: the state after it)."""
    return policy.obs_dim + (policy.recurrent.width if policy.recurrent is not None else 0)


def experience_model(policy: ServedPolicy) -> type[ExperienceRequest]:
    """``{prefix}ExperienceRequest``: ``ExperienceRequest`` whose raw observations declare the
    policy's input width, so that its OpenAPI document says how many values they take."""
    prefix = policy.model_prefix
    obs = (observation_type(row_width(policy)) if policy.obs_space is None
           else Annotated[Any, WithJsonSchema(json_schema(policy.obs_space))])
    fragment = create_model(
        f"{prefix}Fragment", __base__=Fragment, __doc__=Fragment.__doc__,
        observations=(list[obs], copy(Fragment.model_fields["observations"])),  # type: ignore[valid-type]
    )
    step = create_model(f"{prefix}Step", __base__=Step, __doc__=Step.__doc__, obs=(obs, ...), next_obs=(obs, ...))
    return create_model(  # type: ignore[no-any-return]
        f"{prefix}ExperienceRequest", __base__=ExperienceRequest,
        fragments=(list[fragment], Field(default_factory=list)),  # type: ignore[valid-type]
        steps=(list[step], Field(default_factory=list)),  # type: ignore[valid-type]
    )


def to_batch(request: ExperienceRequest, policy: ServedPolicy, max_rows: int) -> ExperienceBatch:
    """Validate every observation and action against the policy; raise InvalidRequest naming them."""
    if request.rows > max_rows:
        raise InvalidRequest.at("body", f"{request.rows} steps in one request; at most {max_rows}")
    errors: list[FieldError] = []
    parts = [_fragment(f, f"body.fragments.{i}", policy, errors) for i, f in enumerate(request.fragments)]
    if request.steps:
        parts.append(_steps(request.steps, policy, errors))
    if errors:
        raise InvalidRequest(f"invalid experience: {errors[0].field}: {errors[0].message}", errors[:20])
    return dataclasses.replace(ExperienceBatch.concat(parts), client_id=request.client_id)  # type: ignore[arg-type]


def _fragment(f: Fragment, where: str, policy: ServedPolicy, errors: list[FieldError]) -> ExperienceBatch | None:
    named: list[list[bool] | None] = []
    obs = _observations(f.observations, f"{where}.observations", policy, errors, named)
    actions = to_actions(f.actions, f"{where}.actions", policy, errors)
    given = f.action_masks
    rows = given + [None] * (len(f.observations) - len(given)) if given is not None else named  # type: ignore[operator]
    at = f"{where}.action_masks.*" if given is not None else f"{where}.observations.*.{policy.mask_name}"
    masks = _masks(rows, at, policy, errors, acted=len(f.actions))
    errors.extend(forbidden_fields(policy.space, masks, actions, [f"{where}.actions.{i}" for i in range(len(f.actions))],
                                   [at.replace("*", str(i)) for i in range(len(f.actions))]))
    if obs is None or actions is None or (masks is None and any(r is not None for r in rows)):
        return None
    t = len(f.actions)
    last = np.zeros(t, dtype=bool)
    last[-1] = True
    log_probs = np.asarray(f.log_probs if f.log_probs is not None else [np.nan] * t, dtype=np.float32)
    return ExperienceBatch(
        obs=obs[:-1],
        next_obs=obs[1:],
        actions=actions,
        rewards=np.asarray(f.rewards, dtype=np.float32),
        terminated=last & f.terminated,
        truncated=last & (f.truncated and not f.terminated),
        segment_end=last,
        log_probs=log_probs,
        versions=np.full(t, f.model_version, dtype=np.int64),
        masks=None if masks is None else masks[:-1],
        next_masks=None if masks is None else masks[1:],
    )


def next_is_following(obs: np.ndarray, next_obs: np.ndarray) -> np.ndarray:
    """Bool ``(N,)``: step ``i``'s next observation is step ``i + 1``'s observation (consecutive steps
    of one piece of an episode); False for the last step. ``obs``, ``next_obs``: ``(N, ...)``."""
    follows = np.zeros(len(obs), dtype=bool)
    if len(obs) > 1:  # numpy cannot reshape 0 rows to (0, -1)
        follows[:-1] = (next_obs[:-1] == obs[1:]).reshape(len(obs) - 1, -1).all(axis=1)
    return follows


def _steps(steps: list[Step], policy: ServedPolicy, errors: list[FieldError]) -> ExperienceBatch | None:
    named: list[list[bool] | None] = []
    next_named: list[list[bool] | None] = []
    obs = _observations([s.obs for s in steps], "body.steps.*.obs", policy, errors, named)
    next_obs = _observations([s.next_obs for s in steps], "body.steps.*.next_obs", policy, errors, next_named)
    actions = to_actions([s.action for s in steps], "body.steps.*.action", policy, errors)
    rows = [s.action_mask if s.action_mask is not None else m for s, m in zip(steps, named)]
    next_rows = [s.next_action_mask if s.next_action_mask is not None else m for s, m in zip(steps, next_named)]
    masks = _masks(rows, "body.steps.*.action_mask", policy, errors, acted=len(rows))
    next_masks = _masks(next_rows, "body.steps.*.next_action_mask", policy, errors, acted=0)
    errors.extend(forbidden_fields(policy.space, masks, actions, [f"body.steps.{i}.action" for i in range(len(steps))],
                                   [f"body.steps.{i}.action_mask" for i in range(len(steps))]))
    if obs is None or next_obs is None or actions is None:
        return None
    terminated = np.array([s.terminated for s in steps])
    truncated = np.array([s.truncated and not s.terminated for s in steps])
    follows = next_is_following(obs, next_obs)
    return ExperienceBatch(
        obs=obs,
        next_obs=next_obs,
        actions=actions,
        rewards=np.array([s.reward for s in steps], dtype=np.float32),
        terminated=terminated,
        truncated=truncated,
        segment_end=terminated | truncated | ~follows,
        log_probs=np.array([np.nan if s.log_prob is None else s.log_prob for s in steps], dtype=np.float32),
        versions=np.array([s.model_version for s in steps], dtype=np.int64),
        masks=masks,
        next_masks=next_masks,
    )


def _observations(
    rows: list[Any], where: str, policy: ServedPolicy, errors: list[FieldError],
    masks: list[list[bool] | None] | None = None,
) -> np.ndarray | None:
    """The observations as the model reads them, ``(N, *obs_shape)``; appends to ``masks`` the
    action mask each one carries (a named observation's ``ServedPolicy.mask_attribute``, or a
    space's Dict mask entry), None for the others."""
    if policy.obs_space is not None:
        return _space_observations(rows, where, policy, errors, masks)
    width, n_before = row_width(policy), len(errors)
    out = np.empty((len(rows), width), dtype=np.float32)
    for i, row in enumerate(rows):
        here = where.replace("*", str(i)) if "*" in where else f"{where}.{i}"
        if masks is not None:
            masks.append(None)
        if isinstance(row, list):
            if len(row) != width:
                errors.append(FieldError(here, f"expected {width} values, got {len(row)}"))
            else:
                out[i] = row
            continue
        if policy.observation_model is None or policy.recurrent is not None:
            why = "recurrent: send [observation | state] lists" if policy.recurrent else "has no named observations"
            errors.append(FieldError(here, f"this policy's schema {why}; send a list"))
            continue
        try:
            parsed = policy.observation_model.model_validate(row)
        except ValidationError as exc:
            errors.extend(field_errors(exc, here))
            continue
        out[i] = flatten([parsed], exclude=policy.mask_attribute)[0]
        if masks is not None and policy.mask_attribute is not None:
            masks[-1] = getattr(parsed, policy.mask_attribute)
    return out if len(errors) == n_before else None


def _masks(
    rows: list[list[bool] | None], where: str, policy: ServedPolicy, errors: list[FieldError], acted: int
) -> np.ndarray | None:
    """Per-row action masks (None: every action allowed) as bool ``(N, mask_width)``, or None when no
    row has one; a mask of the wrong width, or one of the first ``acted`` rows (where an action was
    chosen) that allows no action in a component, is an error (a terminal state may allow none)."""
    if all(row is None for row in rows):
        return None
    width, n_before = policy.space.mask_width, len(errors)
    if not width:
        errors.append(FieldError(where.replace(".*", ""), f"the {policy.space.kind} action space takes no action mask"))
        return None
    for i, row in enumerate(rows):
        if row is not None and len(row) != width:
            errors.append(FieldError(where.replace("*", str(i)), f"expected {width} booleans, got {len(row)}"))
    if len(errors) > n_before:
        return None
    out = np.array([[True] * width if row is None else row for row in rows], dtype=bool)
    for i, message in policy.space.mask_problems(out[:acted]):
        errors.append(FieldError(where.replace("*", str(i)), message))
    return out if len(errors) == n_before else None


def _space_observations(
    rows: list[Any], where: str, policy: ServedPolicy, errors: list[FieldError],
    masks: list[list[bool] | None] | None = None,
) -> np.ndarray | None:
    """Observations of the policy's space → model inputs ``(N, *obs_shape)``; a Dict's mask entry is
    left out of them and appended to ``masks``."""
    assert policy.obs_space is not None
    try:
        if "*" not in where:  # a fragment's list of observations
            obs, mask = read_batch(policy.obs_space, rows, where, policy.mask_key)
        else:
            read = [read_one(policy.obs_space, row, where.replace("*", str(i)), policy.mask_key)
                    for i, row in enumerate(rows)]
            obs = np.concatenate([inputs for inputs, _ in read])
            mask = None if policy.mask_key is None else np.concatenate([m for _, m in read])
    except InvalidRequest as exc:
        errors.extend(exc.fields)
        return None
    if masks is not None:
        masks.extend([None] * len(obs) if mask is None else mask.tolist())
    return obs


def to_actions(values: list[ActionValue], where: str, policy: ServedPolicy, errors: list[FieldError]) -> np.ndarray | None:
    """The actions as ``ExperienceBatch.actions`` (int64 ``(N, k)`` indices, float32 ``(N, d)``),
    or None after appending a FieldError for each bad one (``where``: ``body.steps.*.action``)."""
    space, n_before = policy.space, len(errors)

    def bad(i: int, message: str) -> None:
        errors.append(FieldError(where.replace("*", str(i)) if "*" in where else f"{where}.{i}", message))

    if isinstance(space, BoxSpace):
        out = np.empty((len(values), space.dim), dtype=np.float32)
        for i, v in enumerate(values):
            vec = [v] if isinstance(v, int) else v
            if len(vec) != space.dim:
                bad(i, f"expected an action of {space.dim} values, got {len(vec)}")
            else:
                out[i] = vec
        return out if len(errors) == n_before else None
    sizes = [space.n] if isinstance(space, DiscreteSpace) else list(space.nvec)
    assert isinstance(space, (DiscreteSpace, TupleSpace))
    out_i = np.empty((len(values), len(sizes)), dtype=np.int64)
    for i, v in enumerate(values):
        vec = [v] if isinstance(v, int) else v
        if len(vec) != len(sizes):
            bad(i, f"expected {len(sizes)} action index(es), got {len(vec)}")
        elif any(float(a) != int(a) for a in vec):
            bad(i, f"action indices must be integers, got {vec}")
        elif any(not 0 <= int(a) < n for a, n in zip(vec, sizes)):
            bad(i, f"action {[int(a) for a in vec] if len(vec) > 1 else int(vec[0])} is out of range: sizes {sizes}")
        else:
            out_i[i] = [int(a) for a in vec]
    return out_i if len(errors) == n_before else None
