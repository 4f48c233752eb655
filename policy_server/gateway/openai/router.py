"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/models/{id}``, ``/v1/completions``,
``/v1/chat/completions``. Thin handlers over ``OpenAIService``; ``stream: true`` answers with
server-sent events (``data: {chunk}`` ... ``data: [DONE]``)."""

import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from policy_server.errors import PolicyServerError
from policy_server.gateway.auth import Auth
from policy_server.gateway.errors import openai_error
from policy_server.gateway.openai.service import OpenAIService
from policy_server.gateway.openai.wire import (
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionRequest,
    ModelList,
    OpenAIError,
    OpenAIModel,
)

log = logging.getLogger(__name__)

OPENAI_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIError, "description": text} for status, text in {
        400: "Invalid request: `param` names the field as the request named it.",
        401: "Missing or wrong api key: send `Authorization: Bearer <key>`.",
        404: "`model` names a model this server does not serve.",
        429: "Too much work queued: retry after `Retry-After` seconds.",
        500: "The model failed.",
        503: "The model's deployment is not available.",
    }.items()
}
STREAMED = {"text/event-stream": {"description": "With `stream: true`: the chunks as server-sent events."}}


def openai_router(service: OpenAIService, auth: Auth, prefix: str) -> APIRouter:
    router = APIRouter(prefix=f"{prefix}/v1", tags=["OpenAI-compatible"], dependencies=[Depends(auth)],
                       responses=OPENAI_ERRORS)

    @router.get("/models", response_model=ModelList)
    async def models() -> Any:
        """The served model and its adapters (`llm.policy.adapters`), as OpenAI's model list."""
        return {"object": "list", "data": service.models()}

    @router.get("/models/{model_id}", response_model=OpenAIModel)
    async def model(model_id: str) -> Any:
        """One served model (the policy or one of its adapters); 404 for another id."""
        return service.model(model_id)

    @router.post("/completions", response_model=Completion, responses={200: {"content": STREAMED}})
    async def completions(body: CompletionRequest) -> Any:
        """OpenAI's completions (see `CompletionRequest` for the fields; `stream: true` for events)."""
        prompts = service.completion_prompts(body)
        if body.stream:
            return await _event_stream(service.completion_events(body, prompts))
        return await service.completions(body, prompts)

    @router.post("/chat/completions", response_model=ChatCompletion, responses={200: {"content": STREAMED}})
    async def chat(body: ChatRequest) -> Any:
        """OpenAI's chat completions (see `ChatRequest` for the fields; `stream: true` for events)."""
        prompt = service.chat_prompt(body)
        if body.stream:
            return await _event_stream(service.chat_events(body, prompt))
        return await service.chat(body, prompt)

    return router


async def _event_stream(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """``chunks`` as server-sent events. The first chunk is awaited here, so that a request the
    engine refuses still gets its HTTP error; a later error becomes an ``error`` event."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await chunks.aclose()  # type: ignore[attr-defined]
        raise
    return StreamingResponse(_events(first, chunks), media_type="text/event-stream")


async def _events(first: dict[str, Any] | None, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    # closing `chunks` (also when the client disconnects: Starlette cancels this) ends generation
    async with aclosing(chunks):  # type: ignore[type-var]
        try:
            if first is not None:
                yield _event(first)
            async for chunk in chunks:
                yield _event(chunk)
        except PolicyServerError as exc:
            field = exc.fields[0].field if exc.fields else None
            yield _event(openai_error(exc.status, exc.code, exc.message, field))
        except Exception as exc:  # after the headers went out: an event, never a dropped connection
            log.exception("unhandled error while streaming")
            yield _event(openai_error(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log", None))
    yield "data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"
