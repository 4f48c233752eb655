"""A canary on real Ray Serve (the session's Ray): the candidate runs as its own Serve app beside
the policy's, a share of requests reaches it, shadow mode answers with stable only, promote
publishes the candidate's weights to the stable replicas, rollback stops the routing, and the
gateway's metrics count each version."""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml
from conftest import API_KEY, LPOC_OBS, LPOC_OBSERVATIONS, fixed_action_model, free_port, running_server
from support import wait_until

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

PREFIX = "it-canary"


def test_a_canary_on_serve_splits_shadows_promotes_and_rolls_back(ray_session: int, tmp_path: Path) -> None:
    from ray import serve

    schema = {
        "parameters": {"api_key": API_KEY},
        "policies": {"lpoc": {
            "observations": LPOC_OBSERVATIONS,
            "model": str(fixed_action_model(tmp_path / "stable.pt2", 0)),
            "action_space": {"type": "discrete", "n": 4},
            "resources": {"num_cpus": 0.1},
            "canary": {"model": str(fixed_action_model(tmp_path / "candidate.pt2", 3)), "share": 0.5},
        }},
    }
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    metrics_port = free_port()
    settings = Settings(schema_path=path, gateway_metrics_port=metrics_port, serve_app_prefix=PREFIX, seed=0)
    with running_server(build_app(settings)) as url, httpx.Client(base_url=url, headers={"access-token": API_KEY},
                                                                  timeout=30) as client:
        apps = serve.status().applications
        assert apps[f"{PREFIX}-lpoc"].status == apps[f"{PREFIX}-lpoc-canary"].status == "RUNNING"
        assert client.get("/health/ready").json()["policies"] == {"lpoc": True}

        n = 200
        batch = {"observations": [LPOC_OBS] * 2}
        answers = [client.post("/predict_deterministic/batch", json=batch).json() for _ in range(n)]
        canary = sum(a["variant"] == "canary" for a in answers)
        assert 60 < canary < 140  # Binomial(200, 0.5): mean 100, sd 7.1; 5.7 sd either side
        assert all({r["action"] for r in a["results"]} == {3 if a["variant"] == "canary" else 0} for a in answers)
        counts = client.get("/policies/lpoc/versions").json()
        assert (counts["stable"]["requests"], counts["canary"]["requests"]) == (n - canary, canary)
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert f'policy_server_variant_seconds_count{{policy="lpoc",variant="canary"}} {float(canary)}' in metrics

        assert client.post("/versions/share", json={"mode": "shadow"}).json()["routing"] == "shadow"
        assert {client.post("/predict", json=LPOC_OBS).json()["action"] for _ in range(10)} == {0}
        wait_until(lambda: client.get("/versions").json()["shadow"]["observations"] >= 5, 10,
                   message="the shadow candidate ran on no request")
        assert client.get("/versions").json()["shadow"]["agreed"] == 0  # it acts 3 where stable acts 0

        promoted = client.post("/versions/promote").json()
        assert (promoted["model_version"], promoted["routing"]) == (1, "off")
        stable = client.post("/predict_deterministic", json=LPOC_OBS).json()
        assert (stable["variant"], stable["action"], stable["model_version"]) == ("stable", 3, 1)

        assert client.post("/versions/share", json={"share": 1.0}).json()["routing"] == "split"
        assert client.post("/predict", json=LPOC_OBS).json()["variant"] == "canary"
        assert client.post("/versions/rollback").json()["routing"] == "off"
        assert {client.post("/predict", json=LPOC_OBS).json()["variant"] for _ in range(10)} == {"stable"}
    apps = serve.status().applications
    assert f"{PREFIX}-lpoc" not in apps and f"{PREFIX}-lpoc-canary" not in apps
