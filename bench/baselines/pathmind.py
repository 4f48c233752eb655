"""The Pathmind design: a FastAPI gateway that sends every request to a Ray Serve deployment.

``uvicorn --factory bench.baselines.pathmind:create_app`` with ``SCHEMA_PATH`` set (and
``BENCH_RAY_METRICS_PORT`` for Ray's metrics export, ``BENCH_PATHMIND_MAX_ONGOING`` for the
replica's ``max_ongoing_requests``, default 100). One request is one DeploymentHandle call is
one forward pass: no batching anywhere. The gateway starts Ray in its own process, starts Serve
without its HTTP proxy, and looks the handle up once at start-up (the look-up blocks).
"""

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import ray
from fastapi import Depends, FastAPI
from ray import serve

from bench.baselines.common import load_baseline_policy
from policy_server.policies.torch_policy import PolicyOutput, TorchPolicy, model_format

APP_NAME = "bench-pathmind"
DEPLOYMENT_NAME = "pathmind-policy"
# Serve's default in Pathmind's time (`max_concurrent_queries=100`). Ray 2.60's default,
# `max_ongoing_requests=5`, makes this design collapse under load: with the replica full, the
# handle's router backs off and retries, and the process idles (26 req/s at 64 clients here).
DEFAULT_MAX_ONGOING = 100


@serve.deployment(name=DEPLOYMENT_NAME)
class PathmindPolicy:
    """One replica holding the model; ``max_ongoing_requests`` from ``BENCH_PATHMIND_MAX_ONGOING``."""

    def __init__(self, model_bytes: bytes, fmt: str) -> None:
        self.policy = TorchPolicy.from_bytes(model_bytes, fmt)  # type: ignore[arg-type]

    def forward(self, obs: np.ndarray) -> PolicyOutput:
        return self.policy.forward(obs)


def _start_serve(model_bytes: bytes, fmt: str) -> Any:
    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=int(os.environ.get("BENCH_RAY_METRICS_PORT", "8090")),
    )
    serve.start(proxy_location="Disabled")
    max_ongoing = int(os.environ.get("BENCH_PATHMIND_MAX_ONGOING", str(DEFAULT_MAX_ONGOING)))
    app = PathmindPolicy.options(max_ongoing_requests=max_ongoing).bind(model_bytes, fmt)
    serve.run(app, name=APP_NAME, route_prefix=None)
    return serve.get_deployment_handle(DEPLOYMENT_NAME, APP_NAME).options(method_name="forward")


def _stop_serve() -> None:
    serve.shutdown()
    ray.shutdown()


def create_app() -> FastAPI:
    base = load_baseline_policy()
    Observation = base.observation_model
    model_bytes, fmt = base.model_path.read_bytes(), model_format(base.model_path)
    rng = np.random.default_rng()
    handle: Any = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal handle
        handle = await asyncio.to_thread(_start_serve, model_bytes, fmt)
        try:
            yield
        finally:
            await asyncio.to_thread(_stop_serve)

    app = FastAPI(title="baseline: Pathmind design", lifespan=lifespan)

    @app.get("/")
    async def status() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict", dependencies=[Depends(base.key_checker())])
    async def predict(obs: Observation) -> dict[str, Any]:  # type: ignore[valid-type]
        out = await handle.remote(base.to_input(obs))
        return base.answer(out, rng)

    return app
