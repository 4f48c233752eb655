"""ONNX models run by onnxruntime: the same heads as the torch module they were exported from,
served through the local backend like a ``.pt2``, image inputs reshaped and kept ``uint8``, and
weight updates and training refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import CART_OBSERVATIONS, make_client
from torch import nn

from policy_server.errors import Conflict, SchemaError
from policy_server.export import MLPPolicy, export_module, export_onnx
from policy_server.policies.onnx_policy import OnnxPolicy, providers
from policy_server.policies.served import resolve_policy
from policy_server.policies.torch_policy import TorchPolicy, model_format
from policy_server.schema.config import DiscreteSpec, PolicySpec, ResourceSpec
from policy_server.schema.training import TrainingSpec


def test_onnx_heads_are_the_torch_modules(format_models: dict[str, Path], tmp_path: Path) -> None:
    obs = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    policy = TorchPolicy.from_file(format_models["onnx"])
    assert isinstance(policy, OnnxPolicy) and model_format(format_models["onnx"]) == "onnx"
    assert (policy.input_width(), policy.exact_width()) == (4, True)
    twin = TorchPolicy.from_file(format_models["onnx_twin"])
    np.testing.assert_allclose(policy.forward(obs).heads[0], twin.forward(obs).heads[0], atol=1e-5)
    torch.manual_seed(1)
    box = MLPPolicy(4, [8], box_dim=2)  # a log-std parameter: a (d,) output, broadcast as torch's
    onnx_box = TorchPolicy.from_file(export_onnx(box, torch.zeros(2, 4), tmp_path / "box.onnx", legacy=True))
    torch_box = TorchPolicy.from_file(export_module(box, 4, tmp_path / "box"))
    for ours, theirs in zip(onnx_box.forward(obs).heads, torch_box.forward(obs).heads):
        assert ours.shape == (64, 2)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


class TinyCNN(nn.Module):
    """uint8 ``(B, 2, 6, 6)`` in, scaled inside the model as SB3's policies do; 3 logits out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.out = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.conv(x.float() / 255.0)).flatten(1))


def test_an_image_model_takes_its_uint8_batch_or_the_flat_rows(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cnn = TinyCNN().eval()
    example = torch.zeros(2, 2, 6, 6, dtype=torch.uint8)
    policy = OnnxPolicy.from_file(export_onnx(cnn, example, tmp_path / "cnn.onnx", legacy=True))
    assert (policy.input_dtype, policy.input_width()) == (np.dtype(np.uint8), 72)
    images = np.random.default_rng(0).integers(0, 256, (5, 2, 6, 6), dtype=np.uint8)
    expected = cnn(torch.from_numpy(images)).detach().numpy()
    np.testing.assert_allclose(policy.forward(images).heads[0], expected, atol=1e-5)
    flat = images.reshape(5, -1).astype(np.float32)  # Pathmind's float rows of the same pixels
    np.testing.assert_allclose(policy.forward(flat).heads[0], expected, atol=1e-5)


def test_an_onnx_policy_serves_every_endpoint_like_its_torch_twin(format_models: dict[str, Path], tmp_path: Path) -> None:
    schema = {"observations": CART_OBSERVATIONS,
              "parameters": {"model": str(format_models["onnx"]), "action_space": {"type": "discrete", "n": 2}}}
    obs = np.random.default_rng(1).normal(size=(16, 4)).astype(np.float32)
    rows = [dict(zip(CART_OBSERVATIONS, map(float, row))) for row in obs]
    logits = TorchPolicy.from_file(format_models["onnx_twin"]).forward(obs).heads[0].astype(np.float64)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    with make_client(tmp_path, schema) as client:
        deterministic = client.post("/predict_deterministic/batch", json={"observations": rows}).json()["results"]
        distribution = client.post("/distribution/batch", json={"observations": rows}).json()["results"]
        for route in ("/predict", "/predict_deterministic", "/distribution"):
            assert client.post(route, json=rows[0]).status_code == 200
        assert client.post("/predict_raw/batch", json={"obs": obs.tolist()}).status_code == 200
        model = client.get("/model")
        assert model.headers["X-Model-Format"] == "onnx"
        onnx.checker.check_model(onnx.load_from_string(model.content))
    assert [r["action"] for r in deterministic] == logits.argmax(axis=1).tolist()
    np.testing.assert_allclose([[r["probabilities"][k] for k in ("0", "1")] for r in distribution], probs, atol=1e-5)


def _spec(model: Path, **fields: object) -> PolicySpec:
    return PolicySpec(name="cart", observations=None, action_space=DiscreteSpec(), model=model,
                      resources=ResourceSpec(), **fields)  # type: ignore[arg-type]


def test_training_and_weight_updates_are_refused(format_models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=r"^policies\.cart\.training: cart\.onnx \(ONNX\) has fixed weights"):
        resolve_policy(_spec(format_models["onnx"], training=TrainingSpec(checkpoint_dir=tmp_path)))
    two_heads = export_onnx(MLPPolicy(4, [8], nvec=[2, 3]), torch.zeros(2, 4), tmp_path / "two.onnx", legacy=True)
    with pytest.raises(SchemaError, match=r"^policies\.cart\.action_space\.type: discrete needs one logits output"):
        resolve_policy(_spec(two_heads))
    served, policy = resolve_policy(_spec(format_models["onnx"]))
    assert served.obs_dim == 4
    with pytest.raises(Conflict, match="weights are fixed"):
        policy.set_weights({}, 1)


def test_providers_put_cuda_first_only_where_onnxruntime_has_it() -> None:
    import onnxruntime as ort

    assert providers("cpu") == ["CPUExecutionProvider"]
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert providers("cuda") == (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]
