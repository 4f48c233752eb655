"""The endpoints of a recurrent policy: those of ``router.policy_router``, each row with its state.

A request row (an observation, or a raw vector's body) may carry ``state`` (the state to start
from, as an answer returned it), ``episode_id`` (start from the state this gateway kept for the
episode) and ``episode_start`` (start from the zero state). Every answer row adds ``state`` (the
new state) and ``state_reset`` (true: the episode id was unknown or expired, so the row started
from the zero state). See ``gateway.policy.state``. Action masks apply as on the feed-forward
routes: the schema's mask observation, the observation model's optional ``action_mask``, or a
raw body's ``action_mask``; a masked action has probability 0, and the log-prob is the masked one.
"""

# No `from __future__ import annotations`: FastAPI must see the generated models as real types.

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, create_model

from policy_server.fields import Float32
from policy_server.gateway.auth import Auth
from policy_server.gateway.policy.router import ERRORS, Pick, SelectId, _action, _answer, _versioned, rows_at
from policy_server.gateway.policy.service import Mode, PolicyService, masks_of
from policy_server.gateway.policy.state import RecurrentService, Step
from policy_server.gateway.policy.wire import (
    Action,
    ActionResponse,
    Distribution,
    DistributionResponse,
    ForcedVariant,
    VariantName,
    _Request,
    _Wire,
    raw_model,
)
from policy_server.policies.recurrent import StateLayout

EpisodeId = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[\x21-\x7e]+$")]
STATE_DOC = "The new state (per tensor, nested lists of its per-row shape): send it back as `state` with the next step."
RESET_DOC = ("True when the row's `episode_id` was unknown or its state had expired (`recurrent.state_ttl_s`), "
             "so it started from the zero state.")


class _Stateful(_Wire):
    state: dict[str, Any] = Field(description=STATE_DOC)
    state_reset: bool = Field(description=RESET_DOC)


class RecurrentAction(Action, _Stateful):
    pass


class RecurrentActionResponse(ActionResponse, _Stateful):
    pass


class RecurrentBatchActionResponse(_Wire):
    results: list[RecurrentAction]
    model_version: int
    variant: VariantName
    policy_id: str | None = None


class RecurrentDistribution(Distribution, _Stateful):
    pass


class RecurrentDistributionResponse(DistributionResponse, _Stateful):
    pass


class RecurrentBatchDistributionResponse(_Wire):
    results: list[RecurrentDistribution]
    model_version: int
    variant: VariantName
    policy_id: str | None = None


def _nested(depth: int) -> Any:
    kind: Any = Float32
    for _ in range(depth):
        kind = list[kind]
    return kind


def state_model(prefix: str, layout: StateLayout) -> type[BaseModel]:
    """``{prefix}State``: one nested list of float32 values per state tensor (its shape is checked
    by ``policies.recurrent.state_rows``, which names both shapes)."""
    fields = {name: (_nested(len(shape)), Field(description=f"Per-row shape {list(shape)}."))
              for name, shape in layout.shapes.items()}
    return create_model(f"{prefix}State", __base__=_Request, **fields)  # type: ignore[call-overload]


def with_steps(model: type[BaseModel], name: str, state: type[BaseModel]) -> type[BaseModel]:
    """``model`` plus the optional ``state``, ``episode_id`` and ``episode_start`` of a step."""
    return create_model(  # type: ignore[call-overload]
        name, __base__=model,
        state=(state | None, Field(None, description="The state to start from (an answer's `state`); default: "
                                   "the episode's kept state, else zero.")),
        episode_id=(EpisodeId | None, Field(None, description="Keep the state in the server under this id between "
                                             "requests (expires after `recurrent.state_ttl_s` idle seconds).")),
        episode_start=(bool, Field(False, description="Start from the zero state: the first step of an episode.")),
    )


def _step(body: Any) -> Step:
    state = body.state.model_dump() if body.state is not None else None
    return Step(state, body.episode_id, body.episode_start)


def recurrent_router(service: PolicyService, auth: Auth, max_batch: int, prefix: str, select_id: SelectId) -> APIRouter:
    """All acting endpoints of one recurrent policy under ``prefix``."""
    policy = service.policy
    assert policy.recurrent is not None and policy.spec.recurrent is not None
    steps = RecurrentService(service, policy.recurrent, policy.spec.recurrent)
    router = APIRouter(prefix=prefix, tags=[policy.name], dependencies=[Depends(auth)], responses=ERRORS)
    PolicyId = Annotated[str | None, Depends(select_id)]

    async def pick(policy_id: PolicyId, forced: ForcedVariant = None) -> Pick:
        return Pick(policy_id, forced)

    Picked = Annotated[Pick, Depends(pick)]
    State = state_model(policy.model_prefix, policy.recurrent)
    width = policy.space.mask_width
    Raw = with_steps(raw_model(policy.model_prefix, policy.obs_dim, width),
                     f"{policy.model_prefix}RecurrentRawObservation", State)

    async def act(obs: Any, rows: list[Any], mode: Mode, chosen: Pick, where: list[str], batch: bool,
                  mask: Any = None, mask_at: list[str] | None = None) -> JSONResponse:
        samples, answers, version, variant = await steps.act(
            obs, [_step(r) for r in rows], mode, where, chosen.policy_id, chosen.forced, mask, mask_at)
        results = [_action(s) | a for s, a in zip(samples, answers, strict=True)]
        named = _versioned(version, variant, chosen.policy_id)
        return _answer({"results": results} | named if batch else results[0] | named)

    async def distribution(obs: Any, rows: list[Any], chosen: Pick, where: list[str], batch: bool, mask: Any) -> JSONResponse:
        dists, answers, version, variant = await steps.distribution(
            obs, [_step(r) for r in rows], where, chosen.policy_id, chosen.forced, mask)
        results = [d | a for d, a in zip(dists, answers, strict=True)]
        named = _versioned(version, variant, chosen.policy_id)
        return _answer({"results": results} | named if batch else results[0] | named)

    @router.post("/predict_raw", response_model=RecurrentActionResponse)
    async def predict_raw(body: Raw, chosen: Picked) -> JSONResponse:  # type: ignore[valid-type]
        """Sample an action for a flat input vector, from the step's state; answers the new state."""
        mask = masks_of([getattr(body, "action_mask", None)], width)
        return await act(service.from_raw([body.obs]), [body], "sample", chosen, ["body"], False,  # type: ignore[attr-defined]
                         mask, ["body.action_mask"])

    if policy.observation_model is None:
        return router
    Observation = with_steps(policy.observation_model, f"{policy.model_prefix}RecurrentObservation", State)
    Batch = create_model(f"{Observation.__name__}Batch", __base__=_Request, observations=(
        Annotated[list[Observation], Field(min_length=1, max_length=max_batch)], ...))  # type: ignore[valid-type]

    def rows(observations: list[Any]) -> Any:
        return service.from_observations(observations, policy.observation_model)

    @router.post("/predict", response_model=RecurrentActionResponse)
    async def predict(obs: Observation, chosen: Picked) -> JSONResponse:  # type: ignore[valid-type]
        """Sample an action from the step's state; answers the new state."""
        return await act(rows([obs]), [obs], "sample", chosen, ["body"], False, service.mask_of([obs]))

    @router.post("/predict_deterministic", response_model=RecurrentActionResponse)
    async def predict_deterministic(obs: Observation, chosen: Picked) -> JSONResponse:  # type: ignore[valid-type]
        """The most likely action from the step's state; answers the new state."""
        return await act(rows([obs]), [obs], "deterministic", chosen, ["body"], False, service.mask_of([obs]))

    @router.post("/distribution", response_model=RecurrentDistributionResponse)
    async def distribution_one(obs: Observation, chosen: Picked) -> JSONResponse:  # type: ignore[valid-type]
        """The exact action distribution from the step's state; answers the new state."""
        return await distribution(rows([obs]), [obs], chosen, ["body"], False, service.mask_of([obs]))

    @router.post("/predict/batch", response_model=RecurrentBatchActionResponse)
    async def predict_batch(body: Batch, chosen: Picked) -> JSONResponse:  # type: ignore[valid-type]
        """Sample one action per observation, each from its own state, in one forward pass."""
        obs = body.observations  # type: ignore[attr-defined]
        return await act(rows(obs), obs, "sample", chosen, rows_at("body.observations", len(obs)), True,
                         service.mask_of(obs))

    @router.post("/predict_deterministic/batch", response_model=RecurrentBatchActionResponse)
    async def predict_deterministic_batch(body: Batch, chosen: Picked) -> JSONResponse:  # type: ignore[valid-type]
        """The most likely action per observation, each from its own state, in one forward pass."""
        obs = body.observations  # type: ignore[attr-defined]
        return await act(rows(obs), obs, "deterministic", chosen, rows_at("body.observations", len(obs)), True,
                         service.mask_of(obs))

    @router.post("/distribution/batch", response_model=RecurrentBatchDistributionResponse)
    async def distribution_batch(body: Batch, chosen: Picked) -> JSONResponse:  # type: ignore[valid-type]
        """The exact action distribution per observation, each from its own state, in one forward pass."""
        obs = body.observations  # type: ignore[attr-defined]
        return await distribution(rows(obs), obs, chosen, rows_at("body.observations", len(obs)), True,
                                  service.mask_of(obs))

    return router
