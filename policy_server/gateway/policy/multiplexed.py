"""The endpoints of a ``policies_dir`` policy: many policies of one schema, one model file per id.

A request picks its policy id by path, ``/policies/<name>/ids/<policy id>/predict`` (and every
other acting route under ``/ids/<policy id>``), or by the ``X-Policy-Id`` header on the policy's
plain routes, where it is then required. The gateway checks the id against the folder's listing
(``policies.multiplex.PolicyCatalog``: unknown → 404 ``not_found``) before it sends the batch to
the replicas, which load the id's file on demand (``serving.multiplexed``). ``GET .../ids`` lists
the ids. The model-file, weights and ``/collect_experience`` routes of a one-model policy are not
offered: they name one model.
"""

# No `from __future__ import annotations`: FastAPI must see the dependency's parameters as real types.

from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Request
from pydantic import BaseModel, Field

from policy_server.errors import BackendUnavailable
from policy_server.gateway.auth import Auth
from policy_server.gateway.policy.candidate import PolicyVersions
from policy_server.gateway.policy.router import ERRORS, SelectId, policy_router
from policy_server.gateway.policy.service import PolicyService
from policy_server.policies.multiplex import PolicyCatalog
from policy_server.policies.served import ServedPolicy
from policy_server.policies.torch_policy import PolicyOutput
from policy_server.schema.policy_ids import ID_RULE
from policy_server.serving.api import MultiplexedModel
from policy_server.serving.batcher import MicroBatcher

HEADER = "X-Policy-Id"
MAX_BATCHERS = 1024
"""Micro-batchers kept, one per policy id recently asked for (least recently used dropped first)."""


class MultiplexedPolicyService(PolicyService):
    """``PolicyService`` of a ``policies_dir`` policy: each batch is for one policy id, batched with
    concurrent requests for the same id (a bounded LRU of ``MicroBatcher``s), and sent to the
    replicas with that id."""

    def __init__(self, policy: ServedPolicy, rng: np.random.Generator, versions: PolicyVersions | None = None) -> None:
        super().__init__(policy, rng, versions)
        assert policy.spec.policies_dir is not None
        self.catalog = PolicyCatalog(policy.spec.policies_dir)
        self.models: MultiplexedModel | None = None
        self._batchers: OrderedDict[str, MicroBatcher] = OrderedDict()
        self._on_batch: Callable[[int], None] | None = None

    def attach_ids(self, models: MultiplexedModel, on_batch: Callable[[int], None] | None = None) -> None:
        self.models, self._on_batch = models, on_batch

    async def ready(self) -> bool:
        return self.models is not None and await self.models.ready()

    def check_id(self, policy_id: str) -> str:
        """``policy_id`` when ``policies_dir`` holds its model file; NotFound (404) naming it otherwise."""
        return self.catalog.check(policy_id)

    async def _submit(self, obs: np.ndarray, policy_id: str | None) -> PolicyOutput:
        if self.models is None:
            raise BackendUnavailable(f"policy {self.policy.name!r} is still starting; retry shortly")
        assert policy_id is not None, "the routes of a policies_dir policy always select an id"
        return await self._batcher_for(policy_id).submit(obs)

    def _batcher_for(self, policy_id: str) -> MicroBatcher:
        batcher = self._batchers.get(policy_id)
        if batcher is not None:
            self._batchers.move_to_end(policy_id)
            return batcher
        assert self.models is not None
        models, res = self.models, self.policy.spec.resources

        async def forward(obs: np.ndarray) -> PolicyOutput:
            return await models.forward(obs, policy_id)

        # a dropped batcher still answers what it holds: its tasks keep it alive until they end
        batcher = MicroBatcher(forward, res.max_batch_size, res.concurrent_batches, res.batch_wait_ms / 1000, self._on_batch)
        self._batchers[policy_id] = batcher
        if len(self._batchers) > MAX_BATCHERS:
            self._batchers.popitem(last=False)
        return batcher


def id_from_header(service: MultiplexedPolicyService) -> SelectId:
    """The dependency that reads the ``X-Policy-Id`` header (required) and checks the id."""
    description = f"The policy id to answer with: a model file `<id>.pt` of the policy's `policies_dir` ({ID_RULE})."

    async def header_policy_id(request: Request, x_policy_id: Annotated[str, Header(description=description)]) -> str:
        request.state.policy_id = service.check_id(x_policy_id)  # read by the metrics middleware
        return x_policy_id

    return header_policy_id


def id_from_path(service: MultiplexedPolicyService) -> SelectId:
    """The dependency that reads the ``{policy_id}`` path parameter and checks the id."""
    description = f"The policy id: a model file `<id>.pt` of the policy's `policies_dir` ({ID_RULE})."

    async def path_policy_id(request: Request, policy_id: Annotated[str, Path(description=description)]) -> str:
        request.state.policy_id = service.check_id(policy_id)
        return policy_id

    return path_policy_id


class PolicyIds(BaseModel):
    policy: str
    ids: list[str] = Field(description="Every policy id served: the model files of `policies_dir`, by stem.")
    count: int


def ids_router(service: MultiplexedPolicyService, auth: Auth, prefix: str) -> APIRouter:
    router = APIRouter(prefix=prefix, tags=[service.policy.name], dependencies=[Depends(auth)], responses=ERRORS)

    @router.get("/ids", response_model=PolicyIds)
    async def list_policy_ids() -> PolicyIds:
        """The policy ids this policy serves (files added to `policies_dir` appear at once)."""
        ids = service.catalog.ids()
        return PolicyIds(policy=service.policy.name, ids=ids, count=len(ids))

    return router


def mount_multiplexed(app: FastAPI, service: MultiplexedPolicyService, auth: Auth, max_batch: int, prefixes: list[str]) -> None:
    """Under each prefix: the acting routes with ``X-Policy-Id``, ``/ids`` and ``/ids/{policy_id}/...``."""
    for prefix in prefixes:
        app.include_router(policy_router(service, auth, max_batch, prefix, id_from_header(service)))
        app.include_router(ids_router(service, auth, prefix))
        app.include_router(policy_router(service, auth, max_batch, f"{prefix}/ids/{{policy_id}}", id_from_path(service)))


def make_policy_service(policy: ServedPolicy, rng: np.random.Generator, versions: PolicyVersions | None = None) -> PolicyService:
    """The gateway service of ``policy``: multiplexed when it has a ``policies_dir``."""
    if policy.spec.policies_dir is not None:
        return MultiplexedPolicyService(policy, rng, versions)
    return PolicyService(policy, rng, versions)
