"""A policy's endpoints: acting (``/predict``, ``/distribution`` and their batch and raw forms),
``/collect_experience``, the model file and weights, and its versions (``/versions``)."""

from fastapi import FastAPI

from policy_server.gateway.auth import Auth
from policy_server.gateway.policy.collect import collect_router
from policy_server.gateway.policy.model import model_router
from policy_server.gateway.policy.multiplexed import MultiplexedPolicyService, mount_multiplexed
from policy_server.gateway.policy.router import policy_router
from policy_server.gateway.policy.service import PolicyService
from policy_server.gateway.policy.versions_router import versions_router
from policy_server.gateway.training.service import TrainingService
from policy_server.policies.torch_policy import model_format


def mount(app: FastAPI, service: PolicyService, training: TrainingService | None, auth: Auth,
          max_batch: int, prefixes: list[str]) -> None:
    """The policy's routes under each of ``prefixes`` (``/policies/<name>``, and ``""`` for the default)."""
    if isinstance(service, MultiplexedPolicyService):
        mount_multiplexed(app, service, auth, max_batch, prefixes)
        return
    spec = service.policy.spec
    model, fmt = spec.model.read_bytes(), model_format(spec.model)
    for prefix in prefixes:
        app.include_router(policy_router(service, auth, max_batch, prefix))
        if service.policy.recurrent is None:  # /collect_experience keeps no recurrent state (yet)
            app.include_router(collect_router(service, training, auth, prefix))
        app.include_router(model_router(service, auth, prefix, model, fmt))
        app.include_router(versions_router(service, training, auth, prefix))
