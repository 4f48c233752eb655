"""End to end: an 84×84×4 uint8 image policy (a CNN) on real Ray Serve behind a real uvicorn
gateway; its batches travel the direct transport's frames as uint8 and the answers are exact."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from conftest import API_KEY, running_server

from policy_server.export import CNNPolicy, export_module
from policy_server.gateway.app import build_app
from policy_server.policies.torch_policy import TorchPolicy
from policy_server.settings import Settings

SPACE = {"type": "box", "shape": [84, 84, 4], "dtype": "uint8", "low": 0, "high": 255}


def test_an_image_policy_answers_over_serve_exactly_as_the_model(ray_session: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = export_module(CNNPolicy((84, 84, 4), 6, channels=8, hidden=32), (84, 84, 4), tmp_path / "pong",
                          dtype=torch.uint8)
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump({"observation_space": SPACE, "parameters": {
        "api_key": API_KEY, "model": str(model), "resources": {"num_cpus": 0.1}}}))
    frames = np.random.default_rng(0).integers(0, 256, (3, 84, 84, 4), dtype=np.uint8)
    logits = TorchPolicy.from_file(model).forward(frames).heads[0]
    expected = torch.softmax(torch.from_numpy(logits), -1).numpy()
    settings = Settings(schema_path=path, gateway_metrics_port=0, serve_app_prefix="it-image", seed=0)
    with running_server(build_app(settings)) as url, \
            httpx.Client(base_url=url, headers={"access-token": API_KEY}, timeout=60) as client:
        one = client.post("/predict", json={"obs": frames[0].tolist()})
        assert one.status_code == 200, one.text
        assert one.json()["probability"] == pytest.approx(expected[0][one.json()["action"]], abs=1e-6)
        batch = client.post("/distribution/batch", json={"obs": frames.tolist()})
        assert batch.status_code == 200, batch.text
        got = [list(r["probabilities"].values()) for r in batch.json()["results"]]
        np.testing.assert_allclose(got, expected, atol=1e-6)
        bad = client.post("/predict", json={"obs": frames[0].tolist()[:-1]})
        assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "body.obs"
