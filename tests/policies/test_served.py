"""Start-up resolution of a policy against its model, where the model's width is only a guess."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from policy_server.policies.served import resolve_policy
from policy_server.schema.config import DiscreteSpec, ObservationSpec, PolicySpec, ResourceSpec


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
