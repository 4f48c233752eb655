"""Backends run a policy's forward pass: on a Ray Serve deployment, or in the gateway process."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import numpy as np

from policy_server.errors import BackendUnavailable, ModelError
from policy_server.policies.torch_policy import PolicyOutput, TorchPolicy


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


class PolicyBackend(Protocol):
    async def forward(self, obs: np.ndarray) -> PolicyOutput: ...

    async def ready(self) -> bool: ...

    async def set_weights(self, weights: dict[str, np.ndarray], version: int) -> None:
        """Publish new weights to every replica; requests in flight finish on the old ones."""


class LocalBackend:
    """The policy in the gateway's own process (development, tests, and the benchmark floor)."""

    def __init__(self, policy: TorchPolicy) -> None:
        self.policy = policy

    async def forward(self, obs: np.ndarray) -> PolicyOutput:
        try:
            return await asyncio.to_thread(self.policy.forward, obs)
        except Exception as exc:
            raise ModelError(f"the model raised {type(exc).__name__}: {_first_line(exc)}") from exc

    async def ready(self) -> bool:
        return True

    async def set_weights(self, weights: dict[str, np.ndarray], version: int) -> None:
        self.policy.set_weights(weights, version)


class ServeBackend:
    """A policy deployment on Ray Serve, reached through its DeploymentHandle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._forward = handle.options(method_name="forward")

    async def forward(self, obs: np.ndarray) -> PolicyOutput:
        from ray import exceptions as ray_errors
        from ray.serve import exceptions as serve_errors

        try:
            return await self._forward.remote(obs)
        except ray_errors.RayTaskError as exc:
            cause = exc.cause if exc.cause is not None else exc
            raise ModelError(f"the model raised {type(cause).__name__}: {_first_line(cause)}") from exc
        except (ray_errors.RayActorError, serve_errors.BackPressureError,
                serve_errors.DeploymentUnavailableError) as exc:
            raise BackendUnavailable(f"the policy's deployment is unavailable: {_first_line(exc)}") from exc

    async def ready(self) -> bool:
        try:
            await asyncio.wait_for(self.handle.options(method_name="version").remote(), 5.0)
        except Exception:  # noqa: BLE001 - any failure means "not ready"; the probe reports it
            return False
        return True

    async def set_weights(self, weights: dict[str, np.ndarray], version: int) -> None:
        await self.handle.broadcast("set_weights", weights, version).results_async()
