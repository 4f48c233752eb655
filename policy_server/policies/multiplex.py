"""Many policies of one architecture (``policies_dir``): each policy id's model file, loaded and
checked against the shape start-up resolved from the schema, and the folder's listing of ids.

Used by the multiplexed Serve deployment (``serving.multiplexed``), the local runtime and the
gateway; no Ray, no HTTP.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from policy_server.errors import ModelError, NotFound, summary
from policy_server.policies.torch_policy import TorchPolicy
from policy_server.schema.policy_ids import ID_RULE, MAX_ID_LENGTH, is_policy_id, policy_file, policy_files


@dataclass(frozen=True)
class Signature:
    """What every policy id's model must take and give: inputs of ``obs_shape`` and ``obs_dtype``
    per row (``obs_dim`` float32 columns by default), and heads of these shapes after the batch
    dimension (what the schema's action space was built from)."""

    obs_dim: int
    heads: tuple[tuple[int, ...], ...]
    obs_shape: tuple[int, ...] = ()
    obs_dtype: str = "float32"

    @classmethod
    def of(cls, policy: TorchPolicy, obs_dim: int, obs_shape: tuple[int, ...] = (), obs_dtype: str = "float32") -> Signature:
        out = policy.forward(np.zeros((1, *(obs_shape or (obs_dim,))), dtype=obs_dtype))
        return cls(obs_dim, tuple(tuple(h.shape[1:]) for h in out.heads), obs_shape, obs_dtype)

    def probe(self) -> np.ndarray:
        """A zero batch of one model input."""
        return np.zeros((1, *(self.obs_shape or (self.obs_dim,))), dtype=self.obs_dtype)

    def inputs(self) -> str:
        if not self.obs_shape or self.obs_shape == (self.obs_dim,) and self.obs_dtype == "float32":
            return f"inputs of width {self.obs_dim}"
        return f"inputs of shape {list(self.obs_shape)} {self.obs_dtype}"


def unknown_id(policy_id: str, folder: Path) -> NotFound:
    """The 404 of an id that has no model file (or breaks the id rule)."""
    if not is_policy_id(policy_id):
        return NotFound(f"policy id {policy_id[:MAX_ID_LENGTH]!r} is not a valid id (at most {MAX_ID_LENGTH} of {ID_RULE})")
    return NotFound(f"policy id {policy_id!r} is not served: {folder.name}/ holds no model file {policy_id}.<suffix>")


def load_policy(folder: Path, policy_id: str, signature: Signature, device: str = "cpu") -> TorchPolicy:
    """Load ``policy_id``'s model file from ``folder`` and check it against ``signature``.

    Raises:
        NotFound: no model file for ``policy_id`` (or not a valid id).
        ModelError: the file does not load, or its input width or outputs differ from the
            schema's; the message names the policy id, the file and the mismatch.
    """
    path = policy_file(folder, policy_id)
    if path is None:
        raise unknown_id(policy_id, folder)
    try:
        policy = TorchPolicy.from_file(path, device)
    except Exception as exc:
        raise ModelError(f"policy id {policy_id!r}: cannot load {path.name}: {summary(exc)}") from exc
    check_fits(policy, signature, f"policy id {policy_id!r}: {path.name}")
    return policy


def check_fits(policy: TorchPolicy, signature: Signature, what: str) -> None:
    """Raise ModelError (``what`` first) when ``policy`` rejects the signature's inputs or
    answers heads of other shapes."""
    try:
        out = policy.forward(signature.probe())
    except Exception as exc:
        raise ModelError(
            f"{what} rejects {signature.inputs()} (the schema's observations): {summary(exc)}"
        ) from exc
    heads = tuple(tuple(h.shape[1:]) for h in out.heads)
    if heads != signature.heads:
        raise ModelError(
            f"{what} answers outputs of shapes {_shapes(heads)} but the policy's action space needs "
            f"{_shapes(signature.heads)} (every file of policies_dir shares one architecture)"
        )


def _shapes(heads: tuple[tuple[int, ...], ...]) -> str:
    return ", ".join("(B, " + ", ".join(map(str, h)) + ")" for h in heads)


class PolicyCatalog:
    """The policy ids a ``policies_dir`` holds, listed again whenever the folder changes (its
    modification time: a file added, removed or renamed), so files added at run time are served
    without a restart. A stat per look-up; thread-safe."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._stamp: int | None = None
        self._ids: dict[str, Path] = {}

    def ids(self) -> list[str]:
        """Every policy id the folder holds now, sorted."""
        return list(self._current())

    def check(self, policy_id: str) -> str:
        """``policy_id`` when the folder holds its model file; raises NotFound naming it otherwise."""
        if policy_id not in self._current():
            raise unknown_id(policy_id, self.folder)
        return policy_id

    def _current(self) -> dict[str, Path]:
        try:
            stamp = os.stat(self.folder).st_mtime_ns
        except OSError:
            stamp = None
        with self._lock:
            if stamp is None or stamp != self._stamp:
                self._ids, self._stamp = policy_files(self.folder), stamp
            return self._ids
