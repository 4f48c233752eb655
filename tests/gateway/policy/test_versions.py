"""The pure bookkeeping of a policy's versions: routing by share, forced versions, statistics,
shadow agreement, episode returns per version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from policy_server.errors import NoCandidate
from policy_server.gateway.policy.versions import (
    EpisodeReturns,
    ShadowStats,
    VariantStats,
    VersionRouter,
    agreements,
    mode_agreements,
)
from policy_server.policies.spaces import ActionSample, DiscreteSpace, TupleSpace
from policy_server.schema.canary import CanarySpec


def router(share: float = 0.1, mode: str = "split") -> VersionRouter:
    return VersionRouter(CanarySpec(model=Path("/m/candidate.pt2"), mode=mode, share=share))  # type: ignore[arg-type]


@pytest.mark.parametrize("share", [0.1, 0.5, 1.0])
def test_a_share_routes_that_fraction_of_requests(share: float) -> None:
    rng = np.random.default_rng(0)
    n = 10_000
    canary = sum(router(share).choose(rng) == "canary" for _ in range(n))
    sd = (n * share * (1 - share)) ** 0.5
    assert abs(canary - n * share) <= 5 * sd  # binomial bounds: fails once in 3.5 million runs


def test_shadow_and_off_route_nothing_and_a_forced_version_wins() -> None:
    rng = np.random.default_rng(0)
    shadow = router(0.0, "shadow")
    assert shadow.shadows and {shadow.choose(rng) for _ in range(100)} == {"stable"}
    assert shadow.choose(rng, "canary") == "canary"
    full = router(1.0)
    assert full.choose(rng, "stable") == "stable" and full.choose(rng) == "canary"
    full.stop()
    assert (full.routing, full.share, full.choose(rng)) == ("off", 0.0, "stable")
    full.set_share(0.3, "split")
    assert (full.routing, full.share) == ("split", 0.3)
    full.set_share(None, "shadow")
    assert (full.routing, full.share, full.shadows) == ("shadow", 0.0, True)


def test_without_a_candidate_nothing_routes_to_it_and_asking_is_a_conflict() -> None:
    plain = VersionRouter(None)
    rng = np.random.default_rng(0)
    assert plain.choose(rng) == "stable" and plain.routing == "off"
    for refused in (lambda: plain.choose(rng, "canary"), plain.stop, lambda: plain.set_share(0.5, "split")):
        with pytest.raises(NoCandidate, match="canary"):
            refused()


def test_the_router_draws_only_in_split_mode() -> None:
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    router(0.0, "shadow").choose(rng)
    router(0.5).choose(rng, "stable")
    assert rng.bit_generator.state == state  # a shadow or forced request leaves the action sampling as it was


def test_variant_and_shadow_stats() -> None:
    stats = VariantStats()
    assert (stats.mean_latency_s, stats.mean_return) == (None, None)
    for seconds in (0.001, 0.003):
        stats.answered(seconds)
    stats.episode(10.0)
    stats.episode(20.0)
    assert (stats.requests, stats.mean_latency_s, stats.episodes, stats.mean_return) == (2, pytest.approx(0.002), 2, 15.0)
    shadow = ShadowStats()
    assert shadow.agreement is None
    shadow.compared([True, False, True, True])
    assert (shadow.rows, shadow.agreed, shadow.agreement) == (4, 3, 0.75)


def test_agreement_compares_actions_exactly_for_indices_and_within_a_tolerance_for_vectors() -> None:
    def samples(*actions: object) -> list[ActionSample]:
        return [ActionSample(a, 0.0, None) for a in actions]  # type: ignore[arg-type]

    assert agreements(samples(1, 2, [0, 1]), samples(1, 3, [0, 1])) == [True, False, True]
    assert agreements(samples([0.5, -0.25]), samples([0.5004, -0.2502])) == [True]
    assert agreements(samples([0.5, -0.25]), samples([0.51, -0.25])) == [False]
    with pytest.raises(ValueError):
        agreements(samples(1), samples(1, 2))


def test_shadow_agreement_compares_the_modes_of_the_allowed_actions() -> None:
    """Stable prefers action 0, the candidate action 3, both action 1 next: with 0 and 3 masked
    both answer 1 (they agree); unmasked they would not."""
    space = DiscreteSpace(4)
    stable, candidate = [np.array([[5.0, 2.0, 0.0, 0.0]] * 2)], [np.array([[0.0, 2.0, 0.0, 5.0]] * 2)]
    mask = np.array([[False, True, True, False], [True, True, True, True]])
    assert mode_agreements(space, stable, candidate) == [False, False]
    assert mode_agreements(space, stable, candidate, mask) == [True, False]
    tuple_space = TupleSpace([2, 3])  # per component: the second is masked to one action
    heads = [np.array([[1.0, 0.0]]), np.array([[3.0, 0.0, 0.0]])], [np.array([[1.0, 0.0]]), np.array([[0.0, 0.0, 3.0]])]
    assert mode_agreements(tuple_space, *heads) == [False]
    assert mode_agreements(tuple_space, *heads, np.array([[True, True, False, True, False]])) == [True]


def test_an_episode_stays_with_the_version_that_acted_its_first_step() -> None:
    episodes = EpisodeReturns()
    assert episodes.step_ended("a", 5.0, False) is None  # a first call's reward belongs to no step
    assert episodes.variant_of("a") is None
    episodes.acted("a", "canary")
    assert episodes.variant_of("a") == "canary"
    assert episodes.step_ended("a", 1.0, False) is None
    episodes.acted("a", "canary")
    assert episodes.step_ended("a", 2.0, True) == ("canary", 3.0)
    assert episodes.variant_of("a") is None
    episodes.acted("a", "stable")
    episodes.step_ended("a", 1.0, False)
    episodes.acted("a", "canary")  # forced the other way mid-episode: counts for neither
    assert episodes.step_ended("a", 1.0, True) is None


def test_episode_returns_forget_the_longest_silent_client_beyond_the_bound() -> None:
    episodes = EpisodeReturns(max_clients=2)
    for client in ("a", "b"):
        episodes.acted(client, "stable")
    episodes.acted("a", "stable")  # a is heard from again: b is now the longest silent
    episodes.acted("c", "canary")
    assert [episodes.variant_of(c) for c in ("a", "b", "c")] == ["stable", None, "canary"]
