"""The learners' public surface: the ``Learner`` interface and the factory keyed on the spec."""

from __future__ import annotations

import torch

from policy_server.policies.spaces import ActionSpace
from policy_server.schema.training import TrainingSpec
from policy_server.training.base import Learner
from policy_server.training.dqn import DQNLearner
from policy_server.training.ppo import PPOLearner

__all__ = ["DQNLearner", "Learner", "PPOLearner", "make_learner"]


def make_learner(
    actor: torch.nn.Module, obs_dim: int, space: ActionSpace, spec: TrainingSpec, device: str = "cpu"
) -> Learner:
    """The learner of ``spec.algorithm``, training ``actor`` (the served module) in place.

    Raises ValueError when the algorithm cannot train this action space (DQN needs a discrete one).
    """
    if spec.algorithm == "ppo":
        return PPOLearner(actor, obs_dim, space, spec.ppo, spec.seed, device)
    return DQNLearner(actor, obs_dim, space, spec.dqn, spec.seed, device)
