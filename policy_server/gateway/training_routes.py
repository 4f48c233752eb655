"""Endpoints to train a policy from clients' experience, and to download the served model.

Thin handlers over ``TrainingService`` and ``PolicyService``; the paths and bodies are described
in the README's training section and in the generated OpenAPI document.
"""

# No `from __future__ import annotations`: FastAPI must see the models as real types.

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from policy_server.errors import NotTrainable
from policy_server.fields import STRICT
from policy_server.gateway.experience import CLIENT_ID_PATTERN, experience_model
from policy_server.gateway.routes import ERRORS
from policy_server.gateway.service import PolicyService
from policy_server.gateway.training import TrainingService
from policy_server.gateway.wire import error_docs
from policy_server.policies.codec import encode_weights
from policy_server.training.checkpoint import NAME_PATTERN

TRAINING_ERRORS = ERRORS | error_docs({
    404: "Unknown checkpoint.",
    409: "`stale_samples`: every sample came from too old a model version; "
    "`training_not_running`: training is paused or stopped.",
})


class _Request(BaseModel):
    model_config = STRICT


class Registration(_Request):
    client_id: str | None = Field(None, min_length=1, max_length=128, pattern=CLIENT_ID_PATTERN,
                                  description="Your id; the server makes one when it is null.")
    info: dict[str, Any] | None = Field(None, description="Anything that describes the client.")


class ClientAnswer(BaseModel):
    client_id: str
    model_version: int
    algorithm: str
    state: str
    heartbeat_interval_s: float
    exploration: dict[str, float] = Field(description="DQN: `epsilon` for epsilon-greedy acting.")


class ExperienceAnswer(BaseModel):
    accepted: int = Field(description="Steps stored for training.")
    rejected: int = Field(description="Steps acted by too old a model version (not stored).")
    model_version: int = Field(description="The current version: act with it next.")
    state: str


class TrainingStatus(BaseModel):
    policy: str
    algorithm: str
    state: str = Field(description="running, paused or stopped.")
    model_version: int
    updates: int
    skipped_updates: int = Field(
        description="Updates refused because a loss, gradient or new weight was not finite; the model "
        "version stayed, nothing was published or saved, and `last_error` says what and where."
    )
    samples_received: int
    samples_accepted: int
    samples_rejected: dict[str, int]
    samples_per_second: float
    active_clients: int
    clients: dict[str, dict[str, Any]]
    episodes: int
    last_return: float | None
    mean_return: float | None = Field(description="Mean return of the last `return_window` episodes.")
    best_mean_return: float | None
    return_window: int
    recent_returns: list[float]
    last_update_seconds: float | None
    last_update: dict[str, float]
    last_checkpoint: str | None
    last_error: str | None
    exploration: dict[str, float]


class Resume(_Request):
    checkpoint: str | None = Field(
        None, description="A checkpoint's name; null: the newest.",
        json_schema_extra={"pattern": NAME_PATTERN},  # checked by the store, whose 422 says what a name may hold
    )


class Saved(BaseModel):
    checkpoint: str
    model_version: int


class Checkpoints(BaseModel):
    checkpoints: list[dict[str, Any]]


class Weights(BaseModel):
    model_version: int
    weights: dict[str, dict[str, Any]] = Field(
        description="Per parameter: `dtype`, `shape`, and `data` (its little-endian bytes, base64)."
    )


class Version(BaseModel):
    model_version: int


def _counting_route(service: TrainingService) -> type[APIRoute]:
    """Routes whose bodies fail validation still count as malformed samples in the trainer."""

    class CountingRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def counted(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError:
                    await service.count_malformed(await request.body())
                    raise

            return counted

    return CountingRoute


def training_router(service: TrainingService, auth: Any, prefix: str) -> APIRouter:
    router = APIRouter(
        prefix=f"{prefix}/train", tags=[f"{service.policy.name}: training"], dependencies=[Depends(auth)],
        responses=TRAINING_ERRORS,
    )
    experience_router = APIRouter(route_class=_counting_route(service))
    ExperienceRequest = experience_model(service.policy)

    @router.post("/clients", response_model=ClientAnswer)
    async def register(body: Registration) -> Any:
        """Register a rollout client: answers its id, the model version to act with, and the
        exploration settings."""
        return await service.register(body.client_id, body.info)

    @router.post("/clients/{client_id}/heartbeat", response_model=ClientAnswer)
    async def heartbeat(client_id: str = Path(min_length=1, max_length=128, pattern=CLIENT_ID_PATTERN)) -> Any:
        """Tell the server the client is alive; answers the current version and state."""
        return await service.call("heartbeat", client_id)

    @experience_router.post("/experience", response_model=ExperienceAnswer)
    async def experience(body: ExperienceRequest) -> Any:  # type: ignore[valid-type]
        """Send experience: episode fragments and/or single steps. All of it is validated first;
        one malformed sample refuses the request (422) and stores nothing."""
        return await service.experience(body)

    router.include_router(experience_router)

    @router.get("/status", response_model=TrainingStatus)
    async def status() -> Any:
        """Progress: state, version, samples, clients, episode returns, last update."""
        return await service.call("status")

    @router.post("/start", response_model=TrainingStatus)
    async def start() -> Any:
        """Start (or continue) training."""
        return await service.call("start")

    @router.post("/pause", response_model=TrainingStatus)
    async def pause() -> Any:
        """Pause: no updates, and experience is refused (409) until started again."""
        return await service.call("pause")

    @router.post("/stop", response_model=TrainingStatus)
    async def stop() -> Any:
        """Stop and write the checkpoint `final`; the policy keeps being served."""
        return await service.call("stop")

    @router.post("/save", response_model=Saved)
    async def save() -> Any:
        """Write a checkpoint now (a "quicksave")."""
        return await service.call("save")

    @router.post("/resume", response_model=TrainingStatus)
    async def resume(body: Resume) -> Any:
        """Load a checkpoint (weights, optimiser, normaliser, statistics) and serve its weights."""
        return await service.call("resume", body.checkpoint)

    @router.get("/checkpoints", response_model=Checkpoints)
    async def checkpoints() -> Any:
        """The checkpoints written so far."""
        return await service.call("checkpoints")

    return router


def untrainable_router(policy: str, auth: Any, prefix: str) -> APIRouter:
    """Training paths of a policy without a `training` section answer a clear 404."""
    router = APIRouter(prefix=prefix, dependencies=[Depends(auth)])

    @router.api_route("/train/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
    async def not_trainable(rest: str) -> None:
        raise NotTrainable(f"policy {policy!r} is not trained by this server: its schema has no `training` section")

    return router


def model_router(service: PolicyService, auth: Any, prefix: str, model: bytes, fmt: str) -> APIRouter:
    """The model file and its current weights, for clients that act locally."""
    router = APIRouter(prefix=prefix, tags=[service.policy.name], dependencies=[Depends(auth)], responses=ERRORS)

    @router.get("/model", response_class=Response, responses={200: {"content": {"application/octet-stream": {}}}})
    async def get_model() -> Response:
        """The model file as served at version 0 (`X-Model-Format`: `export` or `torchscript`);
        load it with `torch.export.load` or `torch.jit.load`, then apply `/weights`."""
        return Response(model, media_type="application/octet-stream", headers={"X-Model-Format": fmt})

    @router.get("/weights", response_model=Weights, responses={304: {"description": "Not modified."}})
    async def get_weights(if_none_match: str | None = Header(None)) -> Response:
        """The weights served now and their version. Send `If-None-Match: "<version>"` to get a
        304 when the version has not changed."""
        backend = service.require_backend()
        if if_none_match is not None and if_none_match.strip('W/"') == str(await backend.version()):
            return Response(status_code=304, headers={"ETag": if_none_match})
        weights, version = await backend.snapshot()
        return JSONResponse(
            {"model_version": version, "weights": encode_weights(weights)}, headers={"ETag": f'"{version}"'}
        )

    @router.get("/version", response_model=Version)
    async def get_version() -> Any:
        """The model version served now."""
        return {"model_version": await service.require_backend().version()}

    return router
