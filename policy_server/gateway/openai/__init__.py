"""OpenAI's API on the LLM policy (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``)
and vLLM's native ``/generate``."""

from fastapi import FastAPI

from policy_server.gateway.auth import Auth
from policy_server.gateway.llm.service import LLMService
from policy_server.gateway.openai.native import native_router
from policy_server.gateway.openai.router import openai_router
from policy_server.gateway.openai.service import OpenAIService


def mount(app: FastAPI, llm: LLMService | None, bearer: Auth, prefix: str) -> None:
    if llm is not None:
        app.include_router(openai_router(OpenAIService(llm), bearer, prefix))
        app.include_router(native_router(llm, bearer, prefix))
