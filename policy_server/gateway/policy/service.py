"""``PolicyService``: everything the endpoints of one policy do, with neither HTTP nor Ray.

The service turns observations into the model's input array, sends it through the micro-batcher
to the policy's model (a ``serving.api.PolicyModel``), and turns the model's raw outputs into actions or distributions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from policy_server.errors import BackendUnavailable, FieldError, InvalidRequest, ModelOverflow
from policy_server.policies.served import ServedPolicy
from policy_server.policies.spaces import ActionSample
from policy_server.policies.torch_policy import PolicyOutput
from policy_server.schema.observations import flatten
from policy_server.serving.api import PolicyModel
from policy_server.serving.batcher import MicroBatcher

Mode = Literal["sample", "deterministic"]


class PolicyService:
    def __init__(self, policy: ServedPolicy, rng: np.random.Generator) -> None:
        self.policy = policy
        self.rng = rng
        self._batcher: MicroBatcher | None = None
        self.backend: PolicyModel | None = None

    def attach(self, backend: PolicyModel, on_batch: Callable[[int], None] | None = None) -> None:
        res = self.policy.spec.resources
        self.backend = backend
        self._batcher = MicroBatcher(
            backend.forward, res.max_batch_size, res.concurrent_batches, res.batch_wait_ms / 1000, on_batch
        )

    async def ready(self) -> bool:
        """Whether the policy's model answers now (never raises)."""
        return self.backend is not None and await self.backend.ready()

    def require_backend(self) -> PolicyModel:
        if self.backend is None:
            raise BackendUnavailable(f"policy {self.policy.name!r} is still starting; retry shortly")
        return self.backend

    # --- inputs ---------------------------------------------------------------------------

    def from_observations(self, observations: list[BaseModel]) -> np.ndarray:
        """Validated observations of the policy's model → float32 ``(B, obs_dim)``."""
        return flatten(observations)

    def from_raw(self, rows: list[list[float]], field: str = "body.obs") -> np.ndarray:
        """Flat input vectors (each value already checked finite as float32) → float32 ``(B, obs_dim)``;
        raises InvalidRequest naming each row of the wrong width."""
        width = self.policy.obs_dim
        bad = [i for i, row in enumerate(rows) if len(row) != width]
        if bad:
            fields = [FieldError(f"{field}.{i}" if len(rows) > 1 else field,
                                 f"expected {width} values, got {len(rows[i])}") for i in bad[:10]]
            raise InvalidRequest(
                f"{field}: each observation needs {width} values (the sum of the observation "
                f"widths); got {len(rows[bad[0]])}", fields)
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), width)

    # --- model calls ----------------------------------------------------------------------

    async def _submit(self, obs: np.ndarray, policy_id: str | None) -> PolicyOutput:
        """One batched call to the model (``policy_id``: of a ``policies_dir`` policy only)."""
        if self._batcher is None:
            raise BackendUnavailable(f"policy {self.policy.name!r} is still starting; retry shortly")
        return await self._batcher.submit(obs)

    async def forward(self, obs: np.ndarray, where: Sequence[str], policy_id: str | None = None) -> PolicyOutput:
        """The model's outputs for float32 ``(B, obs_dim)`` rows; ``where`` names each row's
        field (``body.observations.3``); ``policy_id`` picks the model of a ``policies_dir`` policy.

        Raises ModelOverflow naming each row whose outputs are not finite: the weights are
        (replicas refuse others), so a finite input that overflows the model's float32 layers
        (values near 1e38, say) is the only way there.
        """
        out = await self._submit(obs, policy_id)
        finite = np.logical_and.reduce([np.isfinite(h).reshape(len(h), -1).all(axis=1) for h in out.heads])
        if not finite.all():
            message = ("the model's outputs are not finite (NaN or inf) for this observation: its "
                       "values overflow the model's float32 layers; scale them down")
            fields = [FieldError(where[i], message) for i in np.flatnonzero(~finite)[:10]]
            raise ModelOverflow(f"{fields[0].field}: {message}", fields)
        return out

    async def act(
        self, obs: np.ndarray, mode: Mode, where: Sequence[str], policy_id: str | None = None
    ) -> tuple[list[ActionSample], int]:
        out = await self.forward(obs, where, policy_id)
        space = self.policy.space
        samples = space.sample(out.heads, self.rng) if mode == "sample" else space.mode(out.heads)
        return samples, out.version

    async def distribution(
        self, obs: np.ndarray, where: Sequence[str], policy_id: str | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        out = await self.forward(obs, where, policy_id)
        return self.policy.space.distribution(out.heads), out.version
