"""``/versions``: a policy's stable and candidate versions, their numbers, and the routing between
them (share, shadow, promote, rollback). Thin handlers over ``candidate.PolicyVersions``."""

# No `from __future__ import annotations`: FastAPI must see the models as real types.

from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, model_validator

from policy_server.errors import NotTrainable
from policy_server.gateway.auth import Auth
from policy_server.gateway.errors import in_body
from policy_server.gateway.openapi import error_docs
from policy_server.gateway.policy.router import ERRORS
from policy_server.gateway.policy.service import PolicyService
from policy_server.gateway.training.service import TrainingService

VERSION_ERRORS = ERRORS | error_docs({
    404: "`not_trainable`: a checkpoint asked of a policy without a `training` section; `not_found`: no such checkpoint.",
    409: "`no_candidate`: the policy has no candidate version (no `canary` in its schema); `not_promotable`: "
    "the candidate's parameters differ from the stable model's (or the checkpoint's), or the policy is trained "
    "by this server (promote).",
})


class VersionNumbers(BaseModel):
    model: str = Field(description="The model file's name.")
    model_version: int | None = Field(description="The weights' version served now (null: still starting).")
    requests: int = Field(description="Requests this version answered, in this gateway process.")
    mean_latency_s: float | None = Field(description="Their mean time in the model (batching included), seconds.")
    episodes: int = Field(description="`/collect_experience` episodes this version acted to their end.")
    mean_episode_return: float | None = Field(description="The mean return of those episodes.")


class ShadowAgreement(BaseModel):
    observations: int = Field(description="Observations the shadow candidate ran on.")
    agreed: int = Field(description="Of those, how many its most likely action was the stable model's.")
    agreement: float | None = Field(description="agreed / observations.")
    failures: int = Field(description="Shadow runs that failed (the requests were answered).")
    skipped: int = Field(description="Requests not shadowed: too many shadow runs were in flight.")


class VersionsAnswer(BaseModel):
    routing: Literal["split", "shadow", "off"] = Field(
        description="`split`: the candidate answers `share` of the requests; `shadow`: it runs on copies and "
        "answers none; `off`: rolled back, promoted, or no candidate.")
    share: float = Field(description="The fraction of requests routed to the candidate.")
    promoted_version: int | None = Field(description="The stable version the candidate's weights became, once promoted.")
    candidate_checkpoint: str | None = Field(description="The trainer's checkpoint the candidate serves, if one.")
    shadow: ShadowAgreement
    stable: VersionNumbers
    canary: VersionNumbers | None = Field(description="The candidate (`canary.model`); null without one.")


class PromotedAnswer(VersionsAnswer):
    model_version: int = Field(description="The stable version now serving the candidate's weights.")


class CandidateCheckpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(min_length=1, description="The name of one of the trainer's checkpoints (`/train/checkpoints`).")


class VersionRouting(BaseModel):
    """Either `share` (split mode) or `mode: shadow`."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["split", "shadow"] = "split"
    share: float | None = Field(None, gt=0, le=1, description="`split`: the fraction (0 < share ≤ 1) of requests "
                                "the candidate answers.")

    @model_validator(mode="after")
    def _share_fits_mode(self) -> "VersionRouting":
        if (self.mode == "split") != (self.share is not None):
            raise ValueError("give `share` for mode split, and no share for mode shadow")
        return self


def versions_router(service: PolicyService, training: TrainingService | None, auth: Auth, prefix: str) -> APIRouter:
    router = APIRouter(prefix=f"{prefix}/versions", tags=[f"{service.policy.name}: versions"],
                       dependencies=[Depends(auth)], responses=VERSION_ERRORS)
    versions = service.versions

    @router.get("", response_model=VersionsAnswer)
    async def get_versions() -> Any:
        """The stable and candidate versions: model files, versions served, routing, and each one's
        requests, latency and episode returns (counted by this gateway process)."""
        return await versions.report(service.require_backend())

    @router.post("/share", response_model=VersionsAnswer)
    async def set_share(body: VersionRouting) -> Any:
        """Route `share` of the requests to the candidate, or shadow it (`{"mode": "shadow"}`)."""
        versions.set_share(body.share, body.mode)
        return await versions.report(service.require_backend())

    @router.post("/promote", response_model=PromotedAnswer)
    async def promote() -> Any:
        """Publish the candidate's weights to the stable deployment (every replica), as its next
        model version, and stop routing to the candidate."""
        version = await versions.promote(service.require_backend())
        return await versions.report(service.require_backend()) | {"model_version": version}

    @router.post("/candidate", response_model=VersionsAnswer)
    async def candidate_checkpoint(body: CandidateCheckpoint) -> Any:
        """A trained policy's candidate serves one of its trainer's checkpoints: the checkpoint's
        weights are published to every candidate replica (under the checkpoint's model version);
        the routing stays as it is."""
        if training is None:
            raise NotTrainable(f"policy {service.policy.name!r} has no trainer: its schema has no `training` section")
        await in_body(versions.from_checkpoint(training.require_trainer(), body.checkpoint))
        return await versions.report(service.require_backend())

    @router.post("/rollback", response_model=VersionsAnswer)
    async def rollback() -> Any:
        """Stop routing requests to the candidate (its deployment keeps running: a share can be set again)."""
        versions.rollback()
        return await versions.report(service.require_backend())

    return router
