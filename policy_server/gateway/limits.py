"""Request body size limit, enforced before the body is parsed (also for chunked uploads)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from policy_server.errors import PayloadTooLarge
from policy_server.gateway.errors import error_response


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            # answered here: this middleware sits outside the app's exception handlers
            response = error_response(PayloadTooLarge(self._message(int(declared))))
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise PayloadTooLarge(self._message(seen))
            return message

        await self.app(scope, limited, send)

    def _message(self, size: int) -> str:
        return (
            f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes; "
            "split the batch or raise POLICY_SERVER_MAX_BODY_BYTES"
        )
