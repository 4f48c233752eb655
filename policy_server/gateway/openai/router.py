"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``. Thin handlers over ``OpenAIService``."""


from typing import Any

from fastapi import APIRouter, Depends

from policy_server.errors import InvalidRequest
from policy_server.gateway.auth import Auth
from policy_server.gateway.openai.service import OpenAIService
from policy_server.gateway.openai.wire import (
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    ModelList,
)
from policy_server.gateway.openapi import error_docs

OPENAI_ERRORS = error_docs({
    401: "Missing or wrong api key: send `Authorization: Bearer <key>`.",
    404: "`model` names a model this server does not serve.",
    422: "Invalid request: the envelope names each bad field.",
    429: "Too much work queued: retry after `Retry-After` seconds.",
    500: "The model failed.",
    503: "The model's deployment is not available.",
})


def openai_router(service: OpenAIService, auth: Auth, prefix: str) -> APIRouter:
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
