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
        description="An action index (discrete), one index per component (tuple), or a vector (box)."
    )
    actions: list[int] | list[float] = Field(
        description="The action as a list, as Pathmind's policy server answered it (its clients read "
        "`actions[0]`): `[index]` (discrete), the indices (tuple), the vector (box)."
    )
    action_name: str | list[str] | None = Field(
        None, description="The action's name(s) when the schema names them (discrete, tuple)."
    )
    probability: float | None = Field(
        None, description="Probability of the action (discrete, tuple); null for a box (a density)."
    )
    log_prob: float = Field(description="Log-probability (log-density for a box) of the action.")


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
        None, description="Tuple: the probabilities of each component's actions."
    )
    mean: list[float] | None = Field(None, description="Box: the Gaussian's mean.")
    std: list[float] | None = Field(None, description="Box: the Gaussian's standard deviation.")


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


def raw_model(prefix: str, width: int) -> type[BaseModel]:
    """``{prefix}RawObservation``: one flat input vector of ``width`` values (the policy's obs_dim)."""
    return create_model(  # type: ignore[call-overload]
        f"{prefix}RawObservation",
        __base__=_Request,
        obs=(Annotated[list[Float32], Field(min_length=width, max_length=width)],
             Field(description=f"The flat input vector of {width} values, in schema order.")),
    )


def raw_batch_model(prefix: str, width: int, max_items: int) -> type[BaseModel]:
    """``{prefix}RawObservationBatch``: 1 to ``max_items`` flat input vectors of ``width`` values."""
    row = Annotated[list[Float32], Field(min_length=width, max_length=width)]
    return create_model(  # type: ignore[call-overload]
        f"{prefix}RawObservationBatch",
        __base__=_Request,
        obs=(Annotated[list[row], Field(min_length=1, max_length=max_items)],  # type: ignore[valid-type]
             Field(description=f"One flat input vector of {width} values per row.")),
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
