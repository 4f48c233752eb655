"""Start-up's watch over placement: a replica or trainer that no node places is named, with what it
asks and what the cluster has free, instead of waited for without a word.

Ray keeps an actor that no node can place pending for ever, and Ray Serve says so only after 30 s,
in a status message. ``PlacementWatch`` decides from what it is shown (pure, tested without Ray);
``unplaced_replicas`` and ``unplaced_actor`` read Ray's actor table.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from policy_server.errors import StartupError

log = logging.getLogger(__name__)

POLL_S = 0.5  # seconds between looks at an actor that is not ready yet
SAY_EVERY_S = 30.0
"""How often start-up says it still waits for resources, with ``wait_for_resources`` on."""
_FREE, _LOWER, _MORE = ("free them (`ray status` shows what holds them)", "lower the schema's num_cpus / num_gpus",
                        "give Ray more (RAY_ADDRESS of a larger cluster)")
HOW_TO_FREE = f"{_FREE}, {_LOWER}, or {_MORE}"
"""What to do about resources that are missing, said while start-up waits for them."""
HOW_TO = f"{_FREE}, {_LOWER}, {_MORE}, or set POLICY_SERVER_WAIT_FOR_RESOURCES=true to wait for an autoscaling cluster"
"""... and when start-up refuses to wait."""
SHOWN = ("CPU", "GPU", "memory")
"""Resources every message shows; others (custom ones, accelerator types) only when asked for."""
GIB = 1024**3


@dataclass(frozen=True)
class Unplaced:
    """``count`` actors of one deployment (or one trainer) that wait for a node to place them."""

    what: str
    """``deployment llm-policy of Serve app policy-server-llm-policy``, ``actor policy-server-cart-trainer``."""
    count: int
    ask: Mapping[str, float] | None
    """What each asks Ray for (``{"CPU": 1.0}``); None where start-up does not know it."""


def describe_resources(amounts: Mapping[str, float]) -> str:
    """``{"CPU": 1.0, "memory": 2 * GIB}`` → ``1 CPU, 2 GiB memory``."""
    return ", ".join(_amount(key, value) for key, value in amounts.items()) or "nothing"


def _amount(key: str, value: float, of: float | None = None) -> str:
    scale, unit = (GIB, f"GiB {key}") if key == "memory" else (1, key)
    total = f" of {of / scale:.3g}" if of is not None else ""
    return f"{value / scale:.3g}{total} {unit}"


def placement_message(unplaced: list[Unplaced], free: Mapping[str, float], total: Mapping[str, float]) -> str:
    """What start-up says of actors that wait for a node: each, what it asks, what is free.

    ``free`` is ``ray.available_resources()``, ``total`` ``ray.cluster_resources()``.
    """
    asked = {key for u in unplaced if u.ask for key, value in u.ask.items() if value > 0}
    keys = [k for k in SHOWN if k in total or k in asked] + sorted(asked - set(SHOWN))
    parts = []
    for u in unplaced:
        each = f"its {u.count} replicas each ask" if u.count > 1 else "it asks"
        ask = describe_resources({k: v for k, v in u.ask.items() if v > 0}) if u.ask is not None else None
        parts.append(f"{u.what} cannot be placed: {each} for {ask}" if ask else f"{u.what} cannot be placed")
    have = ", ".join(_amount(k, free.get(k, 0.0), total.get(k, 0.0)) for k in keys)
    return "; ".join(parts) + f"; the cluster has free: {have}"


class PlacementWatch:
    """What start-up does, poll by poll, about its own actors that wait for a node.

    Unplaced longer than ``grace_s`` (seconds), start-up fails (``StartupError`` naming each, its
    ask and what is free); with ``wait`` it keeps waiting instead and says so then and every
    ``say_every_s``. Time is passed in (``now``: monotonic seconds), so the decision tests without
    a clock or Ray.
    """

    def __init__(self, grace_s: float, wait: bool, say_every_s: float = SAY_EVERY_S) -> None:
        self.grace_s, self.wait, self.say_every_s = grace_s, wait, say_every_s
        self.since: float | None = None  # when the current stretch of waiting for a node began
        self.said: float | None = None

    def observe(
        self, now: float, unplaced: list[Unplaced], free: Mapping[str, float], total: Mapping[str, float]
    ) -> str | None:
        """The message to log now (None: nothing to say yet).

        Raises:
            StartupError: something stayed unplaced ``grace_s`` and ``wait`` is off.
        """
        if not unplaced:
            self.since = self.said = None
            return None
        if self.since is None:
            self.since = now
        waited = now - self.since
        if waited < self.grace_s:
            return None
        message = placement_message(unplaced, free, total)
        if not self.wait:
            raise StartupError(f"{message} (waited {waited:.0f} s); {HOW_TO}")
        if self.said is not None and now - self.said < self.say_every_s:
            return None
        self.said = now
        return f"{message}; still waiting for them ({waited:.0f} s, POLICY_SERVER_WAIT_FOR_RESOURCES)"


def unplaced_replicas(app_name: str, ask: Mapping[str, float] | None) -> list[Unplaced]:
    """The deployments of Serve app ``app_name`` with replicas that no node has placed yet;
    ``ask``: what each replica asks, where start-up knows it (one deployment per app here)."""
    prefix = f"ServeReplica:{app_name}:"  # Serve's replica actor class (DeploymentID.to_replica_actor_class_name)
    counts: dict[str, int] = {}
    for actor in _pending_actors():
        if actor["ActorClassName"].startswith(prefix) and _unplaced(actor):
            deployment = actor["ActorClassName"][len(prefix):]
            counts[deployment] = counts.get(deployment, 0) + 1
    return [
        Unplaced(f"deployment {name} of Serve app {app_name}", count, ask)
        for name, count in sorted(counts.items())
    ]


def unplaced_actor(name: str, ask: Mapping[str, float]) -> list[Unplaced]:
    """The named actor, when no node has placed it yet (else nothing)."""
    pending = any(actor["Name"] == name and _unplaced(actor) for actor in _pending_actors())
    return [Unplaced(f"actor {name}", 1, ask)] if pending else []


def _pending_actors() -> list[dict[str, Any]]:
    # Ray's actor table, read from the GCS. Ray's state API (ray.util.state.list_actors) reads the
    # same table but through the dashboard, which the gateway starts Ray without (and a cluster may
    # run without): this is the call `ray.util.state` has no dashboard-free form of.
    from ray._private.state import actors

    return list(actors(actor_state_name="PENDING_CREATION").values())


def _unplaced(actor: Mapping[str, Any]) -> bool:
    """A pending actor without a worker process: no node has granted it its resources yet (one that
    was placed has a pid while its constructor runs, a model's load for instance)."""
    return not actor["Pid"]


def cluster_resources() -> tuple[dict[str, float], dict[str, float]]:
    """What the cluster has free now, and in all (Ray's resource names)."""
    import ray

    return ray.available_resources(), ray.cluster_resources()


def wait_ready(
    ready: Any,
    timeout_s: float,
    unplaced: Callable[[], list[Unplaced]],
    watch: PlacementWatch,
    cancelled: threading.Event,
) -> None:
    """Wait for ``ready`` (an actor call's ``ObjectRef``) while ``watch`` looks at ``unplaced()``.

    Raises:
        StartupError: the actor stayed unplaced (``PlacementWatch``), or start-up was cancelled.
        ray.exceptions.GetTimeoutError: not ready within ``timeout_s`` seconds.
    """
    import ray

    deadline = time.monotonic() + timeout_s
    while not ray.wait([ready], timeout=POLL_S)[0]:
        if cancelled.is_set():
            raise StartupError("start-up cancelled while an actor was starting")
        note = watch.observe(time.monotonic(), unplaced(), *cluster_resources())
        if note:
            log.warning("%s", note)
        if time.monotonic() > deadline:
            raise ray.exceptions.GetTimeoutError(f"not ready within {timeout_s:g} s")
    ray.get(ready)
