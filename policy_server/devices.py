"""Where a model runs: one rule from a configured device (``"auto"``, ``"cpu"``, ``"cuda:1"``...) to a torch device."""

from __future__ import annotations

import torch

AUTO = "auto"


def resolve_device(requested: str | torch.device = AUTO, use_gpu: bool = True) -> torch.device:
    """The torch device to load a model on.

    ``"auto"`` is the GPU when ``use_gpu`` (the replica or actor was given one) and torch sees a
    GPU, else the CPU. Any other name is taken as written (``"cpu"``, ``"cuda"``, ``"cuda:1"``);
    raises RuntimeError (torch's) for a name torch cannot read.
    """
    if isinstance(requested, torch.device):
        return requested
    if requested == AUTO:
        return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    return torch.device(requested)
