"""How the gateway reaches a policy's replicas: a ``PolicyTransport`` (LitServe's plug point),
chosen once from ``settings.direct_transport`` by ``open_transport``.

``HandleTransport`` sends every batch through the deployment's Serve handle. ``DirectTransport``
sends batches straight to the replicas' TCP ports (``serving.transport``: Serve's router and
request bookkeeping cost milliseconds a call, a small policy's forward pass 0.1 ms; measured in
bench/README.md) and falls back to the handle; Serve stays the control plane either way.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod

import numpy as np
from ray.serve.handle import DeploymentHandle

from policy_server.errors import ModelError, summary
from policy_server.policies.torch_policy import PolicyOutput
from policy_server.serving.api import Weights
from policy_server.serving.errors import remote
from policy_server.serving.transport import RemoteModelError, TransportClient, TransportError

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 5.0


class PolicyTransport(ABC):
    """A ``serving.api.PolicyModel`` on a Serve deployment; ``close`` from the loop that opened it."""

    @abstractmethod
    async def forward(self, obs: np.ndarray) -> PolicyOutput: ...

    @abstractmethod
    async def ready(self) -> bool: ...

    @abstractmethod
    async def set_weights(self, weights: Weights, version: int) -> None: ...

    @abstractmethod
    async def version(self) -> int: ...

    @abstractmethod
    async def snapshot(self) -> tuple[Weights, int]: ...

    def close(self) -> None:
        """Release what the transport holds (connections)."""


async def open_transport(handle: DeploymentHandle, direct: bool, connections: int) -> PolicyTransport:
    """The direct transport with ``connections`` connections when ``direct``, else the handle's."""
    through_handle = HandleTransport(handle)
    if not direct:
        return through_handle
    transport = DirectTransport(through_handle, connections)
    await transport.start()
    return transport


class HandleTransport(PolicyTransport):
    """Every batch through the deployment's Serve handle."""

    what = "the policy's deployment"

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle
        self._forward = handle.forward  # the hot path: one handle for all calls

    async def forward(self, obs: np.ndarray) -> PolicyOutput:
        return await remote(self.what, self._forward.remote, obs)

    async def ready(self) -> bool:
        try:
            await asyncio.wait_for(self.handle.version.remote(), READY_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - any failure means "not ready"; the probe reports it
            return False
        return True

    async def set_weights(self, weights: Weights, version: int) -> None:
        await remote(self.what, self.handle.broadcast("set_weights", weights, version).results_async)

    async def version(self) -> int:
        return await remote(self.what, self.handle.version.remote)

    async def snapshot(self) -> tuple[Weights, int]:
        return await remote(self.what, self.handle.snapshot.remote)


class DirectTransport(PolicyTransport):
    """Sends batches straight to the replicas' transport ports (see ``transport``).

    Holds up to ``connections`` connections spread over the replicas, one batch in flight on
    each. When none is free, or a connection breaks, the batch goes through the Serve handle
    instead, and lost connections are re-opened to the replicas Serve reports now.
    """

    def __init__(self, serve: HandleTransport, connections: int) -> None:
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

    async def set_weights(self, weights: Weights, version: int) -> None:
        await self.serve.set_weights(weights, version)

    async def version(self) -> int:
        return await self.serve.version()

    async def snapshot(self) -> tuple[Weights, int]:
        return await self.serve.snapshot()

    def close(self) -> None:
        while not self._idle.empty():
            self._idle.get_nowait().close()
