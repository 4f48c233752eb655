"""A policy's training endpoints (``/train/...``): clients, experience, control and checkpoints."""

from fastapi import FastAPI

from policy_server.gateway.auth import Auth
from policy_server.gateway.training.router import training_router, untrainable_router
from policy_server.gateway.training.service import TrainingService


def mount(app: FastAPI, policy: str, training: TrainingService | None, auth: Auth, prefixes: list[str]) -> None:
    """The training routes under each prefix; a clear 404 on each for a policy without training."""
    for prefix in prefixes:
        if training is not None:
            app.include_router(training_router(training, auth, prefix))
        else:
            app.include_router(untrainable_router(policy, auth, prefix))
