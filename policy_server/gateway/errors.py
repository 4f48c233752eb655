"""The one boundary where errors become HTTP answers: one JSON envelope for all of them."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from policy_server.errors import FieldError, InvalidRequest, PolicyServerError, Unauthorized
from policy_server.fields import error_message
from policy_server.gateway.paths import flat_routes

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "unavailable",
    504: "gateway_timeout",
}


RETRY_AFTER_S = 1  # what 429 and 503 answers suggest: the overload or restart is usually brief


def envelope(status: int, code: str, message: str, fields: list[FieldError] | None = None) -> JSONResponse:
    body = {
        "error": {
            "code": code,
            "message": message,
            "status": status,
            "fields": [{"field": f.field, "message": f.message} for f in fields or []],
        }
    }
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(exc: PolicyServerError) -> JSONResponse:
    response = envelope(exc.status, exc.code, exc.message, exc.fields)
    if exc.retry_after_s is not None:
        response.headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, Unauthorized):  # RFC 9110 §11.6.1: a 401 names how to authenticate
        response.headers["WWW-Authenticate"] = exc.challenge
    return response


def _validation_fields(exc: RequestValidationError) -> list[FieldError]:
    fields = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = error_message(err)
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif err.get("type") == "json_invalid":
            msg = f"malformed JSON: {err.get('ctx', {}).get('error', msg)}"
        fields.append(FieldError(loc, msg))
    return fields


async def _on_policy_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PolicyServerError)
    if exc.status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, exc.message)
    return error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    fields = _validation_fields(exc)
    summary = "; ".join(f"{f.field}: {f.message}" for f in fields[:5])
    if len(fields) > 5:
        summary += f"; and {len(fields) - 5} more"
    return envelope(422, "invalid_request", f"invalid request: {summary}", fields)


def _unreadable_body(cause: BaseException) -> FieldError:
    """Why ``json.loads`` could not read a body that is not plain malformed JSON (FastAPI answers
    those with a bare 400): bytes that are not UTF-8, an integer past Python's digit limit
    (``sys.get_int_max_str_digits()``), nesting past the recursion limit."""
    if isinstance(cause, UnicodeDecodeError):
        reason = f"not UTF-8 (byte 0x{cause.object[cause.start]:02x} at position {cause.start})"
    elif isinstance(cause, RecursionError):
        reason = "nested too deeply"
    else:
        reason = str(cause).split(";")[0]  # drop Python's advice to the server (set_int_max_str_digits)
    return FieldError("body", f"malformed JSON: {reason}")


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse the body
        field = _unreadable_body(exc.__cause__)
        return envelope(422, "invalid_request", f"invalid request: {field.field}: {field.message}", [field])
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see /docs for the endpoints"
    response = envelope(exc.status_code, code, message)
    response.headers.update(exc.headers or {})
    if exc.status_code == 405:
        response.headers["Allow"] = _allowed_methods(request)
    return response


def _allowed_methods(request: Request) -> str:
    """Every method the request's path answers, for a 405's ``Allow`` (RFC 9110). Starlette's own
    names only the first route of the path, and a path may have one route per method."""
    methods: set[str] = set()
    for route in flat_routes(request.app):
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return envelope(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "invalid_request_error", 429: "rate_limit_error"}  # OpenAI's 404s (model_not_found) too


def openai_error(status: int, code: str, message: str, field: str | None) -> dict[str, Any]:
    """OpenAI's error object (``{"error": {message, type, param, code}}``) of one of our errors;
    ``field`` is our name of the bad field (``body.messages.0.content``), ``param`` the request's
    (``messages.0.content``). 422 is OpenAI's 400, so callers map the status themselves."""
    param = field.removeprefix("body").removeprefix(".") if field is not None else None
    kind = _OPENAI_TYPES.get(400 if status == 422 else status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message.replace("body.", ""), "type": kind, "param": param or None, "code": code}}


def _as_openai(response: JSONResponse) -> JSONResponse:
    """Our envelope rendered in OpenAI's shape (for its clients, on ``/v1``); 422 becomes 400."""
    error = json.loads(response.body)["error"]
    field = error["fields"][0]["field"] if error["fields"] else None
    status = 400 if response.status_code == 422 else response.status_code
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
    return JSONResponse(openai_error(status, error["code"], error["message"], field), status_code=status, headers=headers)


Handler = Callable[[Request, Exception], Awaitable[JSONResponse]]


def _shaped(handler: Handler, openai_prefix: str) -> Handler:
    """``handler``, answering in OpenAI's shape on the paths under ``openai_prefix``."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        response = await handler(request, exc)
        path = request.url.path.removeprefix(request.scope.get("root_path", ""))
        return _as_openai(response) if path.startswith(openai_prefix) else response

    return handle


def install_error_handlers(app: FastAPI, openai_prefix: str = "/v1/") -> None:
    """Our envelope everywhere, OpenAI's error shape on its routes (paths under ``openai_prefix``)."""
    app.add_exception_handler(PolicyServerError, _shaped(_on_policy_error, openai_prefix))
    app.add_exception_handler(RequestValidationError, _shaped(_on_validation_error, openai_prefix))
    app.add_exception_handler(StarletteHTTPException, _shaped(_on_http_error, openai_prefix))
    app.add_exception_handler(Exception, _shaped(_on_unexpected, openai_prefix))


T = TypeVar("T")


def under_body(exc: InvalidRequest, names: Mapping[str, str] | None = None) -> InvalidRequest:
    """A domain's ``InvalidRequest``, whose fields are named from its own input (``prompt``,
    ``dataset.3.GAE``, ``""`` for the whole input), named from the request body instead
    (``body.prompt``, ``body.dataset.3.GAE``, ``body``); the message's leading field too.
    ``names`` renames a field's first part where the request calls it otherwise (``structured`` →
    ``response_format``); a field already named from the body stays as it is."""
    def in_body(field: str) -> str:
        if field == "body" or field.startswith("body."):
            return field
        head, _, rest = field.partition(".")
        return ".".join(filter(None, ("body", (names or {}).get(head, head), rest)))

    fields = [FieldError(in_body(f.field), f.message) for f in exc.fields]
    head = f"{exc.fields[0].field}: " if exc.fields[0].field else ""
    message = exc.message
    if message.startswith(head):
        message = f"{fields[0].field}: {message[len(head):]}"
    return type(exc)(message, fields)


async def in_body(pending: Awaitable[T]) -> T:
    """``await pending``, its ``InvalidRequest`` named from the request body (``under_body``)."""
    try:
        return await pending
    except InvalidRequest as exc:
        raise under_body(exc) from exc
