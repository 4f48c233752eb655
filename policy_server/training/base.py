"""The learner interface: what the trainer needs from one RL algorithm, and helpers they share."""

from __future__ import annotations

import copy
import warnings
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from policy_server.training.experience import ExperienceBatch


class Learner(ABC):
    """Trains the served policy module in place from the experience it is given.

    The caller validates and stale-checks rows before ``add``, calls ``update`` when ``ready``,
    then publishes ``actor_weights()`` as the next model version. Not thread-safe.
    """

    algorithm: str
    state_holds_samples = False
    """Whether ``state_dict`` holds the rows added so far (a replay buffer); otherwise only rows
    an ``update`` consumed are in a checkpoint (an on-policy rollout)."""

    def __init__(self, actor: torch.nn.Module, device: str) -> None:
        self.actor, self.device = actor, device
        self.samples = 0  # rows received
        self.updates = 0

    @abstractmethod
    def add(self, batch: ExperienceBatch) -> None: ...

    @abstractmethod
    def ready(self) -> bool:
        """Enough data for ``update``."""

    @abstractmethod
    def update(self) -> dict[str, float]:
        """One update (one published version); returns statistics, floats only."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """A snapshot of everything needed to resume, loadable with ``torch.load(weights_only=True)``."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def actor_weights(self) -> dict[str, np.ndarray]:
        """The actor's weights as numpy copies, named as the served module's ``state_dict``."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.actor.state_dict().items()}

    def exploration(self) -> dict[str, float]:
        """Exploration parameters clients read with the model (none by default)."""
        return {}

    def _check_algorithm(self, state: dict[str, Any]) -> None:
        if state.get("algorithm") != self.algorithm:
            raise ValueError(f"a {state.get('algorithm')!r} checkpoint cannot resume a {self.algorithm!r} learner")


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for shuffling and sampling: seeded, or from OS entropy when ``seed`` is None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def copy_module(module: torch.nn.Module) -> torch.nn.Module:
    """An independent copy, with its own parameters, of a TorchScript or ``torch.export`` module."""
    with warnings.catch_warnings():
        # torch 2.13's pytree warns about itself while an exported module's specs are copied
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(module)
