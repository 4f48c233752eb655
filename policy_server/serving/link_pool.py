"""The gateway's direct links to a policy's replicas (``serving.transport``), balanced by replica.

A gateway keeps ``target`` links (a policy's ``concurrent_batches``), shared out evenly over the
replicas Serve lists, one batch in flight on each. A batch goes to the replica with the fewest
batches in flight that has a free link. The pool lists the replicas again every ``refresh_s``
seconds, and at once when a link breaks: a replica that Serve added gets its share (links are
taken from the others), one that left is dropped. Asyncio only, no Ray: ``list_endpoints`` is
whatever lists the replicas (in the gateway, a broadcast through the Serve handle).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from policy_server.serving.transport import TransportClient

log = logging.getLogger(__name__)

Endpoint = tuple[str, int, str]
"""Where a replica takes batches: host, port, token (hex)."""
Connect = Callable[[str, int, str], Awaitable[TransportClient]]

REFRESH_S = 5.0
MIN_RELIST_S = 0.5  # a burst of broken links lists the replicas once, not once per link


def shares(target: int, replicas: Sequence[Endpoint]) -> dict[Endpoint, int]:
    """``target`` links spread over ``replicas`` as evenly as can be (the first ones take the
    remainder); every replica gets at least one, so more replicas than ``target`` raise the total."""
    if not replicas:
        return {}
    base, extra = divmod(target, len(replicas))
    return {r: max(1, base + (i < extra)) for i, r in enumerate(replicas)}


@dataclass(eq=False)
class ReplicaLinks:
    """The links to one replica: ``idle`` ones, and ``busy``, the batches in flight on the others."""

    endpoint: Endpoint
    idle: list[TransportClient] = field(default_factory=list)
    busy: int = 0
    batches: int = 0  # sent on this replica's links, all told
    gone: bool = False  # Serve no longer lists it: its links close as they come back

    @property
    def open(self) -> int:
        return len(self.idle) + self.busy


class LinkPool:
    """Links to every replica of one deployment; ``close`` from the event loop that started it."""

    def __init__(self, list_endpoints: Callable[[], Awaitable[list[Endpoint]]], target: int,
                 connect: Connect = TransportClient.connect, refresh_s: float = REFRESH_S) -> None:
        self._list, self._connect, self.target, self.refresh_s = list_endpoints, connect, target, refresh_s
        self.replicas: dict[Endpoint, ReplicaLinks] = {}
        self._turn = itertools.count()  # breaks ties between equally busy replicas in turn
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listing_failed = False

    async def start(self) -> None:
        """Open the first links (a replica that cannot be reached now is retried later), then keep
        them in shape in the background."""
        await self.refresh()
        self._task = asyncio.create_task(self._maintain())

    def acquire(self) -> tuple[ReplicaLinks, TransportClient] | None:
        """A free link on the least busy replica, or None when every link is busy."""
        ready = [r for r in self.replicas.values() if r.idle]
        if not ready:
            return None
        k = next(self._turn) % len(ready)
        replica = min(ready[k:] + ready[:k], key=lambda r: r.busy)  # min keeps the first of equals
        replica.busy += 1
        replica.batches += 1
        return replica, replica.idle.pop()

    def release(self, replica: ReplicaLinks, link: TransportClient, broken: bool = False) -> None:
        """Give ``link`` back after a batch; a ``broken`` one is closed and the replicas listed again."""
        replica.busy -= 1
        if broken or replica.gone:
            link.close()
            if broken:
                self._wake.set()
            return
        replica.idle.append(link)

    def open_links(self) -> dict[Endpoint, int]:
        """Links per replica now (idle and busy)."""
        return {e: r.open for e, r in self.replicas.items()}

    async def refresh(self) -> None:
        """List the replicas; drop those gone, add the new, and bring each to its share of links."""
        try:
            listed: list[Endpoint] = list(dict.fromkeys(tuple(e) for e in await self._list()))  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - replicas restarting: batches take the handle meanwhile
            if not self._listing_failed:
                log.warning("cannot list the replicas' direct endpoints (%s); using the Serve handle", exc)
            self._listing_failed = True
            return
        self._listing_failed = False
        for endpoint in set(self.replicas) - set(listed):
            self._drop(self.replicas.pop(endpoint))
        for endpoint in listed:
            self.replicas.setdefault(endpoint, ReplicaLinks(endpoint))
        wanted = shares(self.target, listed)
        await asyncio.gather(*(self._fit(self.replicas[e], n) for e, n in wanted.items()))

    async def _fit(self, replica: ReplicaLinks, share: int) -> None:
        while replica.open > share and replica.idle:  # a newcomer takes its share from the others
            replica.idle.pop().close()
        missing = share - replica.open
        if missing <= 0:
            return
        opened = await asyncio.gather(*(self._connect(*replica.endpoint) for _ in range(missing)),
                                      return_exceptions=True)
        for link in opened:
            if isinstance(link, BaseException):
                log.warning("cannot reach replica at %s:%s (%s); using the Serve handle meanwhile",
                            replica.endpoint[0], replica.endpoint[1], link)
            elif replica.gone:
                link.close()
            else:
                replica.idle.append(link)

    def _drop(self, replica: ReplicaLinks) -> None:
        replica.gone = True
        while replica.idle:
            replica.idle.pop().close()

    async def _maintain(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.refresh_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.refresh()
            except Exception:  # never let the maintenance task die (logged with its traceback)
                log.exception("refreshing the direct links failed")
            await asyncio.sleep(MIN_RELIST_S)

    def close(self) -> None:
        """Stop refreshing and close every idle link (busy ones close when they come back)."""
        if self._task is not None:
            self._task.cancel()
        for replica in self.replicas.values():
            self._drop(replica)
        self.replicas.clear()
