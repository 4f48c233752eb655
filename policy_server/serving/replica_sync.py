"""A trainer's weights on every replica of its policy, including replicas that start later.

Serve's ``broadcast`` reaches the replicas running when it is called. A replica that Serve starts
afterwards (``num_replicas: auto`` scaling up, a dead replica replaced) loads the model file,
version 0, and would serve it until the next update, or for ever once training stops. So
``LatestWeights`` keeps the last published weights and, every ``period_s``, asks the replicas for
their versions and publishes again when one is behind. Serve has no hook on a replica's start
that could do this (``reconfigure`` takes ``user_config``, which travels through Serve's
controller and is no place for weights), hence this loop of our own.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

import numpy as np

from policy_server.errors import summary

log = logging.getLogger(__name__)
SYNC_PERIOD_S = 1.0
"""How long a new replica may serve the model file's version: one broadcast of ``version`` a period."""
PUBLISH_TIMEOUT_S = 60.0

Weights = dict[str, np.ndarray]


class PolicyReplicas(Protocol):
    """Every running replica of a policy's deployment, each call made on all of them."""

    def versions(self) -> list[int]: ...

    def set_weights(self, weights: Weights, version: int) -> list[int]: ...


class ServePolicyReplicas:
    """``PolicyReplicas`` over a Serve deployment handle (Serve's ``broadcast`` names the method)."""

    def __init__(self, handle: Any, timeout_s: float = PUBLISH_TIMEOUT_S) -> None:
        self.handle, self.timeout_s = handle, timeout_s

    def versions(self) -> list[int]:
        return self.handle.broadcast("version").results(timeout_s=self.timeout_s)  # type: ignore[no-any-return]

    def set_weights(self, weights: Weights, version: int) -> list[int]:
        return self.handle.broadcast("set_weights", weights, version).results(  # type: ignore[no-any-return]
            timeout_s=self.timeout_s)


class LatestWeights:
    """Publishes weights to every replica and brings replicas that missed them up to date.

    ``publish`` and ``catch_up`` hold one lock, so a catch-up never sends an older version over a
    newer one. ``start`` runs ``catch_up`` every ``period_s`` seconds in a daemon thread until
    ``close``.
    """

    def __init__(self, replicas: PolicyReplicas, period_s: float = SYNC_PERIOD_S) -> None:
        self.replicas, self.period_s = replicas, period_s
        self._latest: tuple[Weights, int] | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.caught_up = 0  # catch-up publishes so far

    def publish(self, weights: Weights, version: int) -> None:
        """Load ``weights`` as ``version`` into every running replica; raises what a replica or
        Serve raised (``ValueError`` for weights a replica refuses, ``TimeoutError`` after
        ``PUBLISH_TIMEOUT_S``), and the weights are not kept for catch-up then."""
        with self._lock:
            self.replicas.set_weights(weights, version)
            self._latest = weights, version

    def catch_up(self) -> bool:
        """Publish the latest weights again if a replica serves an older version; returns whether
        it did. Nothing published yet: nothing to do (every replica serves the model file)."""
        with self._lock:
            if self._latest is None:
                return False
            weights, version = self._latest
            if min(self.replicas.versions(), default=version) >= version:
                return False
            self.replicas.set_weights(weights, version)
            self.caught_up += 1
            return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="replica-catch-up", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.wait(self.period_s):
            try:
                if self.catch_up():
                    log.info("a replica served an older version: published version %d again", self._version())
            except Exception as exc:  # noqa: BLE001 - replicas starting or stopping: try again next period
                log.warning("could not check the replicas' versions: %s", summary(exc))

    def _version(self) -> int:
        return self._latest[1] if self._latest is not None else 0

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=PUBLISH_TIMEOUT_S)
