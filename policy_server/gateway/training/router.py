"""Endpoints to train a policy from clients' experience, and to download the served model.

Thin handlers over ``TrainingService`` and ``PolicyService``; the paths and bodies are described
in the README's training section and in the generated OpenAPI document.
"""

# No `from __future__ import annotations`: FastAPI must see the models as real types.

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from policy_server.errors import InvalidRequest, NotTrainable
from policy_server.gateway.auth import Auth
from policy_server.gateway.errors import in_body
from policy_server.gateway.openapi import error_docs
from policy_server.gateway.policy.binary import NPY, media_type
from policy_server.gateway.policy.binary_route import binary_doc, post_with_binary
from policy_server.gateway.policy.router import ERRORS
from policy_server.gateway.training.experience import CLIENT_ID_PATTERN, experience_model
from policy_server.gateway.training.service import TrainingService
from policy_server.gateway.training.wire import (
    Checkpoints,
    ClientAnswer,
    ExperienceAnswer,
    Registration,
    Resume,
    Saved,
    TrainingStatus,
)

TRAINING_ERRORS = ERRORS | error_docs({
    404: "Unknown checkpoint.",
    409: "`stale_samples`: every sample came from too old a model version; "
    "`training_not_running`: training is paused or stopped.",
})
EXPERIENCE_DOC = binary_doc(None, (
    "Steps as safetensors (safetensors.numpy.save), one row per step: tensors `obs` and `next_obs` "
    "(N, ...) (a Dict space: `obs.<key>`), `actions` (N,) or (N, k), `rewards` (N,), optional "
    "`terminated`, `truncated` (bool, N) and `log_probs` (N,), optional action masks `action_mask` and "
    "`next_action_mask` (N, k) bool or 0/1 (a Dict space's mask entry: `obs.<key>`, `next_obs.<key>`); "
    "metadata `client_id`, `model_version` (decimal) and optional `variant`."))






















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


def training_router(service: TrainingService, auth: Auth, prefix: str) -> APIRouter:
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
        return await service.require_trainer().heartbeat(client_id)

    async def binary_experience(request: Request) -> Any:
        if media_type(request.headers.get("content-type")) == NPY:
            raise InvalidRequest.at("body", "experience is several tensors: send application/safetensors "
                                    "(obs, next_obs, actions, rewards, ...) or JSON")
        return JSONResponse(await service.experience_tensors(await request.body()))

    @post_with_binary(experience_router, "/experience", binary_experience, EXPERIENCE_DOC,
                      response_model=ExperienceAnswer)
    async def experience(body: ExperienceRequest) -> Any:  # type: ignore[valid-type]
        """Send experience: episode fragments and/or single steps. All of it is validated first;
        one malformed sample refuses the request (422) and stores nothing."""
        return await service.experience(body)

    router.include_router(experience_router)

    @router.get("/status", response_model=TrainingStatus)
    async def status() -> Any:
        """Progress: state, version, samples, clients, episode returns, last update."""
        return await service.require_trainer().status()

    @router.post("/start", response_model=TrainingStatus)
    async def start() -> Any:
        """Start (or continue) training."""
        return await service.require_trainer().start()

    @router.post("/pause", response_model=TrainingStatus)
    async def pause() -> Any:
        """Pause: no updates, and experience is refused (409) until started again."""
        return await service.require_trainer().pause()

    @router.post("/stop", response_model=TrainingStatus)
    async def stop() -> Any:
        """Stop and write the checkpoint `final`; the policy keeps being served."""
        return await service.require_trainer().stop()

    @router.post("/save", response_model=Saved)
    async def save() -> Any:
        """Write a checkpoint now (a "quicksave")."""
        return await service.require_trainer().save()

    @router.post("/resume", response_model=TrainingStatus)
    async def resume(body: Resume) -> Any:
        """Load a checkpoint (weights, optimiser, normaliser, statistics) and serve its weights."""
        return await in_body(service.require_trainer().resume(body.checkpoint))

    @router.get("/checkpoints", response_model=Checkpoints)
    async def checkpoints() -> Any:
        """The checkpoints written so far."""
        return await service.require_trainer().checkpoints()

    return router


def untrainable_router(policy: str, auth: Auth, prefix: str) -> APIRouter:
    """Training paths of a policy without a `training` section answer a clear 404."""
    router = APIRouter(prefix=prefix, dependencies=[Depends(auth)])

    @router.api_route("/train/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
    async def not_trainable(rest: str) -> None:
        raise NotTrainable(f"policy {policy!r} is not trained by this server: its schema has no `training` section")

    return router


