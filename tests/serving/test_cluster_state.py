"""The leases of several gateways on the cluster's shared apps and trainers, without Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import multi_policy_schema

from policy_server.schema.config import parse_schema
from policy_server.serving.runtime.cluster_state import ClaimConflict, Leases, fingerprint, policy_fingerprint

LEASE_S = 30.0


def test_the_first_gateway_creates_the_others_join_and_the_last_to_leave_removes() -> None:
    leases = Leases()
    assert leases.claim("a", "app", "f1", LEASE_S, now=0) == "create"
    assert leases.claim("b", "app", "f1", LEASE_S, now=1) == "join"
    assert leases.leave("b", now=2) == []  # a still holds it: b's shutdown leaves it running
    assert leases.holders("app", now=2) == ["a"]
    assert leases.leave("a", now=3) == ["app"]
    assert leases.holders("app", now=3) == []
    assert leases.claim("c", "app", "f1", LEASE_S, now=4) == "create"  # forgotten once removed


def test_a_gateway_killed_without_leaving_stops_counting_when_its_lease_runs_out() -> None:
    leases = Leases()
    leases.claim("a", "app", "f1", LEASE_S, now=0)
    leases.claim("b", "app", "f1", LEASE_S, now=0)
    leases.renew("a", {"app": "f1"}, LEASE_S, now=25)  # b was SIGKILLed: it renews no more
    assert leases.holders("app", now=31) == ["a"]
    assert leases.leave("a", now=31) == ["app"]


def test_a_live_lease_keeps_the_app_when_the_killed_gateways_has_not_run_out() -> None:
    leases = Leases()
    leases.claim("a", "app", "f1", LEASE_S, now=0)
    leases.claim("b", "app", "f1", LEASE_S, now=0)
    assert leases.leave("a", now=10) == []  # b's lease runs until 30: it may still be alive


def test_another_schema_is_refused_while_live_gateways_serve_the_app() -> None:
    leases = Leases()
    leases.claim("a", "app", "f1", LEASE_S, now=0)
    with pytest.raises(ClaimConflict, match=r"app runs on this Ray cluster for 1 other gateway\(s\) \(a\) built from another schema"):
        leases.claim("b", "app", "f2", LEASE_S, now=1)
    assert leases.holders("app", now=1) == ["a"]  # the refused claim is not recorded
    assert leases.claim("a", "app", "f2", LEASE_S, now=2) == "replace"  # its own holder may change it


def test_another_schema_replaces_what_expired_gateways_left() -> None:
    leases = Leases()
    leases.claim("a", "app", "f1", LEASE_S, now=0)  # a was killed
    assert leases.claim("b", "app", "f1", LEASE_S, now=40) == "join"  # same schema: take it over as it is
    leases.claim("c", "trainer", "f1", LEASE_S, now=0)
    assert leases.claim("d", "trainer", "f2", LEASE_S, now=40) == "replace"
    assert leases.claim("e", "trainer", "f2", LEASE_S, now=41) == "join"


def test_a_renewal_reenters_the_leases_a_restarted_registry_forgot() -> None:
    leases = Leases()  # the registry actor restarted empty
    leases.renew("a", {"app": "f1", "app-trainer": "f1"}, LEASE_S, now=5)
    assert leases.holders("app", now=6) == ["a"]
    with pytest.raises(ClaimConflict):
        leases.claim("b", "app-trainer", "f2", LEASE_S, now=6)
    assert leases.leave("a", now=7) == ["app", "app-trainer"]


def test_leaving_releases_only_what_the_gateway_held() -> None:
    leases = Leases()
    leases.claim("a", "one", "f1", LEASE_S, now=0)  # a was killed; its lease ran out
    leases.claim("b", "two", "f1", LEASE_S, now=0)
    assert leases.leave("b", now=50) == ["two"]
    assert leases.leave("nobody", now=50) == []


def test_fingerprints_tell_their_parts_apart() -> None:
    assert fingerprint("spec", b"model") == fingerprint("spec", b"model")
    assert fingerprint("spec", b"model") != fingerprint("spec", b"model2")
    assert fingerprint("ab", "c") != fingerprint("a", "bc")
    assert len(fingerprint("x")) == 16


def test_a_policys_fingerprint_leaves_out_its_candidate(model_dir: Path) -> None:
    """The candidate runs in an app of its own: adding or changing a `canary` leaves the policy's
    app and trainer as they are on the cluster (no conflict with gateways serving it without)."""
    raw = multi_policy_schema(model_dir)
    plain = parse_schema(raw, model_dir).policies["lpoc"]
    raw["policies"]["lpoc"]["canary"] = {"model": "lpoc.pt", "share": 0.2}
    with_canary = parse_schema(raw, model_dir).policies["lpoc"]
    assert with_canary.canary is not None
    assert policy_fingerprint(with_canary, b"m", False) == policy_fingerprint(plain, b"m", False)
