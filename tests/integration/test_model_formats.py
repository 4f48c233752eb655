"""Model formats and inputs over real Ray Serve deployments behind a real uvicorn gateway (one Ray
per session; one server for the module): an SB3 ``.zip`` and an ONNX file answering as the files'
own libraries do, and an 84×84×4 uint8 image policy (a CNN) whose batches travel the direct
transport's frames as uint8, its answers exact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from conftest import API_KEY, CART_OBSERVATIONS, running_server
from stable_baselines3 import PPO

from policy_server.export import CNNPolicy, export_module
from policy_server.gateway.app import build_app
from policy_server.policies.torch_policy import TorchPolicy
from policy_server.settings import Settings

SPACE = {"type": "box", "shape": [84, 84, 4], "dtype": "uint8", "low": 0, "high": 255}


@pytest.fixture(scope="module")
def served(ray_session: int, format_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Path]]:
    """The server of the three policies, and the image policy's model file."""
    tmp = tmp_path_factory.mktemp("formats-served")
    torch.manual_seed(0)
    image = export_module(CNNPolicy((84, 84, 4), 6, channels=8, hidden=32), (84, 84, 4), tmp / "pong", dtype=torch.uint8)
    small = {"num_cpus": 0.1}
    schema = {"parameters": {"default_policy": "ppo", "api_key": API_KEY}, "policies": {
        "ppo": {"observations": CART_OBSERVATIONS, "model": str(format_models["ppo"]), "resources": small},
        "onnx": {"observations": CART_OBSERVATIONS, "model": str(format_models["onnx"]), "resources": small},
        "image": {"observation_space": SPACE, "model": str(image), "resources": small},
    }}
    path = tmp / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    settings = Settings(schema_path=path, gateway_metrics_port=0, serve_app_prefix="it-formats", seed=0)
    with running_server(build_app(settings)) as url, \
            httpx.Client(base_url=url, headers={"access-token": API_KEY}, timeout=60) as client:
        yield client, image


def test_a_zip_and_an_onnx_file_serve_over_ray_serve(
    served: tuple[httpx.Client, Path], format_models: dict[str, Path]
) -> None:
    client, _ = served
    obs = np.random.default_rng(0).normal(0.0, 0.5, (32, 4)).astype(np.float32)
    rows = [dict(zip(CART_OBSERVATIONS, map(float, row))) for row in obs]
    ppo = client.post("/policies/ppo/predict_deterministic/batch", json={"observations": rows})
    onnx = client.post("/policies/onnx/distribution/batch", json={"observations": rows})
    sampled = client.post("/policies/onnx/predict", json=rows[0])
    refused = client.post("/policies/ppo/train/experience", json={})
    assert ppo.status_code == 200 and onnx.status_code == 200 and sampled.status_code == 200, (ppo.text, onnx.text)
    expected, _ = PPO.load(format_models["ppo"], device="cpu").predict(obs, deterministic=True)
    assert [r["action"] for r in ppo.json()["results"]] == expected.tolist()
    logits = TorchPolicy.from_file(format_models["onnx_twin"]).forward(obs).heads[0].astype(np.float64)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    served_probs = [[r["probabilities"][k] for k in ("0", "1")] for r in onnx.json()["results"]]
    np.testing.assert_allclose(served_probs, probs, atol=1e-5)
    assert refused.status_code == 404  # no training: its routes do not exist


def test_an_image_policy_answers_over_serve_exactly_as_the_model(served: tuple[httpx.Client, Path]) -> None:
    client, model = served
    frames = np.random.default_rng(0).integers(0, 256, (3, 84, 84, 4), dtype=np.uint8)
    logits = TorchPolicy.from_file(model).forward(frames).heads[0]
    expected = torch.softmax(torch.from_numpy(logits), -1).numpy()
    one = client.post("/policies/image/predict", json={"obs": frames[0].tolist()})
    assert one.status_code == 200, one.text
    assert one.json()["probability"] == pytest.approx(expected[0][one.json()["action"]], abs=1e-6)
    batch = client.post("/policies/image/distribution/batch", json={"obs": frames.tolist()})
    assert batch.status_code == 200, batch.text
    got = [list(r["probabilities"].values()) for r in batch.json()["results"]]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    bad = client.post("/policies/image/predict", json={"obs": frames[0].tolist()[:-1]})
    assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "body.obs"
