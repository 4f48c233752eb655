"""The gateway's direct links, balanced by replica: real transport servers on loopback, no Ray."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from support import wait_until_async

from policy_server.policies.torch_policy import PolicyOutput
from policy_server.serving.link_pool import Endpoint, LinkPool, shares
from policy_server.serving.transport import TransportServer

TOKEN = "ef" * 32


class Replica:
    """A transport server whose model answers with its own number and counts its batches."""

    def __init__(self, number: int) -> None:
        self.number, self.batches = number, 0
        self.lock = threading.Lock()
        self.server = TransportServer(self.forward, TOKEN, "127.0.0.1")
        self.endpoint: Endpoint = (*self.server.address, TOKEN)

    def forward(self, obs: np.ndarray) -> PolicyOutput:
        with self.lock:
            self.batches += 1
        return PolicyOutput([np.full((len(obs), 1), self.number, dtype=np.float32)], version=self.number)


@pytest.fixture()
def replicas() -> Iterator[list[Replica]]:
    made = [Replica(i) for i in range(3)]
    yield made
    for r in made:
        r.server.close()


def test_shares_spread_the_links_evenly_and_give_every_replica_one() -> None:
    a, b, c = ("h", 1, "t"), ("h", 2, "t"), ("h", 3, "t")
    assert shares(4, [a, b]) == {a: 2, b: 2}
    assert shares(4, [a, b, c]) == {a: 2, b: 1, c: 1}
    assert shares(2, [a, b, c]) == {a: 1, b: 1, c: 1}
    assert shares(4, []) == {}


async def _batch(pool: LinkPool) -> int:
    picked = pool.acquire()
    assert picked is not None
    replica, link = picked
    out = await link.forward(np.zeros((1, 2), dtype=np.float32))
    pool.release(replica, link)
    return out.version


def test_concurrent_batches_are_spread_over_the_replicas(replicas: list[Replica]) -> None:
    async def run() -> Counter[int]:
        async def listing() -> list[Endpoint]:
            return [r.endpoint for r in replicas[:2]]

        pool = LinkPool(listing, 4)
        await pool.start()
        try:
            assert sorted(pool.open_links().values()) == [2, 2]
            counts: Counter[int] = Counter()
            for _ in range(50):  # 4 at a time: every link busy, both replicas serving
                counts.update(await asyncio.gather(*(_batch(pool) for _ in range(4))))
            return counts
        finally:
            pool.close()

    assert asyncio.run(run()) == Counter({0: 100, 1: 100})


def test_a_replaced_replica_gets_its_share_and_the_newcomer_its_half_of_the_work(replicas: list[Replica]) -> None:
    """The issue's case: after a replica died and Serve started another, the survivor kept 3
    links and the newcomer 1. Now the pool drops the dead one's and re-balances."""
    listed = [replicas[0].endpoint, replicas[1].endpoint]

    async def run() -> tuple[dict[Endpoint, int], Counter[int]]:
        async def listing() -> list[Endpoint]:
            return list(listed)

        pool = LinkPool(listing, 4, refresh_s=0.2)
        await pool.start()
        try:
            replicas[1].server.close()  # the replica dies: its links break as batches use them
            listed[1:] = [replicas[2].endpoint]  # ... and Serve lists its replacement
            for _ in range(8):
                picked = pool.acquire()
                assert picked is not None
                replica, link = picked
                try:
                    await link.forward(np.zeros((1, 2), dtype=np.float32))
                    pool.release(replica, link)
                except Exception:  # noqa: BLE001 - the dead replica's links: what the gateway does
                    pool.release(replica, link, broken=True)
            await wait_until_async(lambda: pool.open_links() == {replicas[0].endpoint: 2, replicas[2].endpoint: 2}, 10)
            counts: Counter[int] = Counter()
            for _ in range(25):
                counts.update(await asyncio.gather(*(_batch(pool) for _ in range(4))))
            return pool.open_links(), counts
        finally:
            pool.close()

    links, counts = asyncio.run(run())
    assert links == {replicas[0].endpoint: 2, replicas[2].endpoint: 2}
    assert counts == Counter({0: 50, 2: 50})


def test_a_replica_that_cannot_be_reached_is_retried_and_listing_failures_are_survived(replicas: list[Replica]) -> None:
    failing = {"list": True}

    async def run() -> dict[Endpoint, int]:
        async def listing() -> list[Endpoint]:
            if failing["list"]:
                raise ConnectionError("Serve is restarting")
            return [replicas[0].endpoint]

        pool = LinkPool(listing, 2, refresh_s=0.1)
        await pool.start()  # listing fails: no links, no exception
        try:
            assert pool.acquire() is None
            failing["list"] = False
            await wait_until_async(lambda: pool.open_links() == {replicas[0].endpoint: 2}, 10)
            return pool.open_links()
        finally:
            pool.close()

    assert asyncio.run(run()) == {replicas[0].endpoint: 2}
