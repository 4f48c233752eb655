"""An ONNX model served as a policy, run by onnxruntime.

The graph takes one input, the observation batch (its first dimension the batch, any dtype
onnxruntime knows: ``float32``, ``uint8`` images...), and answers the heads a torch policy
returns: logits ``(B, n)``, one logits output per component, or mean and log-std ``(B, d)`` (a
log-std of shape ``(d,)`` is broadcast). A flat batch ``(B, obs_dim)`` is reshaped to the input's
shape when that shape is fixed (an image model's ``(B, 4, 84, 84)``), and cast to its dtype.

The CPU provider runs it with as many threads as torch has in the process, or CUDA's provider when
the replica has a GPU and onnxruntime was built with it.
The weights are fixed: an update is refused, and start-up refuses ``training`` and ``canary``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policy_server.errors import Conflict
from policy_server.policies.torch_policy import PolicyOutput, TorchPolicy, refuse_updates

_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
           "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int32)": np.int32,
           "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


def providers(device: str) -> list[str]:
    """onnxruntime's execution providers for a device name: CUDA's first on a ``cuda`` device
    when this onnxruntime has it, the CPU's always."""
    import onnxruntime as ort

    wanted = ["CUDAExecutionProvider"] if device.startswith("cuda") else []
    return [p for p in wanted if p in ort.get_available_providers()] + ["CPUExecutionProvider"]


class OnnxPolicy(TorchPolicy):
    """An onnxruntime session behind ``TorchPolicy``'s interface (its ``module`` holds no weights)."""

    format_name = "ONNX"

    def __init__(self, session: Any, device: str = "cpu") -> None:
        super().__init__(torch.nn.Module(), device)
        self.session = session
        (first, *rest) = session.get_inputs()
        if rest:
            raise ValueError(f"the model takes {len(rest) + 1} inputs; a policy takes one, the observation batch")
        self.input_name = first.name
        self.input_shape: list[Any] = list(first.shape)  # ints, or names / None for dynamic dims
        self.input_dtype = np.dtype(_DTYPES.get(first.type, np.float32))

    @classmethod
    def from_bytes(cls, data: bytes, fmt: Any = "onnx", device: str = "cpu") -> OnnxPolicy:  # type: ignore[override]
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings about unused providers are noise
        # as many threads as torch uses in this process (a Ray worker: its num_cpus), not one per
        # core of the machine, onnxruntime's default, which oversubscribes a shared node
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        return cls(ort.InferenceSession(data, options, providers=providers(device)), device)

    @classmethod
    def from_file(cls, path: Path, device: str = "cpu") -> OnnxPolicy:  # type: ignore[override]
        return cls.from_bytes(Path(path).read_bytes(), "onnx", device)

    def _row_shape(self) -> list[int] | None:
        dims = self.input_shape[1:]
        return [int(d) for d in dims] if all(isinstance(d, int) and d > 0 for d in dims) else None

    def input_width(self) -> int | None:
        row = self._row_shape()
        return math.prod(row) if row is not None else None

    def exact_width(self) -> bool:
        return self._row_shape() is not None

    def forward(self, obs: np.ndarray) -> PolicyOutput:
        """The observation batch ``(B, ...)`` → heads, all ``(B, k)`` float32."""
        x = np.asarray(obs)
        row = self._row_shape()
        if row is not None and list(x.shape[1:]) != row:
            x = x.reshape(len(x), *row)
        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        with self._lock:  # the version read with the answer (the session itself is thread-safe)
            outputs = self.session.run(None, {self.input_name: x})
            version = self.version
        heads = [np.asarray(h, dtype=np.float32) for h in outputs]
        if len(heads) == 2 and heads[1].ndim == 1:
            heads[1] = np.broadcast_to(heads[1], heads[0].shape).copy()
        return PolicyOutput(heads, version)

    def set_weights(self, weights: Any, version: int) -> int:
        raise Conflict(f"an {self.format_name} policy's weights are fixed: export it with torch.export to update them")

    def check_spec(self, spec: Any, where: str) -> None:
        refuse_updates(spec, where, self.format_name)
