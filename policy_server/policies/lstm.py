"""A small LSTM policy in the recurrent convention, and its export: for tests, examples and the
recurrent PPO learner's tests. The server serves any module that keeps the convention
(``schema.recurrent``); this one is ours only so that tests need no downloaded model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from policy_server.export import save_module


class LSTMPolicy(nn.Module):
    """``(obs (B, obs_dim), h (B, 1, hidden), c (B, 1, hidden))`` → ``(logits (B, n), h', c')``:
    a tanh encoder, one ``LSTMCell``, a linear logits head. State ``{h: [1, hidden], c: [1, hidden]}``."""

    def __init__(self, obs_dim: int, hidden: int, n: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh())
        self.cell = nn.LSTMCell(hidden, hidden)
        self.head = nn.Linear(hidden, n)
        self.hidden = hidden

    def forward(self, obs: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h1, c1 = self.cell(self.encoder(obs), (h[:, 0], c[:, 0]))
        return self.head(h1), h1[:, None], c1[:, None]

    def state_shapes(self) -> dict[str, list[int]]:
        """The schema's ``recurrent.state`` for this model."""
        return {"h": [1, self.hidden], "c": [1, self.hidden]}


def export_recurrent(
    module: nn.Module, obs_dim: int, state: dict[str, list[int]], path: Path,
    fmt: Literal["torchscript", "export"] = "export",
) -> Path:
    """Save a recurrent ``module`` (``(obs, *state)`` in, ``(*heads, *new_state)`` out) as a
    ``torch.export`` program with a dynamic batch (``<path>.pt2``) or as TorchScript."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    example = (torch.zeros(2, obs_dim), *(torch.zeros(2, *shape) for shape in state.values()))
    return save_module(module, example, path, fmt)
