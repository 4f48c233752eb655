"""``TrainingService``: the training endpoints of one policy, with neither HTTP nor Ray.

The service validates experience against the policy (``experience.to_batch``) and hands it to
the policy's trainer, a ``serving.api.PolicyTrainer`` the runtime started (in the gateway's
process, or a Ray actor).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from policy_server.errors import BackendUnavailable, InvalidRequest
from policy_server.experience_log.records import Outcomes
from policy_server.experience_log.writer import ExperienceLog
from policy_server.gateway.policy.candidate import PolicyVersions
from policy_server.gateway.request_ids import asker
from policy_server.gateway.training import binary
from policy_server.gateway.training.experience import ExperienceRequest, to_batch
from policy_server.policies.served import ServedPolicy
from policy_server.policies.spaces import ActionSample, BoxSpace
from policy_server.serving.api import PolicyTrainer
from policy_server.training.collect import Acted
from policy_server.training.experience import ExperienceBatch


class TrainingService:
    def __init__(self, policy: ServedPolicy, max_rows: int, versions: PolicyVersions | None = None) -> None:
        self.policy, self.max_rows = policy, max_rows
        self.versions = versions  # counts episode returns per version of a policy with a candidate
        self.trainer: PolicyTrainer | None = None
        self.experience_log: ExperienceLog | None = None  # joins the rewards of logged decisions

    def attach(self, trainer: PolicyTrainer) -> None:
        self.trainer = trainer

    def require_trainer(self) -> PolicyTrainer:
        if self.trainer is None:
            raise BackendUnavailable(f"the trainer of policy {self.policy.name!r} is still starting")
        return self.trainer

    async def register(self, client_id: str | None, info: dict[str, Any] | None) -> dict[str, Any]:
        return await self.require_trainer().register(client_id or uuid.uuid4().hex, info)

    async def experience(self, request: ExperienceRequest) -> dict[str, Any]:
        """Validate all of it, then hand it to the trainer; a bad sample stores nothing."""
        try:
            batch = to_batch(request, self.policy, self.max_rows)
        except InvalidRequest:
            await self.require_trainer().count_malformed(request.rows, request.client_id)
            raise
        self._log(request, batch)
        pieces = [(f.variant, f.rewards, f.terminated or f.truncated) for f in request.fragments]
        pieces += [(s.variant, [s.reward], s.terminated or s.truncated) for s in request.steps]
        return await self._submit(batch, pieces)

    async def experience_tensors(self, body: bytes) -> dict[str, Any]:
        """``experience`` of a safetensors body (``training.binary``); a bad one stores nothing."""
        try:
            batch, variant = binary.experience(body, self.policy, self.max_rows)
        except InvalidRequest:
            await self.require_trainer().count_malformed(1, None)
            raise
        ends = batch.episode_end.tolist()
        return await self._submit(batch, [(variant, [r], end) for r, end in zip(batch.rewards.tolist(), ends)])

    async def _submit(self, batch: ExperienceBatch, pieces: list[tuple[Any, Sequence[float], bool]]) -> dict[str, Any]:
        """Hand checked steps to the trainer; ``pieces`` (variant, rewards, ends an episode) count
        episode returns per version of a policy with a candidate."""
        answer = await self.require_trainer().submit(batch)
        if self.versions is not None:
            self.versions.experience(batch.client_id, pieces)
        return answer

    def _log(self, request: ExperienceRequest, batch: ExperienceBatch) -> None:
        """The rewards of the rows that name their decision's request id, for the experience log."""
        named = np.array([ref is not None for ref in request.refs])
        if self.experience_log is None or not named.any():
            return
        self.experience_log.submit(Outcomes(
            time.time_ns(), self.policy.name, asker(request.client_id), [r for r in request.refs if r is not None],
            batch.rewards[named].tolist(), batch.terminated[named].tolist(), batch.truncated[named].tolist(),
            batch.next_obs[named]))

    async def collect(
        self, client_id: str, obs: np.ndarray, sample: ActionSample, version: int, reward: float, done: bool,
        mask: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Hand one ``/collect_experience`` call to the trainer: ``obs`` (*obs_shape,) as the model
        reads it, its action ``mask`` bool (mask_width,) if any, and the ``sample`` the server
        answered for it with ``version``; ``reward`` and ``done`` are of the client's previous action."""
        dtype = np.float32 if isinstance(self.policy.space, BoxSpace) else np.int64
        action = np.asarray(sample.action if isinstance(sample.action, list) else [sample.action], dtype=dtype)
        acted = Acted(np.asarray(obs, dtype=self.policy.obs_dtype), action, sample.log_prob, version, mask)
        return await self.require_trainer().collect(client_id, acted, reward, done)

    async def count_malformed(self, body: bytes) -> None:
        """Count the samples of a body that failed validation (as far as it can be read)."""
        if self.trainer is not None:
            await self.trainer.count_malformed(_rows_of(body), None)


def _rows_of(body: bytes) -> int:
    try:
        doc = json.loads(body)
        rows = sum(len(f.get("actions") or []) for f in doc.get("fragments") or []) + len(doc.get("steps") or [])
    except (ValueError, TypeError, AttributeError):
        return 1
    return max(rows, 1)
