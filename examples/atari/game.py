"""The Atari game of examples/atari as the policy sees it: ale-py's game, Gymnasium's usual wrappers.

    make_env()                      # ALE/Pong-v5: (4, 84, 84) uint8 observations, 6 actions
    make_env("ALE/Breakout-v5")

``AtariPreprocessing`` (no-op starts, 4-frame skip with max-pooling, 84×84 grayscale) and
``FrameStackObservation`` (the last 4 frames, stacked on the first axis: channels first, as a
torch CNN takes them), as DQN's paper and SB3's ``AtariWrapper`` prepare Atari frames. ale-py ships
the game ROMs: nothing is downloaded. The schema of the example is this environment's:

    python generate.py schema --env examples/atari/game.py:make_env --out examples/atari/schema.yaml
"""

from __future__ import annotations

from typing import Any

import ale_py
import gymnasium as gym
from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

GAME = "ALE/Pong-v5"
FRAMES = 4

gym.register_envs(ale_py)  # ale-py registers its games only when asked (Gymnasium 1.x loads no plugins)


def make_env(game: str = GAME, **kwargs: Any) -> gym.Env[Any, Any]:
    """``game`` (an ALE id) with frame skipping left to ``AtariPreprocessing``, 4 frames stacked."""
    env = gym.make(game, frameskip=1, **kwargs)  # AtariPreprocessing skips frames (and max-pools them)
    return FrameStackObservation(AtariPreprocessing(env, frame_skip=4, screen_size=84, noop_max=30), FRAMES)
