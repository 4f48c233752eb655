"""The gateway's own Prometheus metrics, served on their own port (Ray's agent cannot see them).

With ``uvicorn --workers N`` every worker is a gateway process of its own. Set
``PROMETHEUS_MULTIPROC_DIR`` (an empty folder) and prometheus_client's multiprocess mode keeps each
worker's numbers in files there; one worker at a time (whichever holds the folder's lock) serves
the sum of all of them on the metrics port, and when it exits another takes over.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from typing import IO
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, Summary, multiprocess, start_http_server
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from policy_server.errors import StartupError

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
log = logging.getLogger(__name__)


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
        # per policy id of a policies_dir policy: one label value per model file (ids the gateway
        # checked against the folder, never what a client made up); Prometheus holds thousands well
        self.id_requests = Counter(
            "policy_server_policy_id_requests", "HTTP requests answered for a policy id (`policies_dir`).",
            ("policy", "policy_id", "status"), registry=self.registry,
        )
        self.id_latency = Histogram(
            "policy_server_policy_id_request_seconds", "HTTP request latency for a policy id (`policies_dir`).",
            ("policy", "policy_id"), buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_rows = Histogram(
            "policy_server_batch_rows", "Observations per forward call sent by the gateway.",
            ("policy",), buckets=ROW_BUCKETS, registry=self.registry,
        )
        self.variant_latency = Histogram(
            "policy_server_variant_seconds", "Time in the model per answered request, by the policy's version "
            "that answered it (stable or canary); its _count is the requests each answered.",
            ("policy", "variant"), buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.shadow_rows = Counter(
            "policy_server_shadow_observations", "Observations the shadow candidate ran on, by whether its "
            "most likely action agreed with the stable version's.", ("policy", "agreed"), registry=self.registry,
        )
        self.episode_return = Summary(
            "policy_server_variant_episode_return", "Returns of episodes (/collect_experience, and /train/experience "
            "fragments that name their variant), by the policy's version that acted them.", ("policy", "variant"), registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self._lock: IO[bytes] | None = None
        self._closed = threading.Event()

    def serve(self, port: int) -> None:
        """Expose ``/metrics`` on ``port`` in a background thread (0 or negative: off).

        Raises StartupError when the port is in use. In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``
        set) the worker that holds the folder's lock serves every worker's metrics; the others wait
        for the lock in a background thread, and a port in use is logged, not raised."""
        if port <= 0 or self._server is not None:
            return
        folder = os.environ.get(MULTIPROC_DIR)
        if folder is None:
            try:
                self._server, _ = start_http_server(port, registry=self.registry)
            except OSError as exc:
                raise StartupError(
                    f"the gateway metrics port {port} is taken ({exc.strerror}): by another gateway, or by "
                    f"another worker of `uvicorn --workers`, which needs {MULTIPROC_DIR} (an empty folder) to "
                    "serve every worker's metrics on one port; or set POLICY_SERVER_GATEWAY_METRICS_PORT to a "
                    "free port, or 0 to turn them off"
                ) from None
        else:
            threading.Thread(target=self._serve_all_workers, args=(port, Path(folder)), daemon=True).start()

    def _serve_all_workers(self, port: int, folder: Path) -> None:
        lock = self._lock = (folder / "gateway-metrics.lock").open("wb")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # until the worker that serves them exits
        except (OSError, ValueError):  # close() closed the file while this thread waited
            return
        if self._closed.is_set():
            lock.close()
            return
        every_worker = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_worker, str(folder))
        try:
            self._server, _ = start_http_server(port, registry=every_worker)
        except OSError as exc:
            log.error("the gateway metrics of all workers cannot be served on port %d: %s", port, exc)

    def close(self) -> None:
        self._closed.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()  # another worker may serve them now

    def record(self, policy: str, endpoint: str, status: int, seconds: float, policy_id: str | None = None) -> None:
        self.requests.labels(policy, endpoint, str(status)).inc()
        self.latency.labels(policy, endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(policy, endpoint, str(status)).inc()
        if policy_id is not None:
            self.id_requests.labels(policy, policy_id, str(status)).inc()
            self.id_latency.labels(policy, policy_id).observe(seconds)


class PolicyVariantMetrics:
    """One policy's per-version metrics (``gateway.policy.candidate.VariantMetrics``)."""

    def __init__(self, metrics: GatewayMetrics, policy: str) -> None:
        self.metrics, self.policy = metrics, policy

    def answered(self, variant: str, seconds: float) -> None:
        self.metrics.variant_latency.labels(self.policy, variant).observe(seconds)

    def shadowed(self, agreed: int, rows: int) -> None:
        self.metrics.shadow_rows.labels(self.policy, "true").inc(agreed)
        self.metrics.shadow_rows.labels(self.policy, "false").inc(rows - agreed)

    def episode(self, variant: str, episode_return: float) -> None:
        self.metrics.episode_return.labels(self.policy, variant).observe(episode_return)


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
            policy_id = scope.get("state", {}).get("policy_id")  # set once the id was checked (gateway.policy.multiplexed)
            self.metrics.record(policy, endpoint, status, time.perf_counter() - start, policy_id)


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
