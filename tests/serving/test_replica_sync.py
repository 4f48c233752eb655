"""``LatestWeights``: replicas that start after a publish get the newest weights; never an older version."""

from __future__ import annotations

import threading
import time

import numpy as np
from support import wait_until

from policy_server.serving.replica_sync import LatestWeights, Weights


class Fleet:
    """Replicas as Serve's broadcast sees them: the running ones, each at its version."""

    def __init__(self, replicas: int) -> None:
        self.versions = [0] * replicas
        self.loaded: list[tuple[int, float]] = []  # (version, first weight) of every load

    def start_one(self) -> None:
        self.versions.append(0)  # a new replica loads the model file

    def versions_now(self) -> list[int]:
        return list(self.versions)

    def set_weights(self, weights: Weights, version: int) -> list[int]:
        self.loaded.append((version, float(weights["w"][0])))
        self.versions = [version] * len(self.versions)
        return self.versions


class Replicas:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def versions(self) -> list[int]:
        return self.fleet.versions_now()

    def set_weights(self, weights: Weights, version: int) -> list[int]:
        return self.fleet.set_weights(weights, version)


def test_a_replica_started_after_a_publish_gets_the_latest_weights() -> None:
    fleet = Fleet(1)
    latest = LatestWeights(Replicas(fleet))
    assert latest.catch_up() is False  # nothing published: every replica serves the model file
    latest.publish({"w": np.array([1.0])}, 1)
    latest.publish({"w": np.array([2.0])}, 2)
    assert latest.catch_up() is False  # all on version 2
    fleet.start_one()
    assert fleet.versions == [2, 0]
    assert latest.catch_up() is True
    assert fleet.versions == [2, 2] and fleet.loaded[-1] == (2, 2.0) and latest.caught_up == 1


def test_the_loop_catches_up_until_closed_and_a_failing_round_is_retried() -> None:
    fleet = Fleet(2)
    replicas = Replicas(fleet)
    failures = iter([RuntimeError("replica restarting")])

    def versions() -> list[int]:
        error = next(failures, None)
        if error is not None:
            raise error
        return fleet.versions_now()

    replicas.versions = versions  # type: ignore[method-assign]
    latest = LatestWeights(replicas, period_s=0.01)
    latest.publish({"w": np.array([3.0])}, 7)
    fleet.start_one()
    latest.start()
    try:
        wait_until(lambda: fleet.versions == [7, 7, 7], 5, 0.01, lambda: f"versions {fleet.versions}")
    finally:
        latest.close()
    assert latest.caught_up == 1


def test_a_catch_up_never_sends_an_older_version_over_a_newer_one() -> None:
    fleet = Fleet(1)
    replicas = Replicas(fleet)
    latest = LatestWeights(replicas)
    latest.publish({"w": np.array([1.0])}, 1)
    fleet.start_one()
    publishing = threading.Thread(target=latest.publish, args=({"w": np.array([2.0])}, 2))

    def versions_while_version_2_is_published() -> list[int]:
        seen = fleet.versions_now()  # [1, 0]: a catch-up to version 1 is due
        publishing.start()
        time.sleep(0.05)  # without the lock, version 2 would land here, then version 1 over it
        return seen

    replicas.versions = versions_while_version_2_is_published  # type: ignore[method-assign]
    assert latest.catch_up() is True
    publishing.join()
    assert fleet.versions == [2, 2]
    assert [version for version, _ in fleet.loaded] == [1, 1, 2]
