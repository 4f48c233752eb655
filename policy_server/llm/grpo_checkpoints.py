"""A GRPO run's checkpoints: folders ``cycle-<n>`` under the run's checkpoint folder, each with the
model (``MODEL_FOLDER``), the optimiser's state and the run's state (``STATE_FILE``: run id, cycle,
settings, counters). Each is built beside its name and swapped in atomically (``files.replacing_dir``); the
newest ``KEEP_CHECKPOINTS`` are kept.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from policy_server.files import clean_leftovers, replacing_dir

MODEL_FOLDER = "model"
"""Inside a checkpoint: the adapter (LoRA) or the whole model (full fine-tuning), with the tokenizer."""
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
KEEP_CHECKPOINTS = 2
_CHECKPOINT_PREFIX = "cycle-"


def write_checkpoint(
    checkpoint_dir: Path,
    cycle: int,
    save_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> Path:
    """Write ``cycle-<n>`` atomically (``save_model(folder)`` writes the model) and keep the newest
    ``KEEP_CHECKPOINTS``; ``state`` is the run's JSON state."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / f"{_CHECKPOINT_PREFIX}{cycle:08d}"
    with replacing_dir(final) as tmp:  # a stop right after a periodic checkpoint replaces it
        save_model(tmp / MODEL_FOLDER)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    for stale in _checkpoints(checkpoint_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read_state(folder: Path) -> dict[str, Any]:
    """The run's state recorded in a checkpoint folder."""
    return json.loads((folder / STATE_FILE).read_text())


def _checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The complete checkpoint folders, oldest first (hidden temporary folders are not listed)."""
    found = [
        p
        for p in Path(checkpoint_dir).glob(f"{_CHECKPOINT_PREFIX}*")
        if p.is_dir() and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest checkpoint folder of a run, or None; a run resumes from it, so what a save killed
    half-way left in ``checkpoint_dir`` is removed first."""
    clean_leftovers(Path(checkpoint_dir))
    found = _checkpoints(Path(checkpoint_dir))
    return found[-1] if found else None
