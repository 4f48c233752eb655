"""TorchPolicy on real exported files (TorchScript and torch.export), and resolve_policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from policy_server.errors import SchemaError
from policy_server.export import MLPPolicy, export_module
from policy_server.policies.served import resolve_policy
from policy_server.policies.spaces import BoxSpace, DiscreteSpace, TupleSpace
from policy_server.policies.torch_policy import TorchPolicy, input_width, load_module, model_format
from policy_server.schema.config import load_schema

OBS_DIM = 5
KINDS: dict[str, dict[str, Any]] = {
    "discrete": {"nvec": [4]},
    "tuple": {"nvec": [3, 2]},
    "box": {"box_dim": 2},
}
FORMATS = ["torchscript", "export"]


def make_module(kind: str, seed: int = 0) -> MLPPolicy:
    torch.manual_seed(seed)
    module = MLPPolicy(OBS_DIM, [8], **KINDS[kind])
    if module.log_std is not None:  # a non-zero log-std, so that its head is checked too
        with torch.no_grad():
            module.log_std.copy_(torch.tensor([-0.5, 0.25]))
    return module.eval()


def reference(module: nn.Module, obs: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(torch.from_numpy(obs))
    heads = [out] if isinstance(out, torch.Tensor) else list(out)
    return [h.detach().numpy().copy() for h in heads]


@pytest.fixture(params=[(k, f) for k in KINDS for f in FORMATS], ids=lambda p: f"{p[0]}-{p[1]}")
def exported(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[MLPPolicy, Path, str]:
    kind, fmt = request.param
    module = make_module(kind)
    path = export_module(module, OBS_DIM, tmp_path / f"{kind}.pt", fmt=fmt)
    return module, path, kind


def test_export_writes_the_requested_format(tmp_path: Path) -> None:
    module = make_module("discrete")
    assert export_module(module, OBS_DIM, tmp_path / "a.pt", fmt="export").name == "a.pt2"
    assert model_format(tmp_path / "a.pt2") == "export"
    assert export_module(module, OBS_DIM, tmp_path / "b.pt", fmt="torchscript").name == "b.pt"
    assert model_format(tmp_path / "b.pt") == "torchscript"


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_loaded_policy_matches_the_original_module(
    exported: tuple[MLPPolicy, Path, str], batch: int
) -> None:
    module, path, kind = exported
    policy = TorchPolicy.from_file(path)
    obs = np.random.default_rng(batch).normal(size=(batch, OBS_DIM)).astype(np.float32)
    out = policy.forward(obs)
    want = reference(module, obs)
    assert len(out.heads) == len(want) == {"discrete": 1, "tuple": 2, "box": 2}[kind]
    assert len(out) == batch and out.version == 0
    for got, expected in zip(out.heads, want):
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_input_width_of_both_formats(exported: tuple[MLPPolicy, Path, str]) -> None:
    _, path, _ = exported
    assert input_width(load_module(path.read_bytes(), model_format(path))) == OBS_DIM
    assert input_width(TorchPolicy.from_file(path).module) == OBS_DIM


def test_set_weights_changes_outputs_and_bumps_version(exported: tuple[MLPPolicy, Path, str]) -> None:
    _, path, _ = exported
    policy = TorchPolicy.from_file(path)
    obs = np.random.default_rng(0).normal(size=(3, OBS_DIM)).astype(np.float32)
    before = [h.copy() for h in policy.forward(obs).heads]
    weights = policy.get_weights()
    assert weights and all(isinstance(v, np.ndarray) for v in weights.values())
    shifted = {k: v + 0.5 for k, v in weights.items()}

    assert policy.set_weights(shifted, version=3) == 3
    assert policy.version == 3
    after = policy.forward(obs)
    assert after.version == 3
    for old, new in zip(before, after.heads):
        assert not np.allclose(old, new), "every head depends on the weights"
    round_trip = policy.get_weights()
    assert list(round_trip) == list(weights)
    for name, value in shifted.items():
        np.testing.assert_array_equal(round_trip[name], value)


def test_get_weights_returns_copies(tmp_path: Path) -> None:
    policy = TorchPolicy.from_file(export_module(make_module("discrete"), OBS_DIM, tmp_path / "d"))
    weights = policy.get_weights()
    for value in weights.values():
        value += 100.0
    for name, value in policy.get_weights().items():
        assert not np.array_equal(value, weights[name])


@pytest.mark.parametrize("fmt", FORMATS)
def test_outputs_do_not_alias_the_weights(tmp_path: Path, fmt: str) -> None:
    """An answer computed with version 0 keeps version 0's values after a weight swap."""
    policy = TorchPolicy.from_file(export_module(make_module("box"), OBS_DIM, tmp_path / "b.pt", fmt=fmt))
    out = policy.forward(np.zeros((2, OBS_DIM), dtype=np.float32))
    log_std = out.heads[1].copy()
    np.testing.assert_allclose(log_std, [[-0.5, 0.25], [-0.5, 0.25]])
    policy.set_weights({k: v + 1.0 for k, v in policy.get_weights().items()}, version=1)
    assert out.version == 0
    np.testing.assert_array_equal(out.heads[1], log_std)


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_set_weights_changes_nothing(tmp_path: Path, fmt: str) -> None:
    """set_weights is atomic: weights with a wrong name leave weights and version as they were."""
    policy = TorchPolicy.from_file(
        export_module(make_module("discrete"), OBS_DIM, tmp_path / "d.pt", fmt=fmt)
    )
    original = policy.get_weights()
    bad = {k: v + 1.0 for k, v in original.items()} | {"no_such_layer.weight": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match="no_such_layer"):
        policy.set_weights(bad, version=1)
    assert policy.version == 0
    for name, value in policy.get_weights().items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


def test_fixed_weights_give_known_logits(tmp_path: Path) -> None:
    module = MLPPolicy(2, [], nvec=[3])
    with torch.no_grad():
        module.heads[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        module.heads[0].bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    for fmt in FORMATS:
        policy = TorchPolicy.from_file(export_module(module, 2, tmp_path / "fixed.pt", fmt=fmt))
        out = policy.forward(np.array([[2.0, 3.0], [-1.0, 0.5]], dtype=np.float32))
        np.testing.assert_array_equal(out.heads[0], [[2.0, 3.0, 6.0], [-1.0, 0.5, 0.5]])


class _StateIndependentStd(nn.Module):
    """A box policy whose log-std is a bare ``(d,)`` parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.mean = nn.Linear(3, 2)
        self.log_std = nn.Parameter(torch.tensor([0.1, -0.2]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean(x), self.log_std


def test_one_dimensional_log_std_is_broadcast_to_the_batch() -> None:
    out = TorchPolicy(_StateIndependentStd().eval()).forward(np.zeros((4, 3), dtype=np.float32))
    assert out.heads[0].shape == (4, 2)
    np.testing.assert_allclose(out.heads[1], np.tile([0.1, -0.2], (4, 1)), rtol=1e-6)


class _ReturnsDict(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": x}


def test_unusable_model_output_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="tensor or a tuple of tensors, not dict"):
        TorchPolicy(_ReturnsDict()).forward(np.zeros((1, 2), dtype=np.float32))


def test_policy_output_slice_keeps_rows_and_version(tmp_path: Path) -> None:
    module = load_module(export_module(make_module("tuple"), OBS_DIM, tmp_path / "t").read_bytes(), "export")
    policy = TorchPolicy(module, version=4)
    out = policy.forward(np.random.default_rng(0).normal(size=(5, OBS_DIM)).astype(np.float32))
    part = out.slice(1, 3)
    assert len(part) == 2 and part.version == 4
    for whole, sliced in zip(out.heads, part.heads):
        np.testing.assert_array_equal(sliced, whole[1:3])


# --- resolve_policy: the schema against its model ------------------------------------------


def schema_for(tmp_path: Path, model: Path, observations: dict, **parameters: Any) -> Path:
    doc = {"observations": observations, "parameters": {"model": model.name, **parameters}}
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(params=FORMATS)
def discrete_model(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return export_module(make_module("discrete"), OBS_DIM, tmp_path / "policy.pt", fmt=request.param)


def test_resolve_policy_builds_space_and_observation_model(tmp_path: Path, discrete_model: Path) -> None:
    observations = {
        "id": {"type": "int"},
        "free": {"type": "bool"},
        "rest": {"type": "List[float]"},  # open length: takes the model's remaining 3 columns
    }
    space = {"type": "discrete", "names": list("abcd")}
    path = schema_for(tmp_path, discrete_model, observations, action_space=space)
    served, policy = resolve_policy(load_schema(path).policies["default"])
    assert served.obs_dim == OBS_DIM
    assert isinstance(served.space, DiscreteSpace) and served.space.n == 4
    assert served.field_names == ["id", "free", "rest"]
    assert served.observation_model is not None
    obs = served.observation_model(id=1, free=True, rest=[0.0, 1.0, 2.0])
    assert obs.rest == [0.0, 1.0, 2.0]
    assert json.loads(json.dumps(served.describe(), allow_nan=False)) == {
        "obs_dim": 5,
        "action_space": {"type": "discrete", "n": 4, "names": ["a", "b", "c", "d"]},
        "observations": ["id", "free", "rest"],
    }
    assert len(policy.forward(np.zeros((2, OBS_DIM), dtype=np.float32)).heads) == 1


@pytest.mark.parametrize(
    "kind,flags,space_type,sizes",
    [
        ("tuple", {"tuple": True}, TupleSpace, {"nvec": [3, 2]}),
        ("box", {"discrete": False}, BoxSpace, {"shape": [2]}),
    ],
)
def test_resolve_policy_of_tuple_and_box(
    tmp_path: Path, kind: str, flags: dict, space_type: type, sizes: dict
) -> None:
    """Pathmind's flags alone: the sizes come from the model's heads."""
    model = export_module(make_module(kind), OBS_DIM, tmp_path / "policy.pt2")
    observations = {"x": {"type": "List[float]", "min_items": 5, "max_items": 5}}
    served, _ = resolve_policy(load_schema(schema_for(tmp_path, model, observations, **flags)).policies["default"])
    assert isinstance(served.space, space_type)
    assert served.space.describe().items() >= sizes.items()


def test_observation_width_mismatch_names_observations_and_both_numbers(
    tmp_path: Path, discrete_model: Path
) -> None:
    observations = {"a": {"type": "int"}, "b": {"type": "List[float]", "min_items": 2, "max_items": 2}}
    path = schema_for(tmp_path, discrete_model, observations)
    with pytest.raises(SchemaError) as info:
        resolve_policy(load_schema(path).policies["default"])
    message = info.value.message
    assert message.startswith("observations:")
    assert "sum to 3" in message and "width 5" in message and discrete_model.name in message


def test_observation_width_mismatch_in_a_named_policy(tmp_path: Path, discrete_model: Path) -> None:
    doc = {"policies": {"grid": {"model": discrete_model.name, "observations": {"a": {"type": "int"}}}}}
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(SchemaError) as info:
        resolve_policy(load_schema(path).policies["grid"])
    assert info.value.message.startswith("policies.grid.observations:")
    assert "sum to 1" in info.value.message and "width 5" in info.value.message


def test_action_count_mismatch_names_n_and_both_numbers(tmp_path: Path, discrete_model: Path) -> None:
    observations = {"x": {"type": "List[float]", "min_items": 5, "max_items": 5}}
    path = schema_for(tmp_path, discrete_model, observations, action_space={"type": "discrete", "n": 6})
    with pytest.raises(SchemaError) as info:
        resolve_policy(load_schema(path).policies["default"])
    message = info.value.message
    assert message.startswith("parameters.action_space.n:")
    assert "6 actions" in message and "4 logits" in message


def test_unloadable_model_names_the_model_field(tmp_path: Path) -> None:
    (tmp_path / "broken.pt2").write_bytes(b"not a model")
    path = schema_for(tmp_path, tmp_path / "broken.pt2", {"x": {"type": "int"}})
    with pytest.raises(SchemaError, match=r"^parameters\.model: cannot load .*broken\.pt2"):
        resolve_policy(load_schema(path).policies["default"])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_set_weights_refuses_non_finite_tensors_and_keeps_serving_the_old_ones(
    tmp_path: Path, fmt: str, bad_value: float
) -> None:
    policy = TorchPolicy.from_file(export_module(make_module("discrete"), OBS_DIM, tmp_path / "d.pt", fmt=fmt))
    obs = np.random.default_rng(0).normal(size=(3, OBS_DIM)).astype(np.float32)
    before, original = policy.forward(obs), policy.get_weights()
    poisoned = {k: v + 1.0 for k, v in original.items()}
    name = max(poisoned)
    poisoned[name].flat[0] = bad_value
    with pytest.raises(ValueError, match=rf"refused weights of version 4: \['{name}'\] hold NaN or infinite"):
        policy.set_weights(poisoned, version=4)
    after = policy.forward(obs)
    assert policy.version == after.version == 0
    for got, want in zip(after.heads, before.heads):
        np.testing.assert_array_equal(got, want)
    for key, value in policy.get_weights().items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)
