"""The gateway's own Prometheus metrics, served on their own port (Ray's agent cannot see them)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("policy", "endpoint")
        self.requests = Counter(
            "policy_server_requests", "HTTP requests answered.", (*labels, "status"), registry=self.registry
        )
        self.latency = Histogram(
            "policy_server_request_seconds", "HTTP request latency.", labels,
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.errors = Counter(
            "policy_server_errors", "Error answers by status.", (*labels, "status"), registry=self.registry
        )
        self.batch_rows = Histogram(
            "policy_server_batch_rows", "Observations per forward call sent by the gateway.",
            ("policy",), buckets=ROW_BUCKETS, registry=self.registry,
        )
        self._server = None

    def serve(self, port: int) -> None:
        """Expose ``/metrics`` on ``port`` in a background thread (0 or negative: off)."""
        if port > 0 and self._server is None:
            self._server, _ = start_http_server(port, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def record(self, policy: str, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(policy, endpoint, str(status)).inc()
        self.latency.labels(policy, endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(policy, endpoint, str(status)).inc()


class MetricsMiddleware:
    """Times every HTTP request; labels come from the matched route (its tag names the policy)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            policy, endpoint = route_labels(scope)
            self.metrics.record(policy, endpoint, status, time.perf_counter() - start)


def route_labels(scope: Scope) -> tuple[str, str]:
    """(policy, path template) of the route that answered; the policy is the route's first tag
    up to ": " (a policy's training routes are tagged "<policy>: training").

    FastAPI 0.16x keeps an included router's routes as they were declared, so ``scope["route"]``
    of a nested router lacks its parents' prefixes and tags; the effective route FastAPI matched
    has both. Older FastAPI copies routes on inclusion, and the route itself is complete.
    """
    route = scope.get("fastapi", {}).get("effective_route_context") or scope.get("route")
    if route is None:
        return "-", "unmatched"
    tags = getattr(route, "tags", None) or ["-"]
    policy = str(tags[0]).split(": ")[0]
    return policy, getattr(route, "path_format", None) or getattr(route, "path", "unmatched")
