"""Turn a user's ``nn.Module`` into a file the server loads, and write a matching schema."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn

ExportFormat = Literal["torchscript", "export", "onnx"]
_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU}


class MLPPolicy(nn.Module):
    """A small MLP policy: discrete logits, tuple of logits, or Gaussian mean and log-std."""

    def __init__(
        self,
        obs_dim: int,
        hidden: list[int],
        nvec: list[int] | None = None,
        box_dim: int | None = None,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if (nvec is None) == (box_dim is None):
            raise ValueError("give exactly one of nvec (discrete/tuple) or box_dim (continuous)")
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            width = h
        self.body = nn.Sequential(*layers)
        self.tuple_output = nvec is not None and len(nvec) > 1
        self.heads = nn.ModuleList([nn.Linear(width, n) for n in (nvec or [box_dim])])
        self.log_std = nn.Parameter(torch.zeros(box_dim)) if box_dim is not None else None

    def forward(self, x: torch.Tensor) -> Any:
        z = self.body(x)
        if self.log_std is not None:
            mean = self.heads[0](z)
            return mean, self.log_std.expand_as(mean)
        if self.tuple_output:
            return tuple(head(z) for head in self.heads)
        return self.heads[0](z)


class CNNPolicy(nn.Module):
    """A small CNN policy over images ``(B, H, W, C)`` of uint8 (Gymnasium's layout), scaled to
    [0, 1] inside the model as SB3's policies do: two stride-2 3×3 convolutions, then discrete
    logits ``(B, n)``."""

    def __init__(self, shape: tuple[int, int, int], n: int, channels: int = 16, hidden: int = 64) -> None:
        super().__init__()
        height, width, depth = shape
        self.conv = nn.Sequential(
            nn.Conv2d(depth, channels, 3, stride=2), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU(), nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, depth, height, width)).shape[1]
        self.head = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x.permute(0, 3, 1, 2).float() / 255.0))


def export_module(
    module: nn.Module, obs_dim: int | tuple[int, ...], path: Path, fmt: ExportFormat = "export",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save ``module`` (``(B, obs_dim)`` in, or ``(B, *obs_dim)`` for a shape; of ``dtype``) as a
    ``torch.export`` program, ONNX or TorchScript.

    ``export`` (the default) writes ``<path>.pt2`` with a dynamic batch dimension; ``onnx`` writes
    ``<path>.onnx`` (torch's dynamo exporter, dynamic batch; served with fixed weights);
    TorchScript is deprecated since torch 2.13 but still served, for models exported with older versions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    example = torch.zeros(2, *(obs_dim if isinstance(obs_dim, tuple) else (obs_dim,)), dtype=dtype)
    if fmt == "onnx":
        export_onnx(module, example, path.with_suffix(".onnx"))
        return path.with_suffix(".onnx")
    return save_module(module, (example,), path, fmt)


def save_module(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, fmt: Literal["export", "torchscript"]) -> Path:
    """Save ``module`` traced on ``example`` (every input batch-first; the batch dimension dynamic)
    as ``<path>.pt2`` (``torch.export``) or TorchScript at ``path``; returns the file written."""
    if fmt == "export":
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        program = torch.export.export(module, example, dynamic_shapes=tuple({0: batch} for _ in example))
        torch.export.save(program, path.with_suffix(".pt2"))
        return path.with_suffix(".pt2")
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13 but still loads
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(module, example), path)
    return path


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, legacy: bool = False) -> Path:
    """Save ``module`` as one self-contained ONNX file (no external data, so it loads from its
    bytes), its input ``obs`` shaped and typed like ``example`` with a dynamic batch dimension.

    ``legacy``: torch's TorchScript-based exporter, deprecated by torch but about 40 times faster
    here (0.15 s against 6 s for a small MLP); the tests use it for their extra models.
    """
    with warnings.catch_warnings():  # torch's exporters trip over their own deprecations (torch 2.13)
        warnings.simplefilter("ignore")
        if legacy:
            torch.onnx.export(module.eval(), (example,), path, dynamo=False, input_names=["obs"],
                              dynamic_axes={"obs": {0: "batch"}})
        else:
            batch = torch.export.Dim("batch", min=1, max=1 << 20)
            torch.onnx.export(module.eval(), (example,), path, dynamo=True, verbose=False, external_data=False,
                              input_names=["obs"], dynamic_shapes=({0: batch},))
    return path


def write_schema(
    path: Path,
    observations: dict[str, dict[str, Any]],
    action_space: dict[str, Any],
    model: str,
    api_key: str | None = None,
) -> Path:
    """Write a schema.yaml that serves ``model`` (a path relative to the schema's folder)."""
    parameters: dict[str, Any] = {
        "discrete": action_space["type"] != "box",
        "tuple": action_space["type"] == "tuple",
        "model": model,
        "action_space": action_space,
    }
    if api_key:
        parameters["api_key"] = api_key
    doc = {"observations": observations, "parameters": parameters}
    path = Path(path)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
