"""Cross-origin requests: Starlette's ``CORSMiddleware``, its refusals in our one error envelope."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from policy_server.gateway.errors import envelope


class EnvelopedCORS(CORSMiddleware):
    """Starlette's CORS middleware, whose refused preflight (plain text "Disallowed CORS origin",
    400) answers our JSON envelope instead, naming each refused part and what is allowed."""

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code != 400:
            return answer
        refusal = envelope(400, "cors_refused", "cross-origin preflight refused: " + "; ".join(self._refused(request_headers)))
        for name in ("vary", "access-control-allow-methods", "access-control-max-age", "access-control-allow-headers"):
            if name in answer.headers:
                refusal.headers[name] = answer.headers[name]
        return refusal

    def _refused(self, request_headers: Headers) -> list[str]:
        """What Starlette's checks refused, each with what is allowed."""
        origin, method = request_headers["origin"], request_headers["access-control-request-method"]
        asked = [h.strip() for h in request_headers.get("access-control-request-headers", "").lower().split(",") if h.strip()]
        reasons = []
        if not self.is_allowed_origin(origin=origin):
            reasons.append(f"origin {origin!r} is not one of POLICY_SERVER_CORS_ORIGINS")
        if method not in self.allow_methods:
            reasons.append(f"method {method!r} is not one of {', '.join(self.allow_methods)}")
        headers = [h for h in asked if h not in self.allow_headers]
        if headers and not self.allow_all_headers:
            reasons.append(f"headers {', '.join(headers)} are not among {', '.join(sorted(self.allow_headers))}")
        return reasons or ["(private network access is not allowed)"]
