"""What the gateways on one Ray cluster share (Serve apps, trainer actors), and which gateway
removes it: the last one that leaves.

Several gateways (``uvicorn app:app`` with ``RAY_ADDRESS``, or ``uvicorn --workers N``) serve one
schema from one set of Serve apps and one trainer actor per trainable policy. Each gateway holds a
*lease* on every app and trainer it uses, in ``Registry``: one small named, detached actor per
cluster (``policy-server-registry`` in namespace ``policy-server``, no CPU), which keeps the leases
in a plain ``Leases``. A gateway renews its leases every third of ``POLICY_SERVER_GATEWAY_LEASE_S``;
when it shuts down it gives them up, and it deletes what no other gateway holds a live lease on.
A gateway killed without shutting down (SIGKILL, a lost node) stops counting when its leases run
out, so it never keeps an app alive for ever; what it leaves behind keeps serving, and the next
gateway of the same schema takes it over as it is (its trainer too, with its training state).

Why leases in an actor, and not:

- Ray's internal KV store: deciding "nobody else holds it, so I delete it" must be one atomic step,
  and the KV store has no transactions; an actor runs one method at a time. The leases' expiry is
  on the actor's own monotonic clock, so the nodes' clocks need not agree.
- the liveness of each gateway's Ray job: reading the job table needs the dashboard's state API
  (``ray.util.state``, absent on a cluster started without the dashboard) or Ray's private GCS
  calls.
- an explicit ``deploy`` / ``undeploy`` step: it keeps ``uvicorn app:app`` the one command, and a
  forgotten ``undeploy`` would leave the apps running for ever.

If the registry actor dies, Ray restarts it empty and each gateway's next renewal re-enters its
leases. Each app and trainer carries the *fingerprint* of what it was built from (the policy's
spec and model bytes); a gateway whose schema differs from what live gateways serve is refused at
start-up, and one that finds only expired leases replaces the app (and the trainer) with its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import ray

from policy_server.errors import StartupError

if TYPE_CHECKING:
    from policy_server.schema.config import PolicySpec

log = logging.getLogger(__name__)

NAMESPACE = "policy-server"
"""The Ray namespace of the registry and of the trainer actors (fixed, so every gateway finds them)."""
REGISTRY = "policy-server-registry"
TRAINER_GONE_TIMEOUT_S = 30.0

Claim = Literal["create", "join", "replace"]
"""What a gateway does with an app or trainer it claims: ``create`` it (nobody has it), ``join``
what is there (same fingerprint; deploy it only if it is gone), or ``replace`` what expired
gateways left with another fingerprint."""


class ClaimConflict(StartupError):
    """Live gateways serve another version of the app or trainer this gateway asked for."""


@dataclass
class Holding:
    """One shared app or trainer: what it was built from, and who holds it until when."""

    fingerprint: str
    expiries: dict[str, float] = field(default_factory=dict)
    """gateway id -> end of its lease (s, on the registry's monotonic clock)."""

    def live(self, now: float, besides: str | None = None) -> list[str]:
        return sorted(g for g, end in self.expiries.items() if end > now and g != besides)


class Leases:
    """The leases of the gateways on the cluster's shared apps and trainers (pure: ``now`` is given)."""

    def __init__(self) -> None:
        self.held: dict[str, Holding] = {}

    def claim(self, gateway: str, resource: str, fingerprint: str, lease_s: float, now: float) -> Claim:
        """Hold ``resource`` for ``lease_s`` seconds from ``now``, and say how to get it.

        Raises:
            ClaimConflict: live gateways hold it with another fingerprint (nothing is recorded).
        """
        holding = self.held.get(resource)
        if holding is None:
            self.held[resource] = Holding(fingerprint, {gateway: now + lease_s})
            return "create"
        others = holding.live(now, besides=gateway)
        if holding.fingerprint != fingerprint and others:
            raise ClaimConflict(
                f"{resource} runs on this Ray cluster for {len(others)} other gateway(s) ({', '.join(others)}) "
                f"built from another schema or model file: serve the same schema and models as they do, "
                f"stop them first, or set another POLICY_SERVER_SERVE_APP_PREFIX"
            )
        claim: Claim = "join" if holding.fingerprint == fingerprint else "replace"
        holding.fingerprint = fingerprint
        holding.expiries = {g: end for g, end in holding.expiries.items() if end > now}
        holding.expiries[gateway] = now + lease_s
        return claim

    def renew(self, gateway: str, fingerprints: dict[str, str], lease_s: float, now: float) -> None:
        """Extend ``gateway``'s leases on ``fingerprints`` (resource -> fingerprint) to ``now + lease_s``;
        a lease the registry forgot (it restarted) is entered again."""
        for resource, fingerprint in fingerprints.items():
            holding = self.held.setdefault(resource, Holding(fingerprint))
            holding.expiries[gateway] = now + lease_s

    def leave(self, gateway: str, now: float) -> list[str]:
        """Drop ``gateway``'s leases; the resources it held that no live gateway holds any more are
        forgotten and returned: the caller removes them."""
        released = []
        for resource, holding in list(self.held.items()):
            if holding.expiries.pop(gateway, None) is not None and not holding.live(now):
                del self.held[resource]
                released.append(resource)
        return sorted(released)

    def holders(self, resource: str, now: float) -> list[str]:
        """The gateways whose lease on ``resource`` is live at ``now``."""
        holding = self.held.get(resource)
        return holding.live(now) if holding is not None else []


@ray.remote(num_cpus=0, max_restarts=-1)
class Registry:
    """``Leases`` on the registry's clock, one method at a time (a Ray actor's default)."""

    def __init__(self) -> None:
        self.leases = Leases()

    def claim(self, gateway: str, resource: str, fingerprint: str, lease_s: float) -> tuple[Claim | None, str]:
        """(the claim, "") or (None, why it conflicts): raised in the gateway, not through Ray's wrapper."""
        try:
            return self.leases.claim(gateway, resource, fingerprint, lease_s, time.monotonic()), ""
        except ClaimConflict as exc:
            return None, exc.message

    def renew(self, gateway: str, fingerprints: dict[str, str], lease_s: float) -> None:
        self.leases.renew(gateway, fingerprints, lease_s, time.monotonic())

    def leave(self, gateway: str) -> list[str]:
        return self.leases.leave(gateway, time.monotonic())

    def holders(self, resource: str) -> list[str]:
        return self.leases.holders(resource, time.monotonic())


class Membership:
    """This gateway's leases in the cluster's registry (created by the first gateway that asks).

    Blocking methods (one actor call each) run in worker threads; ``renew_forever`` in the event loop.
    """

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.gateway = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.registry = Registry.options(  # type: ignore[attr-defined]
            name=REGISTRY, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
        ).remote()
        self.held: dict[str, str] = {}  # resource -> fingerprint

    def claim(self, resource: str, fingerprint: str) -> Claim:
        """Hold ``resource`` (blocking). Raises ClaimConflict (see ``Leases.claim``)."""
        claim, conflict = ray.get(self.registry.claim.remote(self.gateway, resource, fingerprint, self.lease_s))
        if claim is None:
            raise ClaimConflict(conflict)
        self.held[resource] = fingerprint
        return claim  # type: ignore[no-any-return]

    async def renew_forever(self) -> None:
        """Renew the leases every third of their length until cancelled; a failed renewal is logged
        and tried again (the registry may be restarting)."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.registry.renew.remote(self.gateway, dict(self.held), self.lease_s)
            except ray.exceptions.RayError as exc:
                log.warning("could not renew this gateway's leases on the cluster's apps: %s", exc)

    def leave(self) -> list[str]:
        """Give up every lease (blocking); returns what no other live gateway holds."""
        released: list[str] = ray.get(self.registry.leave.remote(self.gateway))
        self.held.clear()
        return released

    def holders(self, resource: str) -> list[str]:
        """The gateways holding a live lease on ``resource`` (blocking)."""
        return ray.get(self.registry.holders.remote(resource))  # type: ignore[no-any-return]


def fingerprint(*parts: str | bytes) -> str:
    """A short digest of what an app or trainer is built from (spec JSON, model bytes, flags)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part.encode() if isinstance(part, str) else part).digest())
    return digest.hexdigest()[:16]


def await_gone(name: str) -> None:
    """Wait until Ray has freed the trainer's name (a killed actor's name stays taken until it is
    dead), so a gateway starting next creates a new trainer instead of finding the dying one."""
    deadline = time.monotonic() + TRAINER_GONE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.1)
    log.warning("trainer %s was killed but still has its name after %.0f s", name, TRAINER_GONE_TIMEOUT_S)


def end_stale_trainer(name: str, close_timeout_s: float) -> None:
    """Close and kill the trainer that gateways of another schema left behind (blocking), if any."""
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return
    log.warning("replacing trainer %s, left by gateways of another schema", name)
    try:
        ray.get(actor.close.remote(), timeout=close_timeout_s)
    except ray.exceptions.RayError as exc:
        log.warning("the trainer did not close cleanly: %s", exc)
    ray.kill(actor)
    await_gone(name)


def policy_fingerprint(spec: PolicySpec, model: bytes, gpus: bool) -> str:
    """What a policy's app and trainer are built from: its spec (training included; its candidate,
    which runs in an app of its own, not), model, GPUs."""
    return fingerprint(spec.model_dump_json(exclude={"canary"}), model, str(gpus))
