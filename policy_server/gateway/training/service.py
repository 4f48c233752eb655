"""``TrainingService``: the training endpoints of one policy, with neither HTTP nor Ray.

The service validates experience against the policy (``experience.to_batch``) and talks to the
policy's ``Trainer`` through a link: in the gateway's own process (``LocalTrainerLink``, for the
local backend and tests) or as a Ray actor (``RayTrainerLink``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Protocol

import numpy as np

from policy_server.errors import BackendUnavailable, InvalidRequest, PolicyServerError, summary
from policy_server.gateway.training.experience import ExperienceRequest, to_batch
from policy_server.policies.served import ServedPolicy
from policy_server.policies.spaces import ActionSample, BoxSpace
from policy_server.training.collect import Acted
from policy_server.training.trainer import Trainer


class TrainerLink(Protocol):
    async def call(self, method: str, *args: Any) -> Any: ...

    async def close(self) -> None: ...


class LocalTrainerLink:
    """A trainer in the gateway's process; calls run in a worker thread."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        trainer.open()

    async def call(self, method: str, *args: Any) -> Any:
        return await asyncio.to_thread(getattr(self.trainer, method), *args)

    async def close(self) -> None:
        await asyncio.to_thread(self.trainer.close)


class RayTrainerLink:
    """A ``TrainerActor``; its errors of our hierarchy come back as themselves."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def call(self, method: str, *args: Any) -> Any:
        from ray import exceptions as ray_errors

        try:
            return await self.actor.call.remote(method, *args)
        except ray_errors.RayTaskError as exc:
            if isinstance(exc.cause, PolicyServerError):
                raise exc.cause from None
            raise
        except ray_errors.RayActorError as exc:
            raise BackendUnavailable(f"the trainer is unavailable: {summary(exc)}") from exc

    async def close(self) -> None:
        import ray

        try:
            await asyncio.wait_for(self.actor.close.remote(), 30)
        finally:
            ray.kill(self.actor)


class TrainingService:
    def __init__(self, policy: ServedPolicy, max_rows: int) -> None:
        self.policy, self.max_rows = policy, max_rows
        self.link: TrainerLink | None = None

    def attach(self, link: TrainerLink) -> None:
        self.link = link

    async def call(self, method: str, *args: Any) -> Any:
        if self.link is None:
            raise BackendUnavailable(f"the trainer of policy {self.policy.name!r} is still starting")
        return await self.link.call(method, *args)

    async def register(self, client_id: str | None, info: dict[str, Any] | None) -> dict[str, Any]:
        return await self.call("register", client_id or uuid.uuid4().hex, info)

    async def experience(self, request: ExperienceRequest) -> dict[str, Any]:
        """Validate all of it, then hand it to the trainer; a bad sample stores nothing."""
        try:
            batch = to_batch(request, self.policy, self.max_rows)
        except InvalidRequest:
            await self.call("count_malformed", request.rows, request.client_id)
            raise
        return await self.call("submit", batch)

    async def collect(
        self, client_id: str, obs: np.ndarray, sample: ActionSample, version: int, reward: float, done: bool
    ) -> dict[str, Any]:
        """Hand one ``/collect_experience`` call to the trainer: ``obs`` float32 (obs_dim,) and the
        ``sample`` the server answered for it with ``version``; ``reward`` and ``done`` are of the
        client's previous action."""
        dtype = np.float32 if isinstance(self.policy.space, BoxSpace) else np.int64
        action = np.asarray(sample.action if isinstance(sample.action, list) else [sample.action], dtype=dtype)
        acted = Acted(np.asarray(obs, dtype=np.float32), action, sample.log_prob, version)
        return await self.call("collect", client_id, acted, reward, done)

    async def count_malformed(self, body: bytes) -> None:
        """Count the samples of a body that failed validation (as far as it can be read)."""
        if self.link is not None:
            await self.call("count_malformed", _rows_of(body), None)


def _rows_of(body: bytes) -> int:
    try:
        doc = json.loads(body)
        rows = sum(len(f.get("actions") or []) for f in doc.get("fragments") or []) + len(doc.get("steps") or [])
    except (ValueError, TypeError, AttributeError):
        return 1
    return max(rows, 1)
