"""The LLM policy's x1 endpoints (``/llm/...``: forward, tasks, sessions, training) and the value
model's (``/value/...``)."""

from fastapi import FastAPI

from policy_server.gateway.auth import Auth
from policy_server.gateway.llm.router import llm_router, value_router
from policy_server.gateway.llm.setup import LLMServices


def mount(app: FastAPI, llm: LLMServices, auth: Auth, prefix: str) -> None:
    if llm.policy is not None:
        app.include_router(llm_router(llm.policy, auth, f"{prefix}/{llm.policy.spec.route_prefix}", llm.x1_policy))
    if llm.value is not None:
        app.include_router(value_router(llm.value, auth, f"{prefix}/{llm.value.spec.route_prefix}", llm.x1_value))
