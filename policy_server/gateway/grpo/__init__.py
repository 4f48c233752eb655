"""GRPO runs on the LLM policy (``/llm/grpo/runs/...``)."""

from fastapi import FastAPI

from policy_server.gateway.auth import Auth
from policy_server.gateway.grpo.router import grpo_router
from policy_server.gateway.llm.setup import LLMServices


def mount(app: FastAPI, llm: LLMServices, auth: Auth, prefix: str) -> None:
    if llm.policy is not None and llm.grpo is not None:
        app.include_router(grpo_router(llm.grpo, auth, f"{prefix}/{llm.policy.spec.route_prefix}"))
