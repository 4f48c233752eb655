"""A torch policy as a plain object: load an exported module, run batches, swap weights.

Two file formats: TorchScript (``torch.jit.save``, any suffix but ``.pt2``) and ``torch.export``
programs (``torch.export.save``, suffix ``.pt2``). The module maps a batch ``(B, *obs_shape)`` (float
``(B, obs_dim)`` for Pathmind's observations, uint8 ``(B, 84, 84, 4)`` for an image Box) to logits
``(B, n)``, a tuple of logits, or ``(mean, log_std)``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from policy_server.weights import VersionedWeights

ModelFormat = Literal["torchscript", "export"]


@dataclass(frozen=True)
class PolicyOutput:
    """Raw outputs of one forward pass: one array per head, all ``(B, k)``, and the version."""

    heads: list[np.ndarray]
    version: int

    def __len__(self) -> int:
        return len(self.heads[0])

    def slice(self, start: int, stop: int) -> PolicyOutput:
        return PolicyOutput([h[start:stop] for h in self.heads], self.version)


def model_format(path: Path) -> ModelFormat:
    return "export" if path.suffix == ".pt2" else "torchscript"


def load_module(data: bytes, fmt: ModelFormat, device: str = "cpu") -> torch.nn.Module:
    """Load a policy module from the bytes of its file (so it can travel to any Ray node)."""
    buffer = io.BytesIO(data)
    if fmt == "export":
        return torch.export.load(buffer).module().to(device)
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13 but still loads
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(buffer, map_location=device).eval()


def input_width(module: torch.nn.Module) -> int | None:
    """The input width the module was built for, where it can be read off (else None).

    Exact for ``torch.export`` programs (their input spec); for TorchScript a guess, the width
    of the first matrix parameter, which ``is_exact_width`` tells apart.
    """
    if isinstance(module, torch.fx.GraphModule):  # torch.export program: read the input spec
        for node in module.graph.nodes:
            if node.op == "placeholder" and hasattr(node.meta.get("val"), "shape"):
                return int(node.meta["val"].shape[-1])
    for param in module.parameters():
        if param.ndim == 2:
            return int(param.shape[1])
    return None


def is_exact_width(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.fx.GraphModule)


def _as_heads(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    raise TypeError(f"the model must return a tensor or a tuple of tensors, not {type(out).__name__}")


class TorchPolicy(VersionedWeights):
    """A loaded policy module with a version number; thread-safe forward and weight swaps.

    An update replaces the whole ``state_dict`` (same names, shapes and dtype kinds, finite);
    ``set_weights``, ``snapshot`` and ``get_weights`` come from ``VersionedWeights``.
    """

    def __init__(self, module: torch.nn.Module, device: str = "cpu", version: int = 0) -> None:
        super().__init__(version)
        self.module = module  # callers put it in eval mode (exported programs have no train mode)
        self.device = device
        floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
        self._float_dtype = floats[0] if floats else torch.float32

    @classmethod
    def from_bytes(cls, data: bytes, fmt: ModelFormat, device: str = "cpu") -> TorchPolicy:
        return cls(load_module(data, fmt, device), device)

    @classmethod
    def from_file(cls, path: Path, device: str = "cpu") -> TorchPolicy:
        return cls.from_bytes(Path(path).read_bytes(), model_format(Path(path)), device)

    def forward(self, obs: np.ndarray) -> PolicyOutput:
        """``(B, *obs_shape)`` → heads; a box's log-std is broadcast to ``(B, d)``.

        Integer inputs (uint8 images) reach the module as they are (it scales them itself, as
        SB3's policies do); floating ones in the dtype of the module's parameters (float32 for
        nearly every model, so a float64 Box runs as float32)."""
        x = torch.from_numpy(np.ascontiguousarray(obs)).to(self.device)
        if x.is_floating_point():
            x = x.to(self._float_dtype)
        with self._lock, torch.inference_mode():
            heads = _as_heads(self.module(x))
            version = self.version
        # copies: an answer must not change when the weights do (a log-std head is a parameter)
        arrays = [h.detach().to("cpu", torch.float32).clone().numpy() for h in heads]
        if len(arrays) == 2 and arrays[1].ndim == 1:
            arrays[1] = np.broadcast_to(arrays[1], arrays[0].shape).copy()
        return PolicyOutput(arrays, version)

    def _named_weights(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()  # detached tensors that share the module's storage
