"""Request and response models of the policy endpoints (the observation models are generated).

Request models are strict (``fields.STRICT``): unknown fields, strings as numbers and numbers as
booleans are refused, and every number must be finite as a float32.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, create_model

from policy_server.fields import STRICT, Float32


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


class BatchActionResponse(_Wire):
    results: list[Action]
    model_version: int


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


class BatchDistributionResponse(_Wire):
    results: list[Distribution]
    model_version: int


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


class ErrorField(_Wire):
    field: str
    message: str


class ErrorBody(_Wire):
    code: str
    message: str
    status: int
    fields: list[ErrorField] = []


class ErrorEnvelope(_Wire):
    """Every error the server answers has this shape."""

    error: ErrorBody


def error_docs(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses: each is an ``ErrorEnvelope`` with its description."""
    return {status: {"model": ErrorEnvelope, "description": text} for status, text in descriptions.items()}


class Status(_Wire):
    status: str
    version: str
    default_policy: str | None = Field(description="None when the schema serves only LLM models.")
    policies: dict[str, dict[str, Any]]


def operation_ids(url_prefix: str) -> Callable[[APIRoute], str]:
    """OpenAPI operation ids from method and path, so the generated SDKs read well:
    ``POST /predict`` → ``predict``, ``POST /policies/cart/predict/batch`` →
    ``policies_cart_predict_batch``, ``GET /train/status`` → ``get_train_status``,
    ``DELETE /llm/sessions/{session_id}`` → ``delete_llm_sessions_by_session_id``. The
    schema's ``url_path`` is left out: it is where the server lives, not what an operation does.
    """

    def operation_id(route: APIRoute) -> str:
        path = route.path_format.removeprefix(url_prefix)
        words = [f"by_{w[1:-1]}" if w.startswith("{") else w for w in path.split("/") if w]
        stem = re.sub(r"\W+", "_", "_".join(words)).strip("_") or "root"
        method = min(route.methods or {"GET"}).lower()
        return stem if method == "post" else f"{method}_{stem}"

    return operation_id
