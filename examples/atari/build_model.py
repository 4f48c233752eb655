"""Build the CNN policy of examples/atari: Nature-DQN's network (Mnih et al. 2015), untrained.

    python examples/atari/build_model.py [--out-dir examples/atari/models]

Writes ``models/atari_cnn.pt2`` (``torch.export``, a dynamic batch): uint8 frames ``(B, 4, 84, 84)``
in, one logit per action out. The weights are freshly initialised (seed 0), not trained: the
example shows an image policy served and played, not a good Pong player (training one takes
millions of frames; the server's PPO trains it from clients' experience like any other policy).
``python generate.py copy_server_files examples/atari`` calls ``build_models`` when the example has
no ``models/`` yet.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, when run from a checkout
from policy_server.export import export_module

ACTIONS = 6
"""Pong's actions (``make_env().action_space``)."""
FRAMES, SIZE = 4, 84
MODEL = "atari_cnn.pt2"
Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``, as the other examples' builders call it."""


class NatureCNN(nn.Module):
    """Three convolutions and a 512-unit layer over stacked frames; the frames are scaled to [0, 1]
    here, in the model (the server hands it uint8, as SB3's policies take images)."""

    def __init__(self, actions: int = ACTIONS, frames: int = FRAMES) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(frames, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 512), nn.ReLU(),
        )
        self.logits = nn.Linear(512, actions)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``(B, 4, 84, 84)`` uint8 → ``(B, actions)`` logits."""
        return self.logits(self.body(frames.float() / 255.0))


def build_models(out_dir: Path, progress: Progress | None = None) -> Path:
    """Write the untrained CNN (seed 0) to ``out_dir/atari_cnn.pt2``; returns its path."""
    if progress is not None:
        progress("exporting the Nature CNN", 0, 1)
    torch.manual_seed(0)
    path = export_module(NatureCNN(), (FRAMES, SIZE, SIZE), Path(out_dir) / MODEL, dtype=torch.uint8)
    if progress is not None:
        progress("exporting the Nature CNN", 1, 1)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=HERE / "models")
    print(f"wrote {build_models(parser.parse_args().out_dir)}")
