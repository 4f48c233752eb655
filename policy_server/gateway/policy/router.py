"""The endpoints of one policy, generated from its observation model. Handlers stay thin."""

# No `from __future__ import annotations`: FastAPI must see the generated models as real types.

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from policy_server.gateway.auth import Auth
from policy_server.gateway.openapi import AUTH_ERRORS, error_docs
from policy_server.gateway.policy.service import Mode, PolicyService
from policy_server.gateway.policy.wire import (
    ActionResponse,
    BatchActionResponse,
    BatchDistributionResponse,
    DistributionResponse,
    ForcedVariant,
    batch_model,
    raw_batch_model,
    raw_model,
)
from policy_server.policies.spaces import ActionSample

ERRORS = error_docs({
    **AUTH_ERRORS,
    409: "`no_candidate`: `X-Policy-Version: canary` for a policy without a candidate version.",
    413: "Body too large.",
    422: "Invalid observation: the envelope names each bad field. Code `model_overflow`: valid "
         "values that overflow the model's float32 layers (a bound of its weights).",
    500: "The model failed.",
    503: "The policy's deployment is not available.",
})


def _action(sample: ActionSample) -> dict[str, Any]:
    actions = sample.action if isinstance(sample.action, list) else [sample.action]
    answer = {"action": sample.action, "actions": actions, "log_prob": sample.log_prob}
    if sample.action_name is not None:
        answer["action_name"] = sample.action_name
    if sample.probability is not None:
        answer["probability"] = sample.probability
    return answer


def _answer(content: dict[str, Any]) -> JSONResponse:
    """Answers are built by our own code to match the documented response models (a test checks
    them); returning them directly skips re-validating them, about a tenth of the gateway's time
    for a 256-observation request."""
    return JSONResponse(content)


def rows_at(field: str, n: int) -> list[str]:
    """Where each of ``n`` batched rows is in the request: ``body.observations.0``, ..."""
    return [f"{field}.{i}" for i in range(n)]


def action_answer(sample: ActionSample, version: int, variant: str) -> JSONResponse:
    """The answer of ``/predict`` and its kin: one action, ``actions``, the model version and the
    policy's version (variant) that chose it."""
    return _answer(_action(sample) | {"model_version": version, "variant": variant})


def policy_router(service: PolicyService, auth: Auth, max_batch: int, prefix: str) -> APIRouter:
    """All endpoints of one policy under ``prefix`` (routes keep their full path, for metrics)."""
    policy = service.policy
    router = APIRouter(prefix=prefix, tags=[policy.name], dependencies=[Depends(auth)], responses=ERRORS)

    async def act(obs: Any, mode: Mode, forced: Any, where: str = "body") -> JSONResponse:
        samples, version, variant = await service.act(obs, mode, [where], forced)
        return action_answer(samples[0], version, variant)

    async def act_batch(obs: Any, mode: Mode, forced: Any, where: str = "body.observations") -> JSONResponse:
        samples, version, variant = await service.act(obs, mode, rows_at(where, len(obs)), forced)
        return _answer({"results": [_action(s) for s in samples], "model_version": version, "variant": variant})

    Raw = raw_model(policy.model_prefix, policy.obs_dim)
    RawBatch = raw_batch_model(policy.model_prefix, policy.obs_dim, max_batch)

    @router.post("/predict_raw", response_model=ActionResponse)
    async def predict_raw(body: Raw, forced: ForcedVariant = None) -> JSONResponse:  # type: ignore[valid-type]
        """Sample an action for a flat input vector (width checked, no field validation)."""
        return await act(service.from_raw([body.obs]), "sample", forced, "body.obs")  # type: ignore[attr-defined]

    @router.post("/predict_raw/batch", response_model=BatchActionResponse)
    async def predict_raw_batch(body: RawBatch, forced: ForcedVariant = None) -> JSONResponse:  # type: ignore[valid-type]
        """Sample one action per flat input vector, in one forward pass."""
        return await act_batch(service.from_raw(body.obs), "sample", forced, "body.obs")  # type: ignore[attr-defined]

    if policy.observation_model is None:
        return router
    Observation = policy.observation_model
    Batch = batch_model(Observation, max_batch)

    @router.post("/predict", response_model=ActionResponse)
    async def predict(obs: Observation, forced: ForcedVariant = None) -> JSONResponse:  # type: ignore[valid-type]
        """Sample an action from the policy; answers its probability and the model version."""
        return await act(service.from_observations([obs]), "sample", forced)

    @router.post("/predict_deterministic", response_model=ActionResponse)
    async def predict_deterministic(obs: Observation, forced: ForcedVariant = None) -> JSONResponse:  # type: ignore[valid-type]
        """The most likely action: argmax per component, the mean for a continuous action."""
        return await act(service.from_observations([obs]), "deterministic", forced)

    @router.post("/distribution", response_model=DistributionResponse)
    async def distribution(obs: Observation, forced: ForcedVariant = None) -> JSONResponse:  # type: ignore[valid-type]
        """The exact action distribution, computed from the model's logits."""
        dists, version, variant = await service.distribution(service.from_observations([obs]), ["body"], forced)
        return _answer(dists[0] | {"model_version": version, "variant": variant})

    @router.post("/predict/batch", response_model=BatchActionResponse)
    async def predict_batch(body: Batch, forced: ForcedVariant = None) -> JSONResponse:  # type: ignore[valid-type]
        """Sample one action per observation, all in one forward pass."""
        return await act_batch(service.from_observations(body.observations), "sample", forced)  # type: ignore[attr-defined]

    @router.post("/predict_deterministic/batch", response_model=BatchActionResponse)
    async def predict_deterministic_batch(body: Batch, forced: ForcedVariant = None) -> JSONResponse:  # type: ignore[valid-type]
        """The most likely action for each observation, in one forward pass."""
        return await act_batch(service.from_observations(body.observations), "deterministic", forced)  # type: ignore[attr-defined]

    @router.post("/distribution/batch", response_model=BatchDistributionResponse)
    async def distribution_batch(body: Batch, forced: ForcedVariant = None) -> JSONResponse:  # type: ignore[valid-type]
        """The exact action distribution for each observation, in one forward pass."""
        observations = body.observations  # type: ignore[attr-defined]
        dists, version, variant = await service.distribution(
            service.from_observations(observations), rows_at("body.observations", len(observations)), forced)
        return _answer({"results": dists, "model_version": version, "variant": variant})

    return router
