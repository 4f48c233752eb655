"""Cross-origin requests: Starlette's ``CORSMiddleware``, its refusals in our one error envelope."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from policy_server.gateway.errors import envelope


class EnvelopedCORS(CORSMiddleware):
    """Starlette's CORS middleware, whose refused preflight (plain text "Disallowed CORS origin",
    400) answers our JSON envelope instead, naming what was refused and the setting that allows it."""

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code != 400:
            return answer
        refused = bytes(answer.body).decode().removeprefix("Disallowed CORS ")
        message = (f"cross-origin preflight refused ({refused}): origin {request_headers['origin']!r} "
                   f"asking {request_headers['access-control-request-method']!r}; the allowed origins are "
                   "POLICY_SERVER_CORS_ORIGINS")
        refusal = envelope(400, "cors_refused", message)
        for name in ("vary", "access-control-allow-methods", "access-control-max-age", "access-control-allow-headers"):
            if name in answer.headers:
                refusal.headers[name] = answer.headers[name]
        return refusal
