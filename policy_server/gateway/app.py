"""The composition root: ``build_app(settings)`` builds the whole gateway from a schema."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI

from policy_server import __version__
from policy_server.errors import PolicyServerError
from policy_server.gateway import grpo, openai, policy, training
from policy_server.gateway import llm as gateway_llm
from policy_server.gateway import sdks as gateway_sdks
from policy_server.gateway.auth import KEY_NAME, api_key_checker, api_keys, bearer_checker
from policy_server.gateway.cors import EnvelopedCORS
from policy_server.gateway.errors import install_error_handlers
from policy_server.gateway.experience_logs import experience_logs
from policy_server.gateway.health import health_router
from policy_server.gateway.keys import LLM_SCOPE, policy_scope
from policy_server.gateway.limits import BodySizeLimit
from policy_server.gateway.llm.setup import LLMServices, llm_services
from policy_server.gateway.metrics import GatewayMetrics, MetricsMiddleware, PolicyVariantMetrics
from policy_server.gateway.openapi import operation_ids
from policy_server.gateway.paths import PathNormalizer, slash_routes
from policy_server.gateway.policy.candidate import PolicyVersions
from policy_server.gateway.policy.multiplexed import MultiplexedPolicyService, make_policy_service
from policy_server.gateway.policy.service import PolicyService
from policy_server.gateway.redact import install_log_redaction
from policy_server.gateway.request_ids import RequestIds
from policy_server.gateway.startup import (
    cancel_on_signal,
    install_one_line_refusal,
    restore_python_signal_handlers,
    start_together,
)
from policy_server.gateway.training.service import TrainingService
from policy_server.policies.served import resolve_candidate, resolve_policy
from policy_server.schema.config import ServerSchema, load_schema
from policy_server.sdks import ClientSDKs
from policy_server.serving.runtime import Runtime, make_runtime
from policy_server.settings import Settings, load_settings

log = logging.getLogger(__name__)

DESCRIPTION = """Serves the reinforcement-learning policies described by `schema.yaml`.

Send observations to `/predict` (a sampled action), `/predict_deterministic` (the most likely
action) or `/distribution` (the exact action distribution); each has a `/batch` form that answers
many observations in one forward pass. `/collect_experience` acts and, for a policy with a
`training` section, learns from the steps a client sends (Pathmind's loop). A policy with a candidate
version (`canary`) answers a share of requests with it; every answer names its `variant`, and the
`X-Policy-Version: stable|canary` header forces one. Authenticate with the `access-token` header, query
parameter or cookie (prefer the header: a query parameter ends up in proxies' logs): a missing key
is a 401 with `WWW-Authenticate`, a wrong one (or another policy's) a 403. Every path
answers with or without a trailing slash, and with or without the schema's `url_path` (for a
proxy that strips it). Every error is one JSON envelope: `{"error": {"code", "message", "status",
"fields"}}`.
"""


def build_app(settings: Settings | None = None) -> FastAPI:
    """Load and check the schema and its models, and build the gateway app.

    Raises SchemaError (naming the field) when the schema and its models disagree, SettingsError
    when a setting is invalid (a keys file, a certificate). Ray is started (or joined) by the
    app's lifespan, not here.
    """
    install_log_redaction()
    refusal = install_one_line_refusal()
    settings = settings or load_settings()
    schema = load_schema(settings.schema_path)
    keys = api_keys(settings, schema)
    rng = np.random.default_rng(settings.seed)
    resolved = {name: resolve_policy(spec) for name, spec in schema.policies.items()}
    for served, _ in resolved.values():
        resolve_candidate(served)  # refuses a candidate that does not fit its policy
    metrics = GatewayMetrics()
    services = {
        name: make_policy_service(served, rng, PolicyVersions(served, PolicyVariantMetrics(metrics, name)))
        for name, (served, _) in resolved.items()
    }
    local_models = {name: model for name, (_, model) in resolved.items()}  # loaded by the check
    trainings = {
        name: TrainingService(served, settings.max_batch_observations, services[name].versions)
        for name, (served, _) in resolved.items()
        if served.spec.training is not None
    }
    logs = experience_logs({name: served for name, (served, _) in resolved.items()}, metrics)
    for name, experience_log in logs.items():
        services[name].experience_log = experience_log
        if name in trainings:
            trainings[name].experience_log = experience_log
    llm = llm_services(schema, settings.backend)
    sdks = _client_sdks(settings)
    prefix = f"/{schema.url_path}" if schema.url_path else ""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        install_log_redaction()  # again: uvicorn may have (re)configured logging since the build
        # the metrics port first: a port in use fails start-up before anything runs on Ray
        metrics.serve(settings.gateway_metrics_port)
        for experience_log in logs.values():
            experience_log.open()
        runtime = make_runtime(settings, local_models)
        local_models.clear()  # the runtime holds them now, or the replicas hold their own
        try:
            with cancel_on_signal(runtime):
                await _start_services(runtime, schema, services, trainings, metrics, llm)
            if sdks is not None and settings.clients_prebuild:
                sdks.start(app.openapi())
            restore_python_signal_handlers()
            # What start-up allocated (torch, Ray, the app) lives as long as the process: move it
            # out of the collector's way, or full collections of it stall requests 80-130 ms.
            gc.collect()
            gc.freeze()
            yield
        except PolicyServerError as exc:
            refusal.refuse(exc)  # uvicorn then logs the reason, not the traceback
            raise
        finally:  # also when start-up fails half-way: what did start is stopped
            gc.unfreeze()
            for service in services.values():
                await service.versions.close()
            metrics.close()
            for experience_log in logs.values():
                experience_log.close()
            if sdks is not None:
                sdks.close()
            await runtime.stop()

    app = _fastapi(prefix, lifespan)
    app.state.settings, app.state.schema, app.state.services = settings, schema, services
    app.state.metrics, app.state.trainings, app.state.llm, app.state.clients = metrics, trainings, llm, sdks
    app.state.experience_logs = logs
    install_error_handlers(app, f"{prefix}/v1/")
    app.include_router(health_router(schema, services), prefix=prefix)
    for name, service in services.items():
        prefixes = [f"{prefix}/policies/{name}"] + ([prefix] if name == schema.default_policy else [])
        auth = api_key_checker(keys, policy_scope(name))  # its own keys and the server-wide ones
        policy.mount(app, service, trainings.get(name), auth, settings.max_batch_observations, prefixes)
        training.mount(app, name, trainings.get(name), auth, prefixes)
    llm_auth = api_key_checker(keys, LLM_SCOPE)
    gateway_llm.mount(app, llm, llm_auth, prefix)
    grpo.mount(app, llm, llm_auth, prefix)
    openai.mount(app, llm.policy, bearer_checker(keys, LLM_SCOPE), prefix)
    gateway_sdks.mount(app, sdks, api_key_checker(keys, None), prefix)  # any valid key: the SDKs are public API
    app.add_middleware(RequestIds)  # innermost: the path it records is the normalised one
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(PathNormalizer, prefix=prefix, slash_routes=slash_routes(app))
    if settings.cors_origins:  # outermost: preflights are answered before anything else runs
        app.add_middleware(
            EnvelopedCORS,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            # Starlette adds the safelisted ones (content-type) itself
            allow_headers=[KEY_NAME, "authorization", "x-policy-version", "x-policy-id", "x-request-id", "x-episode-id"],
            expose_headers=["retry-after", "www-authenticate", "x-request-id"],
            max_age=600,
        )
    return app


def _fastapi(prefix: str, lifespan: Any) -> FastAPI:
    """The bare app: docs under the schema's ``url_path``, operation ids from the paths."""
    return FastAPI(
        title="policy-server",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=f"{prefix}/docs",
        redoc_url=f"{prefix}/redoc",
        openapi_url=f"{prefix}/openapi.json",
        generate_unique_id_function=operation_ids(prefix),
        redirect_slashes=False,  # PathNormalizer answers both spellings, without a redirect
    )


async def _start_services(
    runtime: Runtime,
    schema: ServerSchema,
    services: dict[str, PolicyService],
    trainings: dict[str, TrainingService],
    metrics: GatewayMetrics,
    llm: LLMServices,
) -> None:
    """Have the runtime start every service of the schema, and attach each to its gateway service
    (each answers 503 until then)."""
    await runtime.start(schema)

    async def start_policy(name: str, service: PolicyService) -> None:
        spec = schema.policies[name]
        if isinstance(service, MultiplexedPolicyService):  # policies_dir: no trainer (the schema refuses one)
            service.attach_ids(await runtime.multiplexed_model(spec), metrics.batch_rows.labels(name).observe)
            return
        service.attach(await runtime.policy_model(spec), metrics.batch_rows.labels(name).observe)
        trainer = trainings.get(name)
        if trainer is not None:  # after its policy: it publishes to the policy's deployment
            trainer.attach(await runtime.policy_trainer(spec, trainer.policy.space, trainer.policy.obs_dim))

    async def start_candidate(name: str, service: PolicyService) -> None:
        service.versions.attach(await runtime.candidate_model(schema.policies[name]), metrics.batch_rows.labels(name).observe)

    candidates = [start_candidate(n, s) for n, s in services.items() if s.policy.spec.canary is not None]
    await start_together(runtime, *(start_policy(n, s) for n, s in services.items()), *candidates, llm.start(runtime))


def _client_sdks(settings: Settings) -> ClientSDKs | None:
    """The client SDK generator behind ``GET /clients`` (None when turned off); generates nothing yet."""
    if not settings.clients_enabled:
        return None
    return ClientSDKs(settings.clients_cache_dir, settings.clients_java, settings.clients_timeout_s)
