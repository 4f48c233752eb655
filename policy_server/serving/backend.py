"""Backends run a policy's forward pass: on a Ray Serve deployment, or in the gateway process."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import numpy as np

from policy_server.errors import BackendUnavailable, ModelError, summary
from policy_server.policies.torch_policy import PolicyOutput, TorchPolicy
from policy_server.serving.transport import RemoteModelError, TransportClient, TransportError

log = logging.getLogger(__name__)


class PolicyBackend(Protocol):
    async def forward(self, obs: np.ndarray) -> PolicyOutput: ...

    async def ready(self) -> bool: ...

    async def set_weights(self, weights: dict[str, np.ndarray], version: int) -> None:
        """Publish new weights to every replica; requests in flight finish on the old ones."""

    async def version(self) -> int:
        """The model version served (of one replica)."""

    async def snapshot(self) -> tuple[dict[str, np.ndarray], int]:
        """The served weights and their version, read together (from one replica)."""


class LocalBackend:
    """The policy in the gateway's own process (development, tests, and the benchmark floor)."""

    def __init__(self, policy: TorchPolicy) -> None:
        self.policy = policy

    async def forward(self, obs: np.ndarray) -> PolicyOutput:
        try:
            return await asyncio.to_thread(self.policy.forward, obs)
        except Exception as exc:
            raise ModelError(f"the model raised {type(exc).__name__}: {summary(exc)}") from exc

    async def ready(self) -> bool:
        return True

    async def set_weights(self, weights: dict[str, np.ndarray], version: int) -> None:
        self.policy.set_weights(weights, version)

    async def version(self) -> int:
        return self.policy.version

    async def snapshot(self) -> tuple[dict[str, np.ndarray], int]:
        return self.policy.snapshot()


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
            raise ModelError(f"the model raised {type(cause).__name__}: {summary(cause)}") from exc
        except (ray_errors.RayActorError, serve_errors.BackPressureError,
                serve_errors.DeploymentUnavailableError) as exc:
            raise BackendUnavailable(f"the policy's deployment is unavailable: {summary(exc)}") from exc

    async def ready(self) -> bool:
        try:
            await asyncio.wait_for(self.handle.options(method_name="version").remote(), 5.0)
        except Exception:  # noqa: BLE001 - any failure means "not ready"; the probe reports it
            return False
        return True

    async def set_weights(self, weights: dict[str, np.ndarray], version: int) -> None:
        await self.handle.broadcast("set_weights", weights, version).results_async()

    async def version(self) -> int:
        return await self._call("version")

    async def snapshot(self) -> tuple[dict[str, np.ndarray], int]:
        return await self._call("snapshot")

    async def _call(self, method: str) -> Any:
        from ray import exceptions as ray_errors

        try:
            return await self.handle.options(method_name=method).remote()
        except ray_errors.RayError as exc:
            raise BackendUnavailable(f"the policy's deployment is unavailable: {summary(exc)}") from exc


class DirectBackend:
    """Sends batches straight to the replicas' transport ports (see ``transport``).

    Holds up to ``connections`` connections spread over the replicas, one batch in flight on
    each. When none is free, or a connection breaks, the batch goes through the Serve handle
    instead, and lost connections are re-opened to the replicas Serve reports now.
    """

    def __init__(self, serve: ServeBackend, connections: int) -> None:
        self.serve, self._target = serve, connections
        self._idle: asyncio.Queue[TransportClient] = asyncio.Queue()
        self._open = 0
        self._replenishing: asyncio.Task[None] | None = None
        self.fallbacks = 0

    async def start(self) -> None:
        await self._replenish()

    async def _replenish(self) -> None:
        try:
            endpoints = await self.serve.handle.broadcast("transport_endpoint").results_async()
        except Exception as exc:  # noqa: BLE001 - replicas restarting: the handle serves meanwhile
            log.warning("cannot list the replicas' direct endpoints (%s); using the Serve handle", exc)
            return
        for i in range(self._target - self._open):
            if not endpoints:
                break
            host, port, token = endpoints[i % len(endpoints)]
            try:
                client = await TransportClient.connect(host, port, token)
            except (TimeoutError, OSError) as exc:
                log.warning("cannot reach replica at %s:%s (%s); using the Serve handle", host, port, exc)
                continue
            self._open += 1
            self._idle.put_nowait(client)

    def _schedule_replenish(self) -> None:
        if self._replenishing is None or self._replenishing.done():
            self._replenishing = asyncio.create_task(self._replenish())

    async def forward(self, obs: np.ndarray) -> PolicyOutput:
        try:
            client = self._idle.get_nowait()
        except asyncio.QueueEmpty:
            self.fallbacks += 1
            return await self.serve.forward(obs)
        try:
            out = await client.forward(obs)
        except RemoteModelError as exc:
            self._idle.put_nowait(client)
            raise ModelError(f"the model raised {summary(exc)}") from exc
        except TransportError:
            client.close()
            self._open -= 1
            self._schedule_replenish()
            self.fallbacks += 1
            return await self.serve.forward(obs)
        self._idle.put_nowait(client)
        return out

    async def ready(self) -> bool:
        return await self.serve.ready()

    async def set_weights(self, weights: dict[str, np.ndarray], version: int) -> None:
        await self.serve.set_weights(weights, version)

    async def version(self) -> int:
        return await self.serve.version()

    async def snapshot(self) -> tuple[dict[str, np.ndarray], int]:
        return await self.serve.snapshot()

    def close(self) -> None:
        while not self._idle.empty():
            self._idle.get_nowait().close()
