"""Request and response models of the policy endpoints (the observation models are generated).

Request models are strict (``fields.STRICT``): unknown fields, strings as numbers and numbers as
booleans are refused, and every number must be finite as a float32.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Header
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model

from policy_server.fields import STRICT, Float32, StrictBool

VariantName = Literal["stable", "canary"]
VARIANT_DOC = ("The version of the policy that answered: `stable` (the schema's `model`), or `canary` (its "
               "candidate, `canary.model`, for the share of requests routed to it).")
# Left out of the OpenAPI document (the README and the app's description document it): an optional
# header is a parameter of every generated SDK method, and openapi-generator's Java methods would
# change their signatures (`predict(obs)` → `predict(obs, xPolicyVersion)`), breaking users' code.
ForcedVariant = Annotated[VariantName | None, Header(alias="X-Policy-Version", include_in_schema=False)]
"""``X-Policy-Version: stable|canary``: answer with this version of the policy instead of the one the
routing picks (tests, debugging); ``canary`` is a 409 for a policy without a candidate."""


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Action(_Wire):
    action: int | list[int] | list[float] = Field(
        description="An action index (discrete), one index per component (multi_discrete / tuple), one 0/1 "
        "per bit (multi_binary), or a vector (box: clipped to its bounds, or tanh-squashed into them)."
    )
    actions: list[int] | list[float] = Field(
        description="The action as a list, as Pathmind's policy server answered it (its clients read "
        "`actions[0]`): `[index]` (discrete), the indices (multi_discrete), the bits, the vector (box)."
    )
    action_name: str | list[str] | None = Field(
        None, description="The action's name(s) when the schema names them (discrete, multi_discrete)."
    )
    probability: float | None = Field(
        None, description="Probability of the action (discrete, multi_discrete, multi_binary); null for a box."
    )
    log_prob: float = Field(
        description="Log-probability of the answered action. Box: of the action as answered: clipped, the "
        "censored Gaussian's (log of the mass beyond a bound at the bound, the log-density inside); "
        "`squash: tanh`, the log-density with the change-of-variables term."
    )


class ActionResponse(Action):
    model_version: int = Field(description="Version of the weights that chose the action.")
    variant: VariantName = Field(description=VARIANT_DOC)
    policy_id: str | None = Field(
        None, description="The policy id that answered (a `policies_dir` policy only; absent otherwise)."
    )


class BatchActionResponse(_Wire):
    results: list[Action]
    model_version: int
    variant: VariantName = Field(description=VARIANT_DOC)
    policy_id: str | None = Field(
        None, description="The policy id that answered (a `policies_dir` policy only; absent otherwise)."
    )


class Distribution(_Wire):
    probabilities: dict[str, float] | None = Field(
        None, description="Discrete: probability of each action, keyed by name or index."
    )
    components: list[dict[str, float]] | None = Field(
        None, description="Multi-discrete (tuple): the probabilities of each component's actions."
    )
    bits: list[float] | None = Field(None, description="Multi-binary: the probability that each bit is 1.")
    mean: list[float] | None = Field(None, description="Box: the Gaussian's mean (before clipping or squashing).")
    std: list[float] | None = Field(None, description="Box: the Gaussian's standard deviation (likewise).")
    squash: Literal["clip", "tanh"] | None = Field(
        None, description="Box with a finite bound: `clip` (action = clip(u, low, high)) or `tanh` (action = "
        "low + (tanh(u) + 1)/2 · (high - low)), u ~ N(mean, std); absent for an unbounded box."
    )
    low: list[float | None] | None = Field(None, description="Box: the lower bounds (null: none), with `squash`.")
    high: list[float | None] | None = Field(None, description="Box: the upper bounds (null: none), with `squash`.")


class DistributionResponse(Distribution):
    model_version: int
    variant: VariantName = Field(description=VARIANT_DOC)
    policy_id: str | None = Field(
        None, description="The policy id that answered (a `policies_dir` policy only; absent otherwise)."
    )


class BatchDistributionResponse(_Wire):
    results: list[Distribution]
    model_version: int
    variant: VariantName = Field(description=VARIANT_DOC)
    policy_id: str | None = Field(
        None, description="The policy id that answered (a `policies_dir` policy only; absent otherwise)."
    )


class _Request(BaseModel):
    model_config = STRICT


MASK_DOC = "Optional: the legal actions, {width} booleans (true = allowed); a masked action gets probability 0."


def _mask(width: int) -> Any:
    return Annotated[list[StrictBool], Field(min_length=width, max_length=width)]


def raw_model(prefix: str, width: int, mask_width: int = 0) -> type[BaseModel]:
    """``{prefix}RawObservation``: one flat input vector of ``width`` values (the policy's obs_dim),
    and, for a space that takes masks (``mask_width`` actions), an optional ``action_mask``."""
    mask = {"action_mask": (_mask(mask_width) | None, Field(None, description=MASK_DOC.format(width=mask_width)))}
    return create_model(  # type: ignore[call-overload]
        f"{prefix}RawObservation",
        __base__=_Request,
        obs=(Annotated[list[Float32], Field(min_length=width, max_length=width)],
             Field(description=f"The flat input vector of {width} values, in schema order.")),
        **(mask if mask_width else {}),
    )


def raw_batch_model(prefix: str, width: int, max_items: int, mask_width: int = 0) -> type[BaseModel]:
    """``{prefix}RawObservationBatch``: 1 to ``max_items`` flat input vectors of ``width`` values
    (and optionally one ``action_mask`` per row)."""
    row = Annotated[list[Float32], Field(min_length=width, max_length=width)]
    masks = Annotated[list[_mask(mask_width)], Field(min_length=1, max_length=max_items)]  # type: ignore[misc]
    mask = {"action_mask": (masks | None, Field(None, description="One mask per row: " + MASK_DOC.format(width=mask_width)))}
    return create_model(  # type: ignore[call-overload]
        f"{prefix}RawObservationBatch",
        __base__=_Request,
        obs=(Annotated[list[row], Field(min_length=1, max_length=max_items)],  # type: ignore[valid-type]
             Field(description=f"One flat input vector of {width} values per row.")),
        **(mask if mask_width else {}),
    )


def batch_model(observation: type[BaseModel], max_items: int) -> type[BaseModel]:
    return create_model(  # type: ignore[call-overload]
        f"{observation.__name__}Batch",
        __base__=_Request,
        observations=(Annotated[list[observation], Field(min_length=1, max_length=max_items)], ...),  # type: ignore[valid-type]
    )


def space_model(prefix: str, schema: dict[str, Any], mask_width: int | None) -> type[BaseModel]:
    """``{prefix}SpaceObservation``: ``obs``, one observation of the policy's Gymnasium space
    (``schema``: its JSON Schema, nested arrays of a Box's shape), and an optional ``action_mask``.
    The values are checked by ``schema.space_inputs`` (NumPy: a nested-list model is too slow for
    images), so ``obs`` is taken as any JSON here and documented by ``schema``."""
    return create_model(  # type: ignore[call-overload]
        f"{prefix}SpaceObservation",
        __base__=_Request,
        obs=(Annotated[Any, WithJsonSchema(schema)], Field(description="One observation of the policy's space.")),
        action_mask=(_mask_row(mask_width) | None, Field(None, description=_MASK_DOC)),
    )


def space_batch_model(prefix: str, schema: dict[str, Any], mask_width: int | None, max_items: int) -> type[BaseModel]:
    """``{prefix}SpaceObservationBatch``: ``obs``, 1 to ``max_items`` observations of the space,
    and an optional ``action_mask`` per observation."""
    rows = {"type": "array", "items": schema, "minItems": 1, "maxItems": max_items}
    return create_model(  # type: ignore[call-overload]
        f"{prefix}SpaceObservationBatch",
        __base__=_Request,
        obs=(Annotated[list[Any], Field(min_length=1, max_length=max_items), WithJsonSchema(rows)],
             Field(description="One observation of the policy's space per row.")),
        action_mask=(list[_mask_row(mask_width)] | None,  # type: ignore[misc]
                     Field(None, description=_MASK_DOC + " One per observation.")),
    )


_MASK_DOC = ("The legal actions, one boolean per action (per logit of a multi-discrete space), `true` = allowed; "
             "combined with the observation's own mask entry when the schema names one.")


def _mask_row(width: int | None) -> Any:
    if width is None:  # an action space without masks: refused by the service, naming the field
        return list[StrictBool]
    return Annotated[list[StrictBool], Field(min_length=width, max_length=width)]
