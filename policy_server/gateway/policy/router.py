"""The endpoints of one policy, generated from its observation model. Handlers stay thin."""

# No `from __future__ import annotations`: FastAPI must see the generated models as real types.

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from policy_server.errors import InvalidRequest
from policy_server.gateway.auth import Auth
from policy_server.gateway.openapi import AUTH_ERRORS, error_docs
from policy_server.gateway.policy.binary import media_type, observation_docs, observations
from policy_server.gateway.policy.binary_route import binary_doc, post_with_binary
from policy_server.gateway.policy.service import Inputs, Mode, PolicyService, masks_of
from policy_server.gateway.policy.wire import (
    ActionResponse,
    BatchActionResponse,
    BatchDistributionResponse,
    DistributionResponse,
    ForcedVariant,
    batch_model,
    raw_batch_model,
    raw_model,
    space_batch_model,
    space_model,
)
from policy_server.policies.spaces import ActionSample
from policy_server.schema.space_inputs import json_schema

ROWS = "body.observations"
BinaryEndpoint = Callable[..., Awaitable[JSONResponse]]
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])
ERRORS = error_docs({
    **AUTH_ERRORS,
    409: "`no_candidate`: `X-Policy-Version: canary` for a policy without a candidate version.",
    413: "Body too large.",
    415: "A `Content-Type` other than application/json, application/x-npy and application/safetensors.",
    422: "Invalid observation: the envelope names each bad field (a binary body: the tensor; an action mask of "
         "the wrong width, or one that allows no action in a component). Code `model_overflow`: valid "
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


def action_answer(sample: ActionSample, version: int, variant: str, policy_id: str | None = None) -> JSONResponse:
    """The answer of ``/predict`` and its kin: one action, ``actions``, the model version, the
    policy's version (variant) that chose it (and the policy id of a ``policies_dir`` policy)."""
    return _answer(_action(sample) | _versioned(version, variant, policy_id))


def _versioned(version: int, variant: str, policy_id: str | None) -> dict[str, Any]:
    """What every answer names: the model version, the variant, and a ``policies_dir`` policy's id."""
    named = {"model_version": version, "variant": variant}
    return named if policy_id is None else named | {"policy_id": policy_id}


@dataclass(frozen=True)
class Pick:
    """Which model answers a request: a ``policies_dir`` policy's id, and the version forced by
    ``X-Policy-Version`` (None: the routing picks)."""

    policy_id: str | None
    forced: Any


async def no_policy_id() -> None:
    """A policy with one model: no policy id to select."""


SelectId = Callable[..., Awaitable[str | None]]


def policy_router(
    service: PolicyService, auth: Auth, max_batch: int, prefix: str, select_id: SelectId = no_policy_id
) -> APIRouter:
    """All endpoints of one policy under ``prefix`` (routes keep their full path, for metrics);
    ``select_id``, a dependency, reads the policy id of a ``policies_dir`` policy (a header, a path
    parameter: ``gateway.policy.multiplexed``)."""
    policy = service.policy
    if policy.recurrent is not None:
        from policy_server.gateway.policy.recurrent_router import recurrent_router  # it imports this module

        return recurrent_router(service, auth, max_batch, prefix, select_id)
    router = APIRouter(prefix=prefix, tags=[policy.name], dependencies=[Depends(auth)], responses=ERRORS)
    PolicyId = Annotated[str | None, Depends(select_id)]

    async def pick(policy_id: PolicyId, forced: ForcedVariant = None) -> Pick:
        return Pick(policy_id, forced)

    Picked = Annotated[Pick, Depends(pick)]

    async def act(obs: Any, mode: Mode, chosen: Pick, rows: list[str], mask: Any = None,
                  mask_at: list[str] | None = None) -> JSONResponse:
        samples, version, variant = await service.act(obs, mode, rows, chosen.policy_id, chosen.forced, mask, mask_at)
        return action_answer(samples[0], version, variant, chosen.policy_id)

    async def act_batch(obs: Any, mode: Mode, chosen: Pick, rows: list[str], mask: Any = None,
                        mask_at: list[str] | None = None) -> JSONResponse:
        samples, version, variant = await service.act(obs, mode, rows, chosen.policy_id, chosen.forced, mask, mask_at)
        return _answer({"results": [_action(s) for s in samples]} | _versioned(version, variant, chosen.policy_id))

    async def distribute(obs: Any, chosen: Pick, rows: list[str], batched: bool, mask: Any = None) -> JSONResponse:
        dists, version, variant = await service.distribution(obs, rows, chosen.policy_id, chosen.forced, mask)
        answer = {"results": dists} if batched else dists[0]
        return _answer(answer | _versioned(version, variant, chosen.policy_id))

    def binary(mode: Mode | None, batched: bool) -> BinaryEndpoint:
        """The endpoint of a route's binary bodies (``mode`` None: ``/distribution``)."""
        async def endpoint(request: Request, chosen: Picked) -> JSONResponse:
            body, media = await request.body(), media_type(request.headers.get("content-type"))
            obs, mask, rows = observations(body, media, policy, batched, max_batch)
            if mode is None:
                return await distribute(obs, chosen, rows, batched, mask)
            return await (act_batch if batched else act)(obs, mode, chosen, rows, mask)

        return endpoint

    def post(path: str, mode: Mode | None, response_model: Any) -> Callable[[Endpoint], Endpoint]:
        batched = path.endswith("/batch")
        doc = binary_doc(*observation_docs(policy, max_batch, batched))
        return post_with_binary(router, path, binary(mode, batched), doc, response_model=response_model)

    width = policy.space.mask_width
    Raw = raw_model(policy.model_prefix, policy.obs_dim, width)
    RawBatch = raw_batch_model(policy.model_prefix, policy.obs_dim, max_batch, width)

    @post("/predict_raw", "sample", ActionResponse)
    async def predict_raw(body: Raw, chosen: Picked) -> JSONResponse:  # type: ignore[valid-type]
        """Sample an action for a flat input vector (width checked, no field validation)."""
        mask = masks_of([getattr(body, "action_mask", None)], width)
        return await act(service.from_raw([body.obs]), "sample", chosen, ["body.obs"], mask, ["body.action_mask"])  # type: ignore[attr-defined]

    @post("/predict_raw/batch", "sample", BatchActionResponse)
    async def predict_raw_batch(body: RawBatch, chosen: Picked) -> JSONResponse:  # type: ignore[valid-type]
        """Sample one action per flat input vector, in one forward pass."""
        obs = service.from_raw(body.obs)  # type: ignore[attr-defined]
        masks = getattr(body, "action_mask", None)
        if masks is not None and len(masks) != len(obs):
            raise InvalidRequest.at("body.action_mask", f"{len(masks)} masks for {len(obs)} observations")
        mask = None if masks is None else masks_of(masks, width)
        return await act_batch(obs, "sample", chosen, rows_at("body.obs", len(obs)), mask,
                               rows_at("body.action_mask", len(obs)))

    inputs = _inputs(service, max_batch)
    if inputs is None:
        return router
    Observation, Batch, one, many, field, rows_field = inputs

    @post("/predict", "sample", ActionResponse)
    async def predict(obs: Observation, chosen: Picked) -> JSONResponse:  # type: ignore[valid-type]
        """Sample an action from the policy; answers its probability and the model version."""
        rows, mask = one(obs)
        return await act(rows, "sample", chosen, [field], mask)

    @post("/predict_deterministic", "deterministic", ActionResponse)
    async def predict_deterministic(obs: Observation, chosen: Picked) -> JSONResponse:  # type: ignore[valid-type]
        """The most likely action: argmax per component (of the allowed actions), the mean for a
        continuous action."""
        rows, mask = one(obs)
        return await act(rows, "deterministic", chosen, [field], mask)

    @post("/distribution", None, DistributionResponse)
    async def distribution(obs: Observation, chosen: Picked) -> JSONResponse:  # type: ignore[valid-type]
        """The exact action distribution, computed from the model's logits."""
        rows, mask = one(obs)
        return await distribute(rows, chosen, [field], False, mask)

    @post("/predict/batch", "sample", BatchActionResponse)
    async def predict_batch(body: Batch, chosen: Picked) -> JSONResponse:  # type: ignore[valid-type]
        """Sample one action per observation, all in one forward pass."""
        rows, mask = many(body)
        return await act_batch(rows, "sample", chosen, rows_at(rows_field, len(rows)), mask)

    @post("/predict_deterministic/batch", "deterministic", BatchActionResponse)
    async def predict_deterministic_batch(body: Batch, chosen: Picked) -> JSONResponse:  # type: ignore[valid-type]
        """The most likely action for each observation, in one forward pass."""
        rows, mask = many(body)
        return await act_batch(rows, "deterministic", chosen, rows_at(rows_field, len(rows)), mask)

    @post("/distribution/batch", None, BatchDistributionResponse)
    async def distribution_batch(body: Batch, chosen: Picked) -> JSONResponse:  # type: ignore[valid-type]
        """The exact action distribution for each observation, in one forward pass."""
        rows, mask = many(body)
        return await distribute(rows, chosen, rows_at(rows_field, len(rows)), True, mask)

    return router


Read = Callable[[Any], Inputs]


def _inputs(service: PolicyService, max_batch: int) -> tuple[Any, Any, Read, Read, str, str] | None:
    """The request models of the observation routes, how each body becomes model inputs, and the
    field of one observation and of a batch's rows: Pathmind's observation object (the whole
    body; batches under ``observations``), or ``obs`` of a Gymnasium space (None: neither, the
    policy has only the raw routes)."""
    policy = service.policy
    if policy.observation_model is not None:
        return (
            policy.observation_model, batch_model(policy.observation_model, max_batch),
            lambda obs: (service.from_observations([obs]), service.mask_of([obs])),
            lambda body: (service.from_observations(body.observations), service.mask_of(body.observations)),
            "body", ROWS,
        )
    if policy.obs_space is None:
        return None
    schema, width = json_schema(policy.obs_space), policy.space.mask_width or None
    return (
        space_model(policy.model_prefix, schema, width), space_batch_model(policy.model_prefix, schema, width, max_batch),
        lambda body: service.from_space(body.obs, "body.obs", body.action_mask),
        lambda body: service.from_space(body.obs, "body.obs", body.action_mask, batch=True),
        "body.obs", "body.obs",
    )
