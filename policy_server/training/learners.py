"""The learners' public surface: the ``Learner`` interface and the factory keyed on the spec."""

from __future__ import annotations

import numpy as np
import torch

from policy_server.experience_log.transitions import logged_batch
from policy_server.policies.recurrent import StateLayout
from policy_server.policies.spaces import ActionSpace
from policy_server.schema.recurrent import RecurrentSpec
from policy_server.schema.training import TrainingSpec
from policy_server.training.base import Learner
from policy_server.training.dqn import DQNLearner
from policy_server.training.ppo import PPOLearner
from policy_server.training.sequences import RecurrentPPOLearner

__all__ = ["DQNLearner", "Learner", "PPOLearner", "make_learner"]


def make_learner(
    actor: torch.nn.Module, obs_dim: int, space: ActionSpace, spec: TrainingSpec, device: str = "cpu",
    policy: str = "",
    recurrent: RecurrentSpec | None = None,
) -> Learner:
    """The learner of ``spec.algorithm``, training ``actor`` (the served module) in place.

    DQN with ``spec.from_log`` starts with its replay buffer filled from that experience log (of
    ``policy``, or of the log's only policy). Raises ValueError when the algorithm cannot train
    this action space (DQN needs a discrete one), or the log cannot fill the buffer.
    """
    if recurrent is not None:  # the schema allows only ppo with it
        return RecurrentPPOLearner(actor, obs_dim, StateLayout(recurrent.shapes), space, spec.ppo,
                                   recurrent.bptt_steps, spec.seed, device)
    if spec.algorithm == "ppo":
        return PPOLearner(actor, obs_dim, space, spec.ppo, spec.seed, device)
    learner = DQNLearner(actor, obs_dim, space, spec.dqn, spec.seed, device)
    if spec.from_log is not None:  # the buffer only: `learning_starts` still counts transitions received
        learner.buffer.add(logged_batch(spec.from_log, policy, (obs_dim,), np.int64))
    return learner
