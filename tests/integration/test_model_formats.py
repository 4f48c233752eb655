"""An SB3 ``.zip`` and an ONNX file served by real Ray Serve deployments behind a real uvicorn
gateway (one Ray per session), answering as the files' own libraries do."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import yaml
from conftest import CART_OBSERVATIONS, running_server
from stable_baselines3 import PPO

from policy_server.gateway.app import build_app
from policy_server.policies.torch_policy import TorchPolicy
from policy_server.settings import Settings


def test_a_zip_and_an_onnx_file_serve_over_ray_serve(
    ray_session: int, format_models: dict[str, Path], tmp_path: Path
) -> None:
    small = {"num_cpus": 0.1}
    schema = {"parameters": {"default_policy": "ppo"}, "policies": {
        "ppo": {"observations": CART_OBSERVATIONS, "model": str(format_models["ppo"]), "resources": small},
        "onnx": {"observations": CART_OBSERVATIONS, "model": str(format_models["onnx"]), "resources": small},
    }}
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    obs = np.random.default_rng(0).normal(0.0, 0.5, (32, 4)).astype(np.float32)
    rows = [dict(zip(CART_OBSERVATIONS, map(float, row))) for row in obs]
    settings = Settings(schema_path=path, gateway_metrics_port=0, serve_app_prefix="it-formats")
    with running_server(build_app(settings)) as url, httpx.Client(base_url=url, timeout=60) as client:
        ppo = client.post("/policies/ppo/predict_deterministic/batch", json={"observations": rows})
        onnx = client.post("/policies/onnx/distribution/batch", json={"observations": rows})
        sampled = client.post("/policies/onnx/predict", json=rows[0])
        refused = client.post("/policies/ppo/train/experience", json={})
    assert ppo.status_code == 200 and onnx.status_code == 200 and sampled.status_code == 200, (ppo.text, onnx.text)
    expected, _ = PPO.load(format_models["ppo"], device="cpu").predict(obs, deterministic=True)
    assert [r["action"] for r in ppo.json()["results"]] == expected.tolist()
    logits = TorchPolicy.from_file(format_models["onnx_twin"]).forward(obs).heads[0].astype(np.float64)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    served = [[r["probabilities"][k] for k in ("0", "1")] for r in onnx.json()["results"]]
    np.testing.assert_allclose(served, probs, atol=1e-5)
    assert refused.status_code == 404  # no training: its routes do not exist
