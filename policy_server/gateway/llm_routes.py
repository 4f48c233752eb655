"""Endpoints of the LLM policy (x1's policy server), the value model (x1's value server) and the
OpenAI-compatible routes. Thin handlers over ``LLMService`` and ``ValueService``."""

# No `from __future__ import annotations`: FastAPI must see the models as real types.

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from policy_server.errors import InvalidRequest, ModelError
from policy_server.gateway.llm_service import LLMService, ValueService, in_body
from policy_server.gateway.llm_wire import (
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    DirectForward,
    DirectForwardAnswer,
    Forward,
    GRPOPrompt,
    GRPORewards,
    GRPOStart,
    Message,
    ModelList,
    Status,
    TaskCreated,
    TaskPending,
    TaskResult,
    TrainFromDataset,
    ValueAnswer,
    ValueForward,
)
from policy_server.gateway.wire import error_docs

LLM_ERRORS = error_docs({
    403: "Missing or wrong api key.",
    404: "Unknown task or session.",
    422: "Invalid request: the envelope names each bad field.",
    429: "Too much work queued: retry after `Retry-After` seconds.",
    500: "The model failed.",
    503: "The model's deployment is not available.",
})
OPENAI_ERRORS = error_docs({
    401: "Missing or wrong api key: send `Authorization: Bearer <key>`.",
    404: "`model` names a model this server does not serve.",
    422: "Invalid request: the envelope names each bad field.",
    429: "Too much work queued: retry after `Retry-After` seconds.",
    500: "The model failed.",
    503: "The model's deployment is not available.",
})


async def _status(model: str, version: int, trainer: Any) -> dict[str, Any]:
    """x1's status, from the trainer when the model has one."""
    training = await trainer.call("status") if trainer is not None else None
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


def _training_routes(router: APIRouter, trainer: Any) -> None:
    """x1's `/train_from_dataset` and `/stop_training` on a model that has a trainer."""

    @router.post("/train_from_dataset", status_code=201, response_model=Message,
                 responses=error_docs({403: "A training run is already going."}))
    async def train_from_dataset(body: TrainFromDataset) -> Any:
        """Train on the samples (or a dataset file under the server's data folder) in the
        background; serving goes on, and the trained weights become the next model version."""
        return await in_body(trainer.call("start", body))

    @router.post("/stop_training", response_model=Message)
    async def stop_training() -> Any:
        """Interrupt the run before its next step, save the model and publish it."""
        return await trainer.call("stop")


def llm_router(service: LLMService, auth: Any, prefix: str, trainer: Any = None) -> APIRouter:
    router = APIRouter(prefix=prefix, tags=["LLM policy"], dependencies=[Depends(auth)], responses=LLM_ERRORS)

    @router.get("/", response_model=Status)
    async def status() -> Any:
        """x1's status: whether inference and training are allowed, and the training progress."""
        return await _status(service.spec.model_id, await service.require_backend().version(), trainer)

    if trainer is not None:
        _training_routes(router, trainer)

    @router.post("/direct_forward", response_model=DirectForwardAnswer, response_model_exclude_none=True)
    async def direct_forward(body: DirectForward) -> Any:
        """Generate for a prompt and answer at once: the texts and the stop string each ended on."""
        return await service.direct_forward(body)

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
        task still generating answers 202 `pending`; an unknown, expired or already fetched id 404."""
        view = await service.call_state("task", task_id)
        if view["state"] == "pending":
            return JSONResponse({"task_id": task_id, "status": "pending"}, status_code=202)
        if view["state"] == "failed":
            raise ModelError(f"task {task_id} failed: {view['error']}")
        # the state forgot the task as it handed it out: a second fetch is a 404
        return JSONResponse({k: v for k, v in view["result"].items() if v is not None})

    @router.get("/sessions/{session_id}")
    async def session(session_id: str) -> Any:
        """The session's token records, ready for training (prompt positions masked)."""
        return {"session_id": session_id, "nodes": await service.call_state("session_nodes", session_id)}

    @router.delete("/sessions/{session_id}")
    async def reset_session(session_id: str) -> Any:
        """Forget the session's nodes."""
        await service.call_state("reset_session", session_id)
        return {"session_id": session_id, "nodes": []}

    return router


def value_router(service: ValueService, auth: Any, prefix: str, trainer: Any = None) -> APIRouter:
    router = APIRouter(prefix=prefix, tags=["LLM value"], dependencies=[Depends(auth)], responses=LLM_ERRORS)

    @router.get("/", response_model=Status)
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


def openai_router(service: LLMService, auth: Any, prefix: str) -> APIRouter:
    router = APIRouter(prefix=f"{prefix}/v1", tags=["OpenAI-compatible"], dependencies=[Depends(auth)],
                       responses=OPENAI_ERRORS)

    @router.get("/models", response_model=ModelList)
    async def models() -> Any:
        """The served model, as OpenAI's model list."""
        return {"object": "list", "data": [
            {"id": service.spec.model_id, "object": "model", "created": 0, "owned_by": "policy-server"}
        ]}

    @router.post("/completions", response_model=Completion)
    async def completions(body: CompletionRequest) -> Any:
        """OpenAI's completions: `prompt`, `n`, `temperature`, `top_p`, `max_tokens`, `stop`, `logprobs`."""
        _no_stream(body.stream)
        return await service.completions(body)

    @router.post("/chat/completions", response_model=ChatCompletion)
    async def chat(body: ChatRequest) -> Any:
        """OpenAI's chat completions: `messages`, `n`, `temperature`, `top_p`, `max_tokens`, `stop`, `logprobs`."""
        _no_stream(body.stream)
        return await service.chat(body)

    return router


def _no_stream(stream: bool) -> None:
    if stream:
        raise InvalidRequest.at("body.stream", "streaming is not supported; send stream=false")


def grpo_router(service: Any, auth: Any, prefix: str) -> APIRouter:
    """grpo_server's control-flow reversal: the server hands out completions, the client scores
    them and sends the rewards back, and each reward submission is one training cycle."""
    router = APIRouter(prefix=f"{prefix}/grpo/runs", tags=["LLM GRPO"], dependencies=[Depends(auth)],
                       responses=LLM_ERRORS | error_docs({409: "Run finished, stale group, or too many runs."}))

    @router.post("", status_code=201)
    async def start(body: GRPOStart) -> Any:
        """Start a run with these settings; answers its `run_id` and status."""
        return await service.call("start", body)

    @router.get("")
    async def runs() -> Any:
        """The runs this server knows."""
        return {"runs": await service.call("list")}

    @router.post("/{run_id}/completions")
    async def completions(run_id: str, body: GRPOPrompt) -> Any:
        """A group of completions of the prompt, with their token ids and logprobs and the
        `model_version` `[run_id, cycle]` that made them."""
        return await in_body(service.call("complete", run_id, body.prompt))

    @router.post("/{run_id}/rewards")
    async def rewards(run_id: str, body: GRPORewards) -> Any:
        """The rewards of a group (scored by the client): one training cycle; answers the version
        now training, the loss and the group's mean reward."""
        return await in_body(service.call("rewards", run_id, body.group_id, body.rewards))

    @router.get("/{run_id}")
    async def status(run_id: str) -> Any:
        """Counters, cycle, mean reward and the reward history."""
        return await service.call("status", run_id)

    @router.post("/{run_id}/stop")
    async def stop(run_id: str) -> Any:
        """Write the final checkpoint and finish the run."""
        return await service.call("stop", run_id)

    @router.get("/{run_id}/model", response_class=Response,
                responses={200: {"content": {"application/gzip": {}}}})
    async def model(run_id: str) -> Response:
        """The run's current model (for LoRA, the adapter) and tokenizer, as a .tar.gz."""
        data = await service.call("archive", run_id)
        return Response(data, media_type="application/gzip",
                        headers={"Content-Disposition": f'attachment; filename="{run_id}.tar.gz"'})

    return router
