"""A policy's candidate version (``canary:``), as the schema gives it and as it is resolved.

``canary: {model: <file>, share: 0.1}`` answers that share of the policy's requests with the
candidate model; ``canary: {model: <file>, mode: shadow}`` answers none (the stable model answers
every request) and runs the candidate on the same observations off the request path, to compare.
The candidate must see the same observations and act in the same action space as the stable
model: ``policies.served.resolve_policy`` checks it, like the stable model's file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policy_server.errors import SchemaError
from policy_server.schema.replicas import refused

CanaryMode = Literal["split", "shadow"]


class CanaryEntry(BaseModel):
    """``canary:`` as written in the schema (the model path relative to the schema's folder)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    model: str = Field(min_length=1)
    """The candidate's model file (same observations and action space as the policy's model)."""
    mode: CanaryMode = "split"
    """`split`: the candidate answers `share` of the requests; `shadow`: it answers none, and runs
    on a copy of every request off the request path, to compare its actions with the stable ones."""
    share: float | None = Field(None, gt=0, le=1)
    """`split` only, required: the fraction of requests (0 < share ≤ 1) the candidate answers."""

    @model_validator(mode="after")
    def _share_fits_mode(self) -> CanaryEntry:
        if self.mode == "split" and self.share is None:
            raise refused("share is required for a split canary (a fraction in (0, 1]); or set mode: shadow")
        if self.mode == "shadow" and self.share is not None:
            raise refused("share is for mode split: a shadow candidate answers no request; remove share")
        return self


class CanarySpec(BaseModel):
    """The candidate version as resolved from the schema (model path absolute)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Path
    mode: CanaryMode
    share: float
    """The routed fraction: the schema's share, 0.0 in shadow mode."""


def resolve_canary(entry: CanaryEntry | None, base_dir: Path, where: str) -> CanarySpec | None:
    """The candidate with its model file found; SchemaError naming ``<where>.canary.model`` when
    there is no such file."""
    if entry is None:
        return None
    path = (base_dir / entry.model).resolve()
    if not path.is_file():
        raise SchemaError(f"{where}.canary.model: model file not found: {path}")
    return CanarySpec(model=path, mode=entry.mode, share=entry.share or 0.0)
