"""A GRPO run's checkpoints: folders ``cycle-<n>`` under the run's checkpoint folder, each with the
model (``MODEL_FOLDER``), the optimiser's state and the run's state (``STATE_FILE``: run id, cycle,
settings, counters). Each is built beside its name and swapped in atomically (``files.replacing_dir``); the
newest ``KEEP_CHECKPOINTS`` are kept. ``load_run`` loads what a run resumes from.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from policy_server.errors import NotFound
from policy_server.files import clean_leftovers, replacing_dir
from policy_server.llm.grpo_journal import read_start
from policy_server.llm.grpo_settings import GRPOSettings
from policy_server.llm.models import Dtype, LoadedLM, load_policy

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


@dataclass(frozen=True)
class Found:
    """What a run resumes from: its model (and frozen reference), settings and base, and the
    checkpoint folder (None: the run died before its first checkpoint and starts over)."""

    lm: LoadedLM
    settings: GRPOSettings
    base_path: Path | None
    reference: LoadedLM | None
    checkpoint: Path | None


def load_run(run_id: str, checkpoint_dir: Path, base_path: str | Path | None, dtype: Dtype, device: str) -> Found:
    """The model of the newest checkpoint in ``checkpoint_dir``, or, without one, the model the run
    started from (``grpo_journal.START_FILE``). A LoRA run needs its base model, and full
    fine-tuning with a KL penalty its reference: ``base_path``, or the one the checkpoint recorded.

    Raises ``NotFound`` (neither a checkpoint nor a start) and ``ValueError`` (the folder is another
    run's, or the base is unknown)."""
    folder = latest_checkpoint(checkpoint_dir)
    state = read_state(folder) if folder is not None else read_start(checkpoint_dir)
    if state is None:
        raise NotFound(f"run {run_id} has no checkpoint in {checkpoint_dir}: it cannot be resumed")
    if state["run_id"] != run_id:
        raise ValueError(f"the checkpoints in {checkpoint_dir} belong to run {state['run_id']}, not {run_id}")
    settings = GRPOSettings.recorded(state["settings"])
    if folder is None:  # the start: the model (and adapter) the run was started on
        lm = load_policy(state["model"], adapter=state["adapter"], dtype=dtype, device=device)
        return Found(lm, settings, Path(state["model"]), None, None)
    base = base_path or state.get("base_path")
    if (settings.lora or settings.beta > 0) and base is None:
        raise ValueError(
            f"run {run_id} needs the model it started from (LoRA base or KL reference): give base_path, that model's folder"
        )
    if settings.lora:
        return Found(load_policy(base, adapter=folder / MODEL_FOLDER, dtype=dtype, device=device),
                     settings, Path(base), None, folder)  # type: ignore[arg-type]
    reference = load_policy(base, dtype=dtype, device=device) if settings.beta > 0 else None
    lm = load_policy(folder / MODEL_FOLDER, dtype=dtype, device=device)
    return Found(lm, settings, Path(base) if base else None, reference, folder)
