"""What every route shares in the OpenAPI document: the error envelope and the operation ids."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


AUTH_ERRORS = {
    401: "Missing api key: `WWW-Authenticate` names how to send it (the `access-token` header).",
    403: "Wrong api key, or a key of another policy.",
}
"""What a route behind an ``access-token`` check answers without the right key (``gateway.auth``)."""


def error_docs(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses: each is an ``ErrorEnvelope`` with its description."""
    return {status: {"model": ErrorEnvelope, "description": text} for status, text in descriptions.items()}


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
