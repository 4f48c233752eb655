"""Which version of a policy answers a request, and what each version did: pure bookkeeping.

A policy with a ``canary`` section has two versions: ``stable`` (its ``model``) and ``canary``
(the candidate). ``VersionRouter`` sends a whole request one way: to the candidate with
probability ``share`` (split mode), never (shadow mode: the candidate runs on a copy, off the
request path), or as a request forces it. ``VariantStats`` counts answers and their latency,
``ShadowStats`` how often the candidate's actions agree with the stable ones, ``EpisodeReturns``
the return of each client's episodes, by the version that acted them. No I/O, no clock, no Ray:
the gateway's ``candidate`` module drives them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np

from policy_server.errors import NoCandidate
from policy_server.policies.spaces import ActionSample, ActionSpace
from policy_server.schema.canary import CanarySpec

Variant = Literal["stable", "canary"]
VARIANTS: tuple[Variant, ...] = ("stable", "canary")
Routing = Literal["split", "shadow", "off"]
BOX_AGREEMENT_TOL = 1e-3
"""Two continuous actions agree when every component is within this (absolute and relative)."""
MAX_TRACKED_CLIENTS = 10_000
"""Clients whose episode in progress is remembered; the longest silent one is forgotten first."""


class VersionRouter:
    """Routes requests between the stable version and the candidate (``None``: there is none).

    ``routing`` is ``split`` (the candidate answers ``share`` of the requests), ``shadow`` (it
    answers none and runs on copies) or ``off`` (rolled back or promoted: it answers only requests
    that force it).
    """

    def __init__(self, canary: CanarySpec | None) -> None:
        self.has_candidate = canary is not None
        self.routing: Routing = canary.mode if canary is not None else "off"
        self.share = canary.share if canary is not None else 0.0

    def choose(self, rng: np.random.Generator, forced: Variant | None = None) -> Variant:
        """The version that answers one request: ``forced`` if given (raises NoCandidate when it
        is ``canary`` and there is none), else the candidate with probability ``share`` in split
        mode, else stable. Draws from ``rng`` only in split mode."""
        if forced == "canary":
            self.require_candidate()
        if forced is not None:
            return forced
        if self.routing == "split" and rng.random() < self.share:
            return "canary"
        return "stable"

    @property
    def shadows(self) -> bool:
        """Whether requests the stable version answers also run on the candidate."""
        return self.routing == "shadow"

    def require_candidate(self) -> None:
        if not self.has_candidate:
            raise NoCandidate("this policy has no candidate version: add `canary: {model: <file>, share: 0.1}` "
                              "to its schema")

    def set_share(self, share: float | None, mode: Literal["split", "shadow"]) -> None:
        """Route ``share`` (0 < share <= 1) of the requests to the candidate (``split``), or
        shadow it (``share`` None); raises NoCandidate. The share's range is the caller's check."""
        self.require_candidate()
        self.routing, self.share = mode, (share if mode == "split" and share is not None else 0.0)

    def stop(self) -> None:
        """No request goes to the candidate any more (rollback, promote); raises NoCandidate."""
        self.require_candidate()
        self.routing, self.share = "off", 0.0


@dataclass
class VariantStats:
    """What one version answered in this gateway process: requests and their latency."""

    requests: int = 0
    seconds: float = 0.0
    episodes: int = 0
    returns: float = 0.0

    def answered(self, seconds: float) -> None:
        self.requests += 1
        self.seconds += seconds

    def episode(self, episode_return: float) -> None:
        self.episodes += 1
        self.returns += episode_return

    @property
    def mean_latency_s(self) -> float | None:
        return self.seconds / self.requests if self.requests else None

    @property
    def mean_return(self) -> float | None:
        return self.returns / self.episodes if self.episodes else None


@dataclass
class ShadowStats:
    """Observations the shadow candidate ran on, and on how many its action agreed with stable's."""

    rows: int = 0
    agreed: int = 0
    failures: int = 0

    def compared(self, agreements: list[bool]) -> None:
        self.rows += len(agreements)
        self.agreed += sum(agreements)

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.rows if self.rows else None


def mode_agreements(
    space: ActionSpace, stable: list[np.ndarray], candidate: list[np.ndarray], mask: np.ndarray | None = None
) -> list[bool]:
    """Per observation, whether the two versions' heads (each ``(B, ...)``) answer the same
    deterministic action: the modes of the *allowed* actions under ``mask`` (bool ``(B,
    mask_width)``, None: every action), what each version would answer ``/predict_deterministic``.
    Unmasked modes would count a candidate that prefers an illegal action as disagreeing, though it
    answers what stable does."""
    return agreements(space.mode(stable, mask), space.mode(candidate, mask))


def agreements(stable: list[ActionSample], candidate: list[ActionSample]) -> list[bool]:
    """Per observation, whether the two versions' most likely actions agree: the same index (or
    indices) for discrete and tuple actions, means within ``BOX_AGREEMENT_TOL`` for a box.
    Compares modes, not samples: two samples of one distribution differ by chance."""
    return [bool(np.allclose(np.asarray(s.action, dtype=np.float64), np.asarray(c.action, dtype=np.float64),
                             rtol=BOX_AGREEMENT_TOL, atol=BOX_AGREEMENT_TOL))
            for s, c in zip(stable, candidate, strict=True)]


@dataclass
class _Episode:
    variant: Variant | None
    running: float = 0.0
    mixed: bool = False


class EpisodeReturns:
    """Each client's episode in progress: which version acts it and its return so far.

    ``/collect_experience`` sends, with each observation, the reward and ``done`` of the client's
    previous action; an episode's steps stay with the version that acted its first (``variant_of``),
    so that episode returns compare the versions. An episode whose steps were acted by both
    versions (a request forced the other), or by one not known (None), counts for neither. At most
    ``max_clients`` clients are remembered (the longest silent one is forgotten).
    """

    def __init__(self, max_clients: int = MAX_TRACKED_CLIENTS) -> None:
        self.max_clients = max_clients
        self._episodes: OrderedDict[str, _Episode] = OrderedDict()

    def variant_of(self, client_id: str) -> Variant | None:
        """The version acting the client's episode in progress (None: it starts a new one, or its
        version is not known)."""
        episode = self._episodes.get(client_id)
        return episode.variant if episode is not None and not episode.mixed else None

    def step_ended(self, client_id: str, reward: float, done: bool) -> tuple[Variant, float] | None:
        """Credit ``reward`` to the client's episode in progress (none: the reward of a first call,
        ignored); when ``done``, end it and return (its version, its return), unless it was mixed
        or acted by an unknown version."""
        episode = self._episodes.get(client_id)
        if episode is None:
            return None
        episode.running += reward
        if not done:
            return None
        del self._episodes[client_id]
        return None if episode.mixed or episode.variant is None else (episode.variant, episode.running)

    def acted(self, client_id: str, variant: Variant | None) -> None:
        """The client's next step is acted by ``variant`` (None: not known); starts an episode if
        none is in progress."""
        episode = self._episodes.get(client_id)
        if episode is None:
            episode = self._episodes[client_id] = _Episode(variant)
            while len(self._episodes) > self.max_clients:
                self._episodes.popitem(last=False)
        elif episode.variant != variant:
            episode.mixed = True
        self._episodes.move_to_end(client_id)
