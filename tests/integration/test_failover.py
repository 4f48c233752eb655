"""A policy replica's process killed under load, on the real Ray Serve: no request fails, Serve
starts a replacement, and the gateway's direct links are re-balanced onto it."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import API_KEY, LPOC_OBS, multi_policy_schema
from support import live_actors, wait_until

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

PREFIX = "it-failover"
AUTH = {"access-token": API_KEY}


@pytest.fixture(scope="module")
def gateway(ray_session: int, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from conftest import running_server

    schema = multi_policy_schema(model_dir)
    lpoc = schema["policies"]["lpoc"]
    lpoc["resources"] = {"num_cpus": 0.1, "num_replicas": 2, "max_concurrent_batches": 4}
    schema["policies"] = {"lpoc": lpoc}
    path = tmp_path_factory.mktemp("failover") / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    app = build_app(Settings(schema_path=path, gateway_metrics_port=0, serve_app_prefix=PREFIX))
    with running_server(app) as url:
        yield {"url": url, "pool": app.state.services["lpoc"].backend.pool}


def _replica_pids() -> dict[str, int]:
    """The live replicas of the lpoc deployment: actor id -> process id."""
    return live_actors(f"ServeReplica:{PREFIX}-lpoc:policy-lpoc")


def test_a_killed_replica_is_replaced_without_a_failed_request_and_gets_its_share(gateway: dict[str, Any]) -> None:
    pool = gateway["pool"]
    wait_until(lambda: len(_replica_pids()) == 2 and sorted(pool.open_links().values()) == [2, 2], 60, 0.2,
               lambda: f"replicas {_replica_pids()}, links {pool.open_links()}")
    stop = threading.Event()
    statuses: Counter[int] = Counter()

    def load() -> None:
        with httpx.Client(base_url=gateway["url"], headers=AUTH, timeout=30) as client:
            while not stop.is_set():
                statuses[client.post("/predict", json=LPOC_OBS).status_code] += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        before = _replica_pids()
        victim_id, victim_pid = next(iter(before.items()))
        linked_before = set(pool.open_links())
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic()

        def replaced() -> bool:
            now = _replica_pids()
            return len(now) == 2 and victim_id not in now

        wait_until(replaced, 90, 0.2, lambda: f"replicas now {_replica_pids()}")
        def rebalanced() -> dict[Any, int] | None:
            links = pool.open_links()
            return links if sorted(links.values()) == [2, 2] and set(links) != linked_before else None

        links = wait_until(rebalanced, 60, 0.2, lambda: f"links {pool.open_links()}")
        print(f"replica replaced and linked {time.monotonic() - killed_at:.1f} s after its kill")
        newcomer = next(ep for ep in links if ep not in linked_before)
        counted = {ep: pool.replicas[ep].batches for ep in links}
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    work = {ep: pool.replicas[ep].batches - counted[ep] for ep in counted}
    assert statuses[200] > 100 and set(statuses) == {200}, statuses
    assert work[newcomer] >= 0.3 * sum(work.values()), work  # not a tenth, as with 3 links to 1
