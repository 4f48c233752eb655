"""Request body size limit, enforced before the body is parsed (also for chunked uploads)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from policy_server.errors import PayloadTooLarge
from policy_server.gateway.errors import error_response


class BodySizeLimit:
    """Answers 413 as soon as a body is known to be too large: declared, or while it streams in.

    It sits outside the app's exception handlers, so it answers with the error envelope itself;
    for a streamed body it then tells the app the client left, and drops whatever the app sends.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(int(declared), scope, receive, send)
        seen = 0
        rejected = False

        async def limited_receive() -> Message:
            nonlocal seen, rejected
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes and not rejected:
                rejected = True
                await self._reject(seen, scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not rejected:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _reject(self, size: int, scope: Scope, receive: Receive, send: Send) -> None:
        message = (
            f"request body of {size}+ bytes exceeds the limit of {self.max_bytes} bytes; "
            "split the batch or raise POLICY_SERVER_MAX_BODY_BYTES"
        )
        await error_response(PayloadTooLarge(message))(scope, receive, send)
