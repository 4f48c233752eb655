"""A torch policy as a plain object: load an exported module, run batches, swap weights.

Two file formats: TorchScript (``torch.jit.save``, any suffix but those below) and ``torch.export``
programs (``torch.export.save``, suffix ``.pt2``). The module maps a batch ``(B, *obs_shape)`` (float
``(B, obs_dim)`` for Pathmind's observations, uint8 ``(B, 84, 84, 4)`` for an image Box) to logits
``(B, n)``, a tuple of logits, or ``(mean, log_std)``. A recurrent policy's module takes
``(obs, *state)`` and returns ``(*heads, *new_state)``; its rows arrive packed (``policies.recurrent``).
Two more formats load behind the same interface, with fixed weights: ONNX (``.onnx``,
``policies.onnx_policy``) and Stable-Baselines3 (``.zip``, ``policies.sb3_policy``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from policy_server.errors import SchemaError
from policy_server.policies.recurrent import StateLayout
from policy_server.weights import VersionedWeights

ModelFormat = Literal["torchscript", "export", "onnx", "sb3"]
FIXED_FORMATS: dict[str, ModelFormat] = {".onnx": "onnx", ".zip": "sb3"}
"""Suffixes of the formats whose weights the server cannot update (no training, canary, weights)."""


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
    if path.suffix in FIXED_FORMATS:
        return FIXED_FORMATS[path.suffix]
    return "export" if path.suffix == ".pt2" else "torchscript"


def load_module(data: bytes, fmt: ModelFormat, device: str = "cpu") -> torch.nn.Module:
    """Load a policy module from the bytes of its file (so it can travel to any Ray node)."""
    if fmt in FIXED_FORMATS.values():
        raise ValueError(f"a {fmt} model file holds no torch module to load")
    buffer = io.BytesIO(data)
    if fmt == "export":
        return torch.export.load(buffer).module().to(device)
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13 but still loads
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(buffer, map_location=device).eval()


def refuse_updates(spec: Any, where: str, format_name: str, recurrent_ok: bool = False) -> None:
    """SchemaError for ``training`` or ``canary`` on a policy whose model file's weights are fixed
    (and for ``recurrent`` unless the format serves state: SB3's RecurrentPPO)."""
    for field in ("training", "canary"):
        if getattr(spec, field, None) is not None:
            raise SchemaError(f"{where}.{field}: {spec.model.name} ({format_name}) has fixed weights, which "
                              f"the server cannot update; export a torch.export (.pt2) model to use {field}")
    if getattr(spec, "recurrent", None) is not None and not recurrent_ok:
        raise SchemaError(f"{where}.recurrent: {spec.model.name} ({format_name}) is served feed-forward; "
                          "export the recurrent model as TorchScript or torch.export (.pt2)")


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

    def __init__(
        self, module: torch.nn.Module, device: str = "cpu", version: int = 0, state: StateLayout | None = None
    ) -> None:
        super().__init__(version)
        self.module = module  # callers put it in eval mode (exported programs have no train mode)
        self.device = device
        self.state = state
        """A recurrent policy's state layout: rows are ``[obs | packed state]`` (None: feed-forward)."""
        floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
        self._float_dtype = floats[0] if floats else torch.float32

    @classmethod
    def from_bytes(cls, data: bytes, fmt: ModelFormat, device: str = "cpu", state: StateLayout | None = None) -> TorchPolicy:
        """The policy of a model file's bytes; an ONNX or SB3 file gives its own subclass (ONNX
        feed-forward only, SB3 recurrent for RecurrentPPO: ``check_spec`` refuses the rest)."""
        if fmt == "onnx":
            from policy_server.policies.onnx_policy import OnnxPolicy

            return OnnxPolicy.from_bytes(data, fmt, device)
        if fmt == "sb3":
            from policy_server.policies.sb3_policy import SB3Policy

            return SB3Policy.from_bytes(data, fmt, device, state)
        return cls(load_module(data, fmt, device), device, state=state)

    @classmethod
    def from_file(cls, path: Path, device: str = "cpu", state: StateLayout | None = None) -> TorchPolicy:
        return cls.from_bytes(Path(path).read_bytes(), model_format(Path(path)), device, state)

    def input_width(self) -> int | None:
        """The model's input width where it can be read off (see ``input_width``)."""
        return input_width(self.module)

    def exact_width(self) -> bool:
        """Whether ``input_width`` is exact rather than a guess."""
        return is_exact_width(self.module)

    def check_spec(self, spec: Any, where: str) -> None:
        """Refuse (SchemaError naming the field) a policy spec the model file cannot serve beyond
        its widths; a torch module serves every spec that fits its shapes."""

    def forward(self, obs: np.ndarray) -> PolicyOutput:
        """``(B, *obs_shape)`` → heads; a box's log-std is broadcast to ``(B, d)``.

        Integer inputs (uint8 images) reach the module as they are (it scales them itself, as
        SB3's policies do); floating ones in the dtype of the module's parameters (float32 for
        nearly every model, so a float64 Box runs as float32). A recurrent policy takes
        ``(B, obs_dim + state width)`` float rows and answers its heads, then the new state as one
        ``(B, size)`` head per state tensor; raises StateShapeError when the model's new state does
        not have the layout's shapes."""
        x = torch.from_numpy(np.ascontiguousarray(obs)).to(self.device)
        if x.is_floating_point():
            x = x.to(self._float_dtype)
        with self._lock, torch.inference_mode():
            if self.state is None:
                heads, new_state = _as_heads(self.module(x)), []
            else:
                heads, new_state = self.state.split_outputs(_as_heads(self.module(*self.state.model_inputs(x))))
            version = self.version
        # copies: an answer must not change when the weights do (a log-std head is a parameter)
        arrays = [h.detach().to("cpu", torch.float32).clone().numpy() for h in heads]
        if len(arrays) == 2 and arrays[1].ndim == 1:
            arrays[1] = np.broadcast_to(arrays[1], arrays[0].shape).copy()
        return PolicyOutput(arrays + [s.detach().to("cpu", torch.float32).numpy() for s in new_state], version)

    def _named_weights(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()  # detached tensors that share the module's storage
