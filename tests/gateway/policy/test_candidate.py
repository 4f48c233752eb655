"""A policy's candidate version over the HTTP API in-process (TestClient, local backend: no Ray):
routing, the version named in every answer, shadow agreement, promote, rollback, episode returns."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import API_KEY, LPOC_OBS, LPOC_OBSERVATIONS, cart_fragment, fixed_action_model, training_schema
from fastapi.testclient import TestClient

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

AUTH = {"access-token": API_KEY}
CANARY = {"X-Policy-Version": "canary"}


@pytest.fixture(scope="module")
def fixed_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``stable`` always acts 0 (`up`), ``candidate`` always 3 (`left`), ``wide`` takes 12 inputs,
    ``other`` acts like ``candidate`` with a hidden layer of another width (not promotable)."""
    root = tmp_path_factory.mktemp("canary-models")
    return {
        "stable": fixed_action_model(root / "stable.pt2", 0),
        "candidate": fixed_action_model(root / "candidate.pt2", 3),
        "wide": fixed_action_model(root / "wide.pt2", 3, obs_dim=12),
        "other": fixed_action_model(root / "other.pt2", 3, hidden=8),
    }


def canary_schema(models: dict[str, Path], **canary: Any) -> dict[str, Any]:
    """One policy `lpoc` (the default) serving ``models['stable']`` with the given canary section."""
    return {
        "parameters": {"api_key": API_KEY},
        "policies": {"lpoc": {
            "observations": LPOC_OBSERVATIONS,
            "model": str(models["stable"]),
            "action_space": {"type": "discrete", "n": 4, "names": ["up", "right", "down", "left"]},
            "canary": {"model": str(models["candidate"])} | canary,
        }},
    }


def client_for(tmp_path: Path, schema: dict[str, Any]) -> TestClient:
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    settings = Settings(schema_path=path, backend="local", gateway_metrics_port=0, seed=0)
    return TestClient(build_app(settings), headers=AUTH)


@pytest.fixture()
def split(fixed_models: dict[str, Path], tmp_path: Path) -> Iterator[TestClient]:
    with client_for(tmp_path, canary_schema(fixed_models, share=0.5)) as client:
        yield client


def test_every_answer_names_the_version_that_produced_it(split: TestClient) -> None:
    assert split.get("/health/ready").json()["policies"] == {"lpoc": True}  # the candidate answers too
    batch = {"observations": [LPOC_OBS] * 3}
    raw = {"obs": [1.0] * 11}
    for variant, action in (("stable", 0), ("canary", 3)):
        forced = {"X-Policy-Version": variant}
        for path, body in (("/predict", LPOC_OBS), ("/predict_deterministic", LPOC_OBS), ("/predict_raw", raw),
                           ("/collect_experience", {"observation": LPOC_OBS, "client_id": variant})):
            answer = split.post(f"/policies/lpoc{path}", json=body, headers=forced).json()
            assert (answer["variant"], answer["action"], answer["model_version"]) == (variant, action, 0), path
        for path, body in (("/predict/batch", batch), ("/predict_deterministic/batch", batch),
                           ("/predict_raw/batch", {"obs": [[1.0] * 11] * 3})):
            answer = split.post(f"/policies/lpoc{path}", json=body, headers=forced).json()
            assert answer["variant"] == variant and [r["action"] for r in answer["results"]] == [action] * 3, path
        dist = split.post("/distribution", json=LPOC_OBS, headers=forced).json()
        assert dist["variant"] == variant and max(dist["probabilities"], key=dist["probabilities"].get) == \
            ["up", "right", "down", "left"][action]
        assert split.post("/distribution/batch", json=batch, headers=forced).json()["variant"] == variant
    bad = split.post("/predict", json=LPOC_OBS, headers={"X-Policy-Version": "beta"})
    assert bad.status_code == 422, bad.text


def test_a_share_routes_whole_requests_and_the_versions_route_counts_them(split: TestClient) -> None:
    n = 200
    answers = [split.post("/predict_deterministic/batch", json={"observations": [LPOC_OBS] * 2}).json()
               for _ in range(n)]
    canary = sum(a["variant"] == "canary" for a in answers)
    assert 60 < canary < 140  # Binomial(200, 0.5): mean 100, sd 7.1; these bounds are 5.7 sd
    assert all({r["action"] for r in a["results"]} == {3 if a["variant"] == "canary" else 0} for a in answers)
    versions = split.get("/policies/lpoc/versions").json()
    assert versions["routing"] == "split" and versions["share"] == 0.5
    assert (versions["stable"]["requests"], versions["canary"]["requests"]) == (n - canary, canary)
    assert versions["canary"]["model"] == "candidate.pt2" and versions["canary"]["model_version"] == 0
    assert versions["stable"]["mean_latency_s"] > 0


def test_share_rollback_and_promote_through_the_api(split: TestClient) -> None:
    assert split.post("/policies/lpoc/versions/share", json={"share": 1.0}).json()["share"] == 1.0
    assert split.post("/predict", json=LPOC_OBS).json()["variant"] == "canary"
    refused = split.post("/policies/lpoc/versions/share", json={"share": 1.5})
    assert refused.status_code == 422 and refused.json()["error"]["fields"][0]["field"] == "body.share"
    assert split.post("/policies/lpoc/versions/share", json={"mode": "shadow", "share": 0.2}).status_code == 422

    rolled = split.post("/policies/lpoc/versions/rollback").json()
    assert (rolled["routing"], rolled["share"]) == ("off", 0.0)
    assert {split.post("/predict", json=LPOC_OBS).json()["variant"] for _ in range(20)} == {"stable"}
    assert split.post("/predict", json=LPOC_OBS, headers=CANARY).json()["variant"] == "canary"  # still deployed

    promoted = split.post("/policies/lpoc/versions/promote").json()
    assert promoted["model_version"] == 1 and promoted["promoted_version"] == 1
    stable = split.post("/predict_deterministic", json=LPOC_OBS, headers={"X-Policy-Version": "stable"}).json()
    assert (stable["variant"], stable["action"], stable["model_version"]) == ("stable", 3, 1)
    assert split.get("/policies/lpoc/version").json() == {"model_version": 1}


def test_shadow_answers_with_stable_and_records_agreement(fixed_models: dict[str, Path], tmp_path: Path) -> None:
    with client_for(tmp_path, canary_schema(fixed_models, mode="shadow")) as client:
        answers = [client.post("/predict/batch", json={"observations": [LPOC_OBS] * 4}).json() for _ in range(10)]
        assert {a["variant"] for a in answers} == {"stable"}
        assert {r["action"] for a in answers for r in a["results"]} == {0}
        service = client.app.state.services["lpoc"]  # type: ignore[attr-defined]
        client.portal.call(service.versions.drain_shadow)  # type: ignore[union-attr]
        shadow = client.get("/policies/lpoc/versions").json()["shadow"]
        assert shadow["observations"] + 4 * shadow["skipped"] == 40 and shadow["observations"] > 0
        assert shadow["agreed"] == 0 and shadow["agreement"] == 0.0  # it always acts 3, stable 0
        metrics = client.app.state.metrics.registry  # type: ignore[attr-defined]
        assert metrics.get_sample_value("policy_server_shadow_observations_total",
                                        {"policy": "lpoc", "agreed": "false"}) == shadow["observations"]
        assert metrics.get_sample_value("policy_server_variant_seconds_count",
                                        {"policy": "lpoc", "variant": "stable"}) == 10


def test_collect_experience_keeps_an_episode_on_one_version_and_counts_its_return(split: TestClient) -> None:
    variants = []
    for episode in range(20):
        acted = []
        for step in range(3):
            body = {"observation": LPOC_OBS, "reward": 1.0, "done": step == 0 and episode > 0, "client_id": "env-1"}
            acted.append(split.post("/collect_experience", json=body).json()["variant"])
        assert len(set(acted[1:])) == 1  # the call that ends an episode acts the next one's first step
        variants.append(acted[1])
    versions = split.get("/policies/lpoc/versions").json()
    assert versions["stable"]["episodes"] + versions["canary"]["episodes"] == 19
    assert {versions[v]["mean_episode_return"] for v in ("stable", "canary") if versions[v]["episodes"]} == {3.0}
    assert len(set(variants)) == 2  # 20 episodes at share 0.5: both versions acted some (all one way: 2e-6)


def test_versions_of_a_policy_without_a_candidate(fixed_models: dict[str, Path], tmp_path: Path) -> None:
    schema = canary_schema(fixed_models)
    del schema["policies"]["lpoc"]["canary"]
    with client_for(tmp_path, schema) as client:
        assert client.get("/versions").json()["canary"] is None
        for answer in (client.post("/versions/promote"), client.post("/versions/rollback"),
                       client.post("/predict", json=LPOC_OBS, headers=CANARY)):
            assert answer.status_code == 409 and answer.json()["error"]["code"] == "no_candidate", answer.text
        assert client.post("/predict", json=LPOC_OBS).json()["variant"] == "stable"


def test_promote_refuses_other_parameters(fixed_models: dict[str, Path], tmp_path: Path) -> None:
    other = fixed_models | {"candidate": fixed_models["other"]}
    with client_for(tmp_path, canary_schema(other, share=0.5)) as client:
        refused = client.post("/versions/promote")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_promotable"
        assert "shape" in refused.json()["error"]["message"]


def test_a_trained_policy_counts_sent_episodes_per_version_and_refuses_promote(model_dir: Path, tmp_path: Path) -> None:
    trained = training_schema(model_dir, tmp_path / "checkpoints")
    trained["policies"]["cart"]["canary"] = {"model": str(model_dir / "cart.pt2"), "share": 0.5}
    with client_for(tmp_path, trained) as client:
        fragments = [
            cart_fragment(steps=3, variant="canary", terminated=False), cart_fragment(steps=2, variant="canary"),
            cart_fragment(steps=4, variant="stable"),
            cart_fragment(steps=2, variant="stable", terminated=False), cart_fragment(steps=2, variant="canary"),
            cart_fragment(steps=6),  # no variant: counts for neither
        ]
        sent = client.post("/train/experience", json={"client_id": "env-1", "fragments": fragments})
        assert sent.status_code == 200, sent.text
        versions = client.get("/versions").json()
        assert [(versions[v]["episodes"], versions[v]["mean_episode_return"]) for v in ("stable", "canary")] == \
            [(1, 4.0), (1, 5.0)]  # the mixed episode and the unlabelled one count for neither
        refused = client.post("/policies/cart/versions/promote")
        assert refused.status_code == 409 and "trainer" in refused.json()["error"]["message"]


def test_a_trained_policy_serves_a_checkpoint_of_its_trainer_as_candidate(model_dir: Path, tmp_path: Path) -> None:
    trained = training_schema(model_dir, tmp_path / "checkpoints")
    candidate = fixed_action_model(tmp_path / "right.pt2", 1, obs_dim=4, n=2, hidden=32)  # cart.pt2's shapes
    trained["policies"]["cart"]["canary"] = {"model": str(candidate), "share": 0.5}
    obs = {name: 0.01 for name in trained["policies"]["cart"]["observations"]}
    with client_for(tmp_path, trained) as client:
        def probabilities(variant: str) -> dict[str, float]:
            answer = client.post("/distribution", json=obs, headers={"X-Policy-Version": variant}).json()
            assert answer["variant"] == variant
            return answer["probabilities"]  # type: ignore[no-any-return]

        assert probabilities("canary")["right"] > 0.999
        saved = client.post("/train/save").json()["checkpoint"]
        answer = client.post("/versions/candidate", json={"checkpoint": saved})
        assert answer.status_code == 200, answer.text
        assert answer.json()["candidate_checkpoint"] == saved and answer.json()["routing"] == "split"
        assert probabilities("canary") == pytest.approx(probabilities("stable"))  # the checkpoint's weights
        missing = client.post("/versions/candidate", json={"checkpoint": "no-such"})
        assert missing.status_code == 404, missing.text
        untrained = client.post("/policies/lpoc/versions/candidate", json={"checkpoint": saved})
        assert untrained.status_code == 404 and untrained.json()["error"]["code"] == "not_trainable"


def test_shadow_agreement_compares_the_actions_each_version_would_answer_under_the_mask(
    fixed_models: dict[str, Path], tmp_path: Path
) -> None:
    """Stable prefers 0 and the candidate 3; a mask that allows only 1 makes both answer 1."""
    with client_for(tmp_path, canary_schema(fixed_models, mode="shadow")) as client:
        only_1 = LPOC_OBS | {"action_mask": [False, True, False, False]}
        for _ in range(5):
            answer = client.post("/predict_deterministic/batch", json={"observations": [only_1] * 4}).json()
            assert {r["action"] for r in answer["results"]} == {1}
        client.portal.call(client.app.state.services["lpoc"].versions.drain_shadow)  # type: ignore[attr-defined]
        shadow = client.get("/policies/lpoc/versions").json()["shadow"]
        assert shadow["observations"] > 0 and shadow["agreed"] == shadow["observations"], shadow
