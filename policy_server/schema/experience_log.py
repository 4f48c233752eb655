"""The ``experience_log:`` section of a policy in schema.yaml: where and how served decisions are logged.

This module imports neither pyarrow nor anything above the schema layer; the log itself is
``policy_server.experience_log``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ExperienceLogSpec(BaseModel):
    """Log every served decision (and the rewards sent later) to rotating files in ``path``."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    path: Path
    """The log's folder (relative to the schema's folder); created when missing."""
    format: Literal["parquet", "jsonl"] = "parquet"
    """`parquet` (pyarrow; a file is readable once rotated) or `jsonl` (one JSON object a line,
    readable up to its last whole line at any moment)."""
    max_file_mb: float = Field(64.0, gt=0)
    """A file is closed and a new one started at this size (MiB)."""
    max_total_mb: float = Field(1024.0, gt=0)
    """The folder's log files are kept under this size (MiB): the oldest are deleted, but not one that a
    live writer (of any process sharing the folder) still has open."""
    flush_s: float = Field(1.0, gt=0)
    """Seconds between writes: records wait in memory at most this long (a Parquet row group each)."""
    rotate_s: float = Field(60.0, gt=0)
    """A file is closed and a new one started after this many seconds (Parquet: what a killed
    server can lose at most, since an unclosed Parquet file has no footer)."""
    queue_size: int = Field(10_000, ge=1)
    """Requests whose records may wait for the writer; when full, records are dropped and counted."""

    def resolved(self, base_dir: Path) -> ExperienceLogSpec:
        """The spec with ``path`` absolute (relative paths are of the schema's folder)."""
        return self.model_copy(update={"path": (base_dir / self.path).resolve()})
