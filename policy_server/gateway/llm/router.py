"""Endpoints of the LLM policy (x1's policy server), the value model (x1's value server) and the
OpenAI-compatible routes. Thin handlers over ``LLMService`` and ``ValueService``."""

# No `from __future__ import annotations`: FastAPI must see the models as real types.

import copy
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from policy_server.errors import ModelError, PolicyServerError
from policy_server.gateway.auth import Auth
from policy_server.gateway.errors import in_body
from policy_server.gateway.llm.service import LLMService, ValueService
from policy_server.gateway.llm.setup import Starting
from policy_server.gateway.llm.wire import (
    DirectForward,
    DirectForwardAnswer,
    Forward,
    Message,
    ModelStatus,
    Session,
    TaskCreated,
    TaskPending,
    TaskResult,
    ValueAnswer,
    ValueForward,
)
from policy_server.gateway.openapi import AUTH_ERRORS, error_docs
from policy_server.llm.tasks import Failure
from policy_server.llm.x1_config import X1TrainingConfig
from policy_server.serving.api import X1Training

LLM_ERRORS = error_docs({
    **AUTH_ERRORS,
    404: "Unknown task or session.",
    422: "Invalid request: the envelope names each bad field.",
    429: "Too much work queued: retry after `Retry-After` seconds.",
    500: "The model failed.",
    503: "The model's deployment is not available.",
})


async def _status(model: str, version: int, trainer: Starting[X1Training] | None) -> dict[str, Any]:
    """x1's status, from the trainer when the model has one."""
    training = await trainer.require().status() if trainer is not None else None
    allow = bool(training and training["allow_training"])
    flag = bool(training and training["stop_training_flag"])
    return {
        "status": f"Server is running, ALLOW_TRAINING: {allow}, STOP_TRAINING_FLAG: {flag}",
        "allow_training": allow,
        "stop_training_flag": flag,
        "allow_inference": True,
        "model": model,
        "model_version": version,
        "training": training,
    }


def _training_routes(router: APIRouter, trainer: Starting[X1Training]) -> None:
    """x1's `/train_from_dataset` and `/stop_training` on a model that has a trainer."""

    @router.post("/train_from_dataset", status_code=201, response_model=Message,
                 responses=error_docs({403: "A training run is already going."}))
    async def train_from_dataset(body: X1TrainingConfig) -> Any:
        """Train on the samples (or a dataset file under the server's data folder) in the
        background; serving goes on, and the trained weights become the next model version."""
        return await in_body(trainer.require().start(body))

    @router.post("/stop_training", response_model=Message)
    async def stop_training() -> Any:
        """Interrupt the run before its next step, save the model and publish it."""
        return await trainer.require().stop()


def llm_router(service: LLMService, auth: Auth, prefix: str, trainer: Starting[X1Training] | None = None) -> APIRouter:
    router = APIRouter(prefix=prefix, tags=["LLM policy"], dependencies=[Depends(auth)], responses=LLM_ERRORS)

    @router.get("/", response_model=ModelStatus)
    async def status() -> Any:
        """x1's status: whether inference and training are allowed, and the training progress."""
        return await _status(service.spec.model_id, await service.require_backend().version(), trainer)

    if trainer is not None:
        _training_routes(router, trainer)

    @router.post("/direct_forward", response_model=DirectForwardAnswer, response_model_exclude_none=True)
    async def direct_forward(body: DirectForward) -> Any:
        """Generate for a prompt and answer at once: the texts and the stop string each ended on."""
        return await in_body(service.direct_forward(body))  # the engine names its fields from the params

    @router.post("/forward", status_code=201, response_model=TaskCreated)
    async def forward(body: Forward) -> Any:
        """Queue one step (or, with `full_simulation`, the whole answer) for a question and the
        steps so far; fetch it from `GET /forward/{task_id}`."""
        return {"task_id": await service.submit_task(body)}

    @router.get(
        "/forward/{task_id}",
        response_model=TaskResult,
        response_model_exclude_none=True,
        responses={202: {"model": TaskPending, "description": "Still generating: ask again."}},
    )
    async def forward_result(task_id: str) -> Any:
        """The result of a queued task, handed out once: kept until fetched, or until it expires. A
        task still generating answers 202 `pending`; an unknown, expired or already fetched id 404;
        a task whose replica died before it was fetched 410 `task_lost` (submit it again)."""
        view = await service.require_tasks().task(task_id)
        if view.state == "pending":
            return JSONResponse({"task_id": task_id, "status": "pending"}, status_code=202)
        if view.state == "failed":
            raise task_failure(task_id, view.error)
        # the store forgot the task as it handed it out: a second fetch is a 404
        return JSONResponse({k: v for k, v in view.result.items() if v is not None})

    @router.get("/sessions/{session_id}", response_model=Session)
    async def session(session_id: str) -> Any:
        """The session's token records, ready for training (prompt positions masked)."""
        return {"session_id": session_id, "nodes": await service.require_tasks().session_nodes(session_id)}

    @router.delete("/sessions/{session_id}", response_model=Session)
    async def reset_session(session_id: str) -> Any:
        """Forget the session's nodes."""
        await service.require_tasks().reset_session(session_id)
        return {"session_id": session_id, "nodes": []}

    return router


def value_router(service: ValueService, auth: Auth, prefix: str, trainer: Starting[X1Training] | None = None) -> APIRouter:
    router = APIRouter(prefix=prefix, tags=["LLM value"], dependencies=[Depends(auth)], responses=LLM_ERRORS)

    @router.get("/", response_model=ModelStatus)
    async def status() -> Any:
        """x1's status of the value server, and the training progress."""
        return await _status(service.spec.path.name, await service.require_backend().version(), trainer)

    if trainer is not None:
        _training_routes(router, trainer)

    @router.post("/forward", response_model=ValueAnswer)
    async def forward(body: ValueForward) -> Any:
        """Score one conversation or a batch of them: one value in [-1, 1] each."""
        return await service.score(body.messages)

    return router


def task_failure(task_id: str, error: Failure | None) -> PolicyServerError:
    """What a failed task answers: the error it failed with (class, code and status kept), its
    message naming the task."""
    if not isinstance(error, PolicyServerError):
        return ModelError(f"task {task_id} failed: {error}")
    failure = copy.copy(error)
    failure.message = f"task {task_id} failed: {error.message}"
    failure.args = (failure.message,)
    return failure
