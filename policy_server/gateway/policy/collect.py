"""``POST /collect_experience``: Pathmind's acting-and-learning loop, one call per environment step.

The client sends the observation it sees with the reward and ``done`` of its previous action and
gets the next action, in ``/predict``'s answer (Pathmind's clients read ``actions[0]``). When the
policy has a ``training:`` section, its trainer pairs the calls of each client into steps
(``policy_server.training.collect``); the pending step lives in the trainer, not in the gateway,
so any number of gateway processes may serve one client.
"""

# No `from __future__ import annotations`: FastAPI must see the generated models as real types.

import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, WithJsonSchema, create_model

from policy_server.fields import STRICT, Float32, StrictBool
from policy_server.gateway.auth import Auth
from policy_server.gateway.openapi import error_docs
from policy_server.gateway.policy.router import ERRORS, action_answer
from policy_server.gateway.policy.service import PolicyService, masks_of
from policy_server.gateway.policy.wire import MASK_DOC, ActionResponse, ForcedVariant
from policy_server.gateway.training.experience import CLIENT_ID_PATTERN
from policy_server.gateway.training.service import TrainingService
from policy_server.policies.served import ServedPolicy
from policy_server.schema.space_inputs import json_schema

DESCRIPTION = """Act for the observation (a sampled action, as `/predict` answers it) and learn from
the step it ends: Pathmind's training loop, one call per environment step.

Send the observation you see now with the `reward` and `done` of your previous action; read the
next action from `actions[0]` (or `action`). The server pairs each call with your previous one
into a step (obs, action, reward, next obs, done) and hands the steps of a policy with a
`training` section to its trainer; `done` ends the episode (terminated), and the next call starts
a new one. Send a distinct `client_id` per environment when several run from one address. This
policy {trains}. With a candidate version (`canary`), each episode is acted by one version, picked
at its first call."""
COLLECT_ERRORS = ERRORS | error_docs({503: "The policy's deployment or its trainer is not available."})
ClientId = Annotated[str, Field(min_length=1, max_length=128, pattern=CLIENT_ID_PATTERN)]


def collect_model(policy: ServedPolicy) -> type[BaseModel]:
    """The body: ``observation`` (the schema's observation object, one observation of the
    policy's ``observation_space``, or a flat list of ``obs_dim`` numbers when the schema names
    neither), ``reward``, ``done``, an optional ``client_id``, and, beside an observation that is no
    object of the schema's (whose model holds the mask itself), an optional ``action_mask``."""
    mask: dict[str, Any] = {}
    if policy.observation_model is not None:
        observation: Any = (policy.observation_model, Field(description="What the client sees now."))
    elif policy.obs_space is not None:
        observation = (Annotated[Any, WithJsonSchema(json_schema(policy.obs_space))],
                       Field(description="What the client sees now: one observation of the policy's space."))
    else:
        flat = Annotated[list[Float32], Field(min_length=policy.obs_dim, max_length=policy.obs_dim)]
        observation = (flat, Field(description="What the client sees now: the flat input vector."))
    width = policy.space.mask_width
    if width and policy.observation_model is None:
        mask["action_mask"] = (Annotated[list[StrictBool], Field(min_length=width, max_length=width)] | None,
                               Field(None, description=MASK_DOC.format(width=width)))
    return create_model(  # type: ignore[call-overload, no-any-return]
        _model_name(policy),
        __config__=STRICT,
        __doc__="One environment step of an acting client (Pathmind's `/collect_experience`).",
        observation=observation,
        reward=(Float32, Field(0.0, description="Reward of the previous action (ignored on an episode's first call).")),
        done=(StrictBool, Field(False, description="The previous action ended the episode (terminated): the next "
                                               "call starts a new one.")),
        client_id=(ClientId | None, Field(None, description="Which environment this is: its calls are paired "
                                                           "into steps. Default: the client's IP address.")),
        **mask,
    )


def _model_name(policy: ServedPolicy) -> str:
    """``LpocCollectExperience`` beside ``LpocObservation``; ``CartRawCollectExperience`` without one."""
    if policy.observation_model is not None:
        return policy.observation_model.__name__.removesuffix("Observation") + "CollectExperience"
    if policy.obs_space is not None:
        return f"{policy.model_prefix}SpaceCollectExperience"
    return "".join(p.capitalize() for p in re.split(r"[-_]", policy.name)) + "RawCollectExperience"


def client_key(request: Request) -> str:
    """A client that sends no ``client_id`` is its address (behind a proxy: with uvicorn's
    ``--proxy-headers``, the forwarded one)."""
    host = request.client.host if request.client else "unknown"
    return "addr-" + re.sub(r"[^A-Za-z0-9_.:-]", "_", host)


def collect_router(service: PolicyService, training: TrainingService | None, auth: Auth, prefix: str) -> APIRouter:
    router = APIRouter(prefix=prefix, tags=[service.policy.name], dependencies=[Depends(auth)],
                       responses=COLLECT_ERRORS)
    Body = collect_model(service.policy)

    @router.post("/collect_experience", response_model=ActionResponse, description=DESCRIPTION.format(
        trains="feeds its trainer" if training is not None else "only acts: it has no `training` section"))
    async def collect_experience(body: Body, request: Request, forced: ForcedVariant = None) -> JSONResponse:  # type: ignore[valid-type]
        obs, mask = body.observation, None  # type: ignore[attr-defined]
        if service.policy.obs_space is not None:
            rows, mask = service.from_space(obs, "body.observation", getattr(body, "action_mask", None))
        else:
            rows = service.from_raw([obs], "body.observation") if isinstance(obs, list) else service.from_observations([obs])
        client_id = body.client_id or client_key(request)  # type: ignore[attr-defined]
        keep = service.versions.collect_variant(client_id, body.reward, body.done, forced)  # type: ignore[attr-defined]
        mask_at = None
        if service.policy.obs_space is None and isinstance(obs, list):
            mask, mask_at = masks_of([getattr(body, "action_mask", None)], service.policy.space.mask_width), ["body.action_mask"]
        elif service.policy.obs_space is None:
            mask = service.mask_of([obs])
        started = time.time_ns()  # after the client's previous decision: the reward below is that one's
        samples, version, variant = await service.act(rows, "sample", ["body.observation"], forced=keep, mask=mask,
                                                      mask_at=mask_at, client_id=client_id)
        service.log_collected(started, client_id, body.reward, body.done, rows)  # type: ignore[attr-defined]
        service.versions.collect_acted(client_id, variant)
        if training is not None:
            await training.collect(client_id, rows[0], samples[0], version, body.reward, body.done,  # type: ignore[attr-defined]
                                   None if mask is None else mask[0])
        return action_answer(samples[0], version, variant)

    return router
