"""Status, health and schema: the public routes about the server itself."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from policy_server import __version__
from policy_server.gateway.errors import envelope
from policy_server.gateway.openapi import error_docs
from policy_server.gateway.policy.service import PolicyService
from policy_server.schema.config import ServerSchema


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Status(_Wire):
    status: str
    version: str
    default_policy: str | None = Field(description="None when the schema serves only LLM models.")
    policies: dict[str, dict[str, Any]]


class Liveness(_Wire):
    status: Literal["alive"]


class Readiness(_Wire):
    status: Literal["ready"]
    policies: dict[str, bool] = Field(description="Each policy's deployment (and its candidate's, with a `canary`) answers.")


def health_router(schema: ServerSchema, services: dict[str, PolicyService]) -> APIRouter:
    """Status, health and schema: public, like the docs."""
    router = APIRouter(tags=["service"])

    @router.get("/", response_model=Status)
    async def status() -> dict[str, Any]:
        """What this server serves."""
        return {
            "status": "ok",
            "version": __version__,
            "default_policy": schema.default_policy,
            "policies": {name: s.policy.describe() for name, s in services.items()},
        }

    @router.get("/health/live", response_model=Liveness)
    async def live() -> dict[str, str]:
        """The gateway process answers."""
        return {"status": "alive"}

    @router.get("/health/ready", response_model=Readiness,
                responses=error_docs({503: "A policy is not ready (`not_ready`)."}))
    async def ready() -> JSONResponse:
        """Every policy's deployment answers, and its candidate's (`canary`)."""
        states = {name: await s.ready() for name, s in services.items()}
        if all(states.values()):
            return JSONResponse({"status": "ready", "policies": states})
        waiting = ", ".join(n for n, ok in states.items() if not ok)
        return envelope(503, "not_ready", f"policies not ready: {waiting}")

    @router.get("/schema")
    async def get_schema() -> dict[str, Any]:
        """The served schema, without the api key."""
        return schema.public()

    return router

