"""How the gateway reaches a policy's replicas: a ``PolicyTransport`` (LitServe's plug point),
chosen once from ``settings.direct_transport`` by ``open_transport``.

``HandleTransport`` sends every batch through the deployment's Serve handle. ``DirectTransport``
sends batches straight to the replicas' TCP ports (``serving.transport``: Serve's router and
request bookkeeping cost milliseconds a call, a small policy's forward pass 0.1 ms; measured in
bench/README.md) and falls back to the handle; Serve stays the control plane either way.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from typing import Any

import numpy as np
from ray.serve.handle import DeploymentHandle

from policy_server.errors import GatewayTimeout, ModelError, summary
from policy_server.policies.torch_policy import PolicyOutput
from policy_server.serving.api import Weights
from policy_server.serving.errors import remote
from policy_server.serving.link_pool import Endpoint, LinkPool
from policy_server.serving.transport import RemoteModelError, TransportError

READY_TIMEOUT_S = 5.0


async def answers_in_time(probe: Awaitable[Any]) -> bool:
    """Whether a replica answers ``probe`` (a cheap remote call) within ``READY_TIMEOUT_S``; never
    raises: any failure means "not ready", which the health probe reports."""
    try:
        await asyncio.wait_for(probe, READY_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - see above
        return False
    return True


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


async def open_transport(handle: DeploymentHandle, direct: bool, connections: int, timeout_s: float) -> PolicyTransport:
    """The direct transport with ``connections`` links and a ``timeout_s`` deadline per batch when
    ``direct``, else the handle's."""
    through_handle = HandleTransport(handle)
    if not direct:
        return through_handle
    transport = DirectTransport(through_handle, connections, timeout_s)
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
        return await answers_in_time(self.handle.version.remote())

    async def set_weights(self, weights: Weights, version: int) -> None:
        await remote(self.what, self.handle.broadcast("set_weights", weights, version).results_async)

    async def version(self) -> int:
        return await remote(self.what, self.handle.version.remote)

    async def snapshot(self) -> tuple[Weights, int]:
        return await remote(self.what, self.handle.snapshot.remote)


class DirectTransport(PolicyTransport):
    """Sends batches straight to the replicas' transport ports (see ``transport``), over a
    ``LinkPool`` balanced by replica.

    When every link is busy, or a link breaks, the batch goes through the Serve handle instead
    (counted in ``fallbacks``), and the pool lists the replicas again. A batch that gets no answer
    within ``timeout_s`` is a ``GatewayTimeout`` (504); its link is closed, since the answer may
    still come.
    """

    def __init__(self, serve: HandleTransport, connections: int, timeout_s: float) -> None:
        self.serve, self.timeout_s = serve, timeout_s
        self.pool = LinkPool(self._endpoints, connections)
        self.fallbacks = 0

    async def _endpoints(self) -> list[Endpoint]:
        return await self.serve.handle.broadcast("transport_endpoint").results_async()  # type: ignore[no-any-return]

    async def start(self) -> None:
        await self.pool.start()

    async def forward(self, obs: np.ndarray) -> PolicyOutput:
        picked = self.pool.acquire()
        if picked is None:
            self.fallbacks += 1
            return await self.serve.forward(obs)
        replica, link = picked
        try:
            async with asyncio.timeout(self.timeout_s):
                out = await link.forward(obs)
        except RemoteModelError as exc:
            self.pool.release(replica, link)
            raise ModelError(f"the model raised {summary(exc)}") from exc
        except TimeoutError as exc:
            self.pool.release(replica, link, broken=True)
            raise GatewayTimeout(
                f"the replica at {replica.endpoint[0]}:{replica.endpoint[1]} did not answer within "
                f"{self.timeout_s:g} s (POLICY_SERVER_DIRECT_TIMEOUT_S)"
            ) from exc
        except TransportError:
            self.pool.release(replica, link, broken=True)
            self.fallbacks += 1
            return await self.serve.forward(obs)
        except BaseException:  # cancelled (the client left): the answer may still come on this link
            self.pool.release(replica, link, broken=True)
            raise
        self.pool.release(replica, link)
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
        self.pool.close()
