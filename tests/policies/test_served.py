"""Start-up resolution of a policy against its model, where the model's width is only a guess."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import ODD_OBS, ODD_OBSERVATIONS, ONEHOT_OBSERVATIONS
from torch import nn

from policy_server.cli import check
from policy_server.errors import SchemaError
from policy_server.export import CNNPolicy, MLPPolicy, export_module
from policy_server.policies.served import resolve_policy
from policy_server.schema.config import DiscreteSpec, ObservationSpec, PolicySpec, ResourceSpec, load_schema
from policy_server.schema.observations import flatten


class ScaleFirst(nn.Module):
    """Its first matrix parameter (2×2) is not its input layer (3 → 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.eye(2))
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) @ self.mix


def test_a_torchscript_model_whose_first_matrix_is_not_the_input_layer_still_loads(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(ScaleFirst()), tmp_path / "m.pt")
    spec = PolicySpec(
        name="default",
        observations={name: ObservationSpec(type="float") for name in ("a", "b", "c")},
        action_space=DiscreteSpec(),
        model=tmp_path / "m.pt",
        resources=ResourceSpec(),
    )
    served, _ = resolve_policy(spec)
    assert served.obs_dim == 3
    assert served.space.describe()["n"] == 2


# --- issue 11: what start-up accepts, `generate.py check` accepts, and the other way round -------


def _write_schema(tmp_path: Path, observations: dict[str, Any], model: Path, **parameters: Any) -> Path:
    path = tmp_path / "schema.yaml"
    doc = {"observations": observations, "parameters": {"model": str(model), **parameters}}
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))
    return path


def test_check_and_start_up_agree_on_any_text_as_a_name(tmp_path: Path, inputs_models: Path) -> None:
    path = _write_schema(tmp_path, ODD_OBSERVATIONS, inputs_models / "odd.pt2")
    assert check(str(path))["policies"] == {"default": {
        "obs_dim": 11, "action_space": {"type": "discrete", "n": 4, "names": ["0", "1", "2", "3"]},
        "observations": list(ODD_OBSERVATIONS),
    }}
    served, policy = resolve_policy(load_schema(path).policies["default"])
    assert served.observation_model is not None
    obs = served.observation_model.model_validate(ODD_OBS)
    rows = flatten([obs], exclude=served.mask_attribute)  # its optional action_mask is no model input
    assert served.mask_attribute == "action_mask" and rows.tolist() == [[0.5, 2, 1, -1.5, 7, 1, 0.0, 1, 0, 1, 1]]
    assert policy.forward(rows).heads[0].shape == (1, 4)


def test_check_and_start_up_agree_on_pathmind_one_hot_lists(tmp_path: Path, inputs_models: Path) -> None:
    path = _write_schema(tmp_path, ONEHOT_OBSERVATIONS, inputs_models / "onehot.pt2", discrete=True, tuple=True)
    assert check(str(path))["policies"]["default"]["obs_dim"] == 60
    narrow = _write_schema(tmp_path, ONEHOT_OBSERVATIONS | {"extra": {"type": "List[float]", "min_items": 61}},
                           inputs_models / "onehot.pt2", discrete=True, tuple=True)
    with pytest.raises(SchemaError, match=r"^observations\.table_1_node: the model leaves 60 columns for the lists "):
        check(str(narrow))


@pytest.mark.parametrize("key", ["1", "yes", "~"])
def test_check_refuses_a_name_yaml_reads_as_no_text(tmp_path: Path, model_dir: Path, key: str) -> None:
    path = tmp_path / "schema.yaml"
    path.write_text(f"observations:\n  {key}:\n    type: int\nparameters:\n  model: {model_dir / 'cart.pt2'}\n")
    with pytest.raises(SchemaError, match=r"^invalid schema: observations: the name .* quote it"):
        check(str(path))


# --- issue 15: a recurrent policy's state is checked at start-up with a zero state ---------------


def _recurrent_spec(model: Path, state: dict[str, list[int]]) -> PolicySpec:
    from policy_server.schema.recurrent import RecurrentSpec

    return PolicySpec(
        name="default", observations={"x": ObservationSpec(type="List[float]", min_items=3, max_items=3)},
        action_space=DiscreteSpec(), model=model, resources=ResourceSpec(), recurrent=RecurrentSpec(state=state),
    )


@pytest.fixture(scope="module")
def lstm_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from policy_server.policies.lstm import LSTMPolicy, export_recurrent

    torch.manual_seed(0)
    module = LSTMPolicy(3, 4, 2)
    return export_recurrent(module, 3, module.state_shapes(), tmp_path_factory.mktemp("lstm") / "lstm.pt", "torchscript")


def test_a_recurrent_policy_resolves_its_heads_without_the_state(lstm_file: Path) -> None:
    served, policy = resolve_policy(_recurrent_spec(lstm_file, {"h": [1, 4], "c": [1, 4]}))
    assert served.obs_dim == 3 and served.space.describe()["n"] == 2
    assert served.recurrent is not None and served.recurrent.width == 8 and policy.state is served.recurrent
    assert served.describe()["state"] == {"h": [1, 4], "c": [1, 4]}


def test_a_state_shape_the_model_does_not_return_is_refused_naming_the_field_and_both_shapes(lstm_file: Path) -> None:
    with pytest.raises(SchemaError, match=r"parameters.recurrent.state: the model lstm.pt rejects") as caught:
        resolve_policy(_recurrent_spec(lstm_file, {"h": [1, 5], "c": [1, 4]}))
    assert "h (2, 1, 5)" in caught.value.message


def test_a_feed_forward_model_declared_recurrent_is_refused(model_dir: Path) -> None:
    with pytest.raises(SchemaError, match=r"parameters.recurrent.state: the model cart.pt2 rejects"):
        resolve_policy(_recurrent_spec(model_dir / "cart.pt2", {"h": [4]}).model_copy(
            update={"observations": {"x": ObservationSpec(type="List[float]", min_items=4, max_items=4)}}))
def test_a_space_policy_is_probed_with_a_zero_batch_of_its_model_input(tmp_path: Path) -> None:
    model = export_module(CNNPolicy((8, 8, 1), 3), (8, 8, 1), tmp_path / "cnn", dtype=torch.uint8)
    image = {"type": "box", "shape": [8, 8, 1], "dtype": "uint8"}
    spec = PolicySpec(name="default", observations=None, observation_space=image, action_space=DiscreteSpec(),
                      model=model, resources=ResourceSpec())
    served, _ = resolve_policy(spec)
    assert (served.obs_shape, served.obs_dtype, served.obs_dim, served.space.describe()["n"]) == ((8, 8, 1), np.uint8, 64, 3)
    assert served.describe()["obs_shape"] == [8, 8, 1] and served.observation_model is None
    wide = spec.model_copy(update={"observation_space": image | {"shape": [4, 4, 2]}})
    with pytest.raises(SchemaError, match=r"^observation_space: the model cnn.pt2 rejects inputs of shape \(B, 4, 4, 2\) uint8"):
        resolve_policy(wide)


def test_a_non_box_space_reaches_the_model_flattened_as_float32(tmp_path: Path) -> None:
    model = export_module(MLPPolicy(5 + 2, [8], nvec=[2]), 7, tmp_path / "mlp")
    space = {"type": "dict", "spaces": {"gear": {"type": "discrete", "n": 5}, "pos": {"type": "box", "shape": [2]}}}
    spec = PolicySpec(name="robot", observations=None, observation_space=space, action_space=DiscreteSpec(),
                      model=model, resources=ResourceSpec())
    served, _ = resolve_policy(spec)
    assert (served.obs_shape, served.obs_dtype, served.mask_key) == ((7,), np.float32, None)
