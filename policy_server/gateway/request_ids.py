"""Request ids: every HTTP request has one, answered in ``X-Request-ID``.

A client may send its own ``X-Request-ID`` (1-128 letters, digits, ``_ . : -``); any other value,
or none, gets a fresh one. The experience log names each decision by it, and a client names the
decision a reward belongs to by it (``/train/experience``'s ``request_ids``). ``X-Episode-ID`` (same
characters) tags a request's decisions with the client's episode. Both reach the services through
a context variable, so no endpoint signature changes for them.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar
from dataclasses import dataclass

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from policy_server.experience_log.records import Asker

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
REQUEST_ID_HEADER = "x-request-id"
EPISODE_ID_HEADER = "x-episode-id"


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    path: str
    episode_id: str | None = None


CURRENT: ContextVar[RequestContext | None] = ContextVar("policy_server_request", default=None)


def current() -> RequestContext:
    """The request being answered (outside a request, e.g. in a unit test: a fresh id, path ``""``)."""
    return CURRENT.get() or RequestContext(uuid.uuid4().hex, "")


def asker(client_id: str | None = None, policy_id: str | None = None) -> Asker:
    """Who asks in the request being answered, as the experience log names it."""
    request = current()
    return Asker(request.request_id, request.path, request.episode_id, client_id, policy_id)


def _valid(value: bytes | None) -> str | None:
    text = value.decode("latin-1") if value is not None else None
    return text if text is not None and ID_PATTERN.match(text) else None


class RequestIds:
    """Pure ASGI middleware: sets ``CURRENT`` for the request and answers its id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = _valid(headers.get(REQUEST_ID_HEADER.encode())) or uuid.uuid4().hex
        token = CURRENT.set(RequestContext(request_id, scope["path"], _valid(headers.get(EPISODE_ID_HEADER.encode()))))

        async def answer(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        try:
            await self.app(scope, receive, answer)
        finally:
            CURRENT.reset(token)
