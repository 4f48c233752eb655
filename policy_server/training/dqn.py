"""DQN (Mnih et al. 2015), double DQN by default, as cleanrl's ``dqn.py`` does it, on experience
clients send. The served model's logits are the Q-values; clients act epsilon-greedily with the
epsilon the learner publishes.

cleanrl's schedule counts environment steps; here it counts transitions received: after
``learning_starts``, one gradient step per ``train_frequency`` transitions and a target update
per ``target_network_frequency``. The caller publishes after each ``update``, which runs all due
gradient steps, so ``ready`` waits until ``publish_frequency`` of them are due.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from policy_server.policies.spaces import ActionSpace, DiscreteSpace
from policy_server.schema.training import DQNConfig
from policy_server.training.base import Learner, copy_module, make_generator
from policy_server.training.buffers import ReplayBuffer
from policy_server.training.distributions import as_heads
from policy_server.training.experience import ExperienceBatch
from policy_server.training.functional import td_target
from policy_server.training.guard import MAX_SQUARABLE, NonFiniteUpdate, guarded_step, rollback


def q_values(module: nn.Module, obs: torch.Tensor) -> torch.Tensor:
    """``(B, obs_dim) → (B, A)``: the module's logits head."""
    return as_heads(module(obs))[0]


def linear_schedule(start: float, end: float, duration: int, t: int) -> float:
    """``start`` moving linearly to ``end`` over ``duration`` steps, then ``end``."""
    frac = min(1.0, t / duration)
    return (1.0 - frac) * start + frac * end


def culprits(td_errors: torch.Tensor) -> np.ndarray:
    """Of a minibatch's ``(B,)`` TD errors, a boolean mask of those that made its loss non-finite.

    A mean of B squares overflows float32 only if one square reaches ``max / B``, so those (and
    NaN or infinite errors) are the culprits; without one, the largest error is.
    """
    squares = td_errors.detach().cpu().double().numpy() ** 2
    mask = ~(squares < MAX_SQUARABLE**2 / len(squares))
    if not mask.any():
        mask[np.argmax(squares)] = True
    return mask


class DQNLearner(Learner):
    algorithm = "dqn"
    state_holds_samples = True  # the replay buffer is checkpointed

    def __init__(
        self,
        actor: torch.nn.Module,
        obs_dim: int,
        space: ActionSpace,
        config: DQNConfig,
        seed: int | None = None,
        device: str = "cpu",
    ) -> None:
        if not isinstance(space, DiscreteSpace):  # a wrong schema, not a wrong argument type
            raise ValueError(  # noqa: TRY004
                f"DQN learns one Q-value per action of a discrete action space; this policy's action "
                f"space is {space.kind!r}: train it with algorithm 'ppo'"
            )
        super().__init__(actor, device)
        self.config = config
        self.generator = make_generator(seed)
        self.target = copy_module(actor)  # used under no_grad only
        self.optimizer = torch.optim.Adam(actor.parameters(), lr=config.learning_rate)
        self.buffer = ReplayBuffer(config.buffer_size, obs_dim, mask_width=space.mask_width)
        self.gradient_steps = 0
        self.target_updates = 0

    def add(self, batch: ExperienceBatch) -> None:
        self.samples += len(batch)
        self.buffer.add(batch)

    def _due(self) -> int:
        """Gradient steps due: one per ``train_frequency`` transitions received after ``learning_starts``."""
        c = self.config
        return max(0, self.samples // c.train_frequency - c.learning_starts // c.train_frequency - self.gradient_steps)

    def ready(self) -> bool:
        """``publish_frequency`` gradient steps are due (the first update comes as soon as one is)."""
        due = self._due()
        if not len(self.buffer):  # every stored transition was dropped as poisoned
            return False
        return due >= self.config.publish_frequency or (due > 0 and self.gradient_steps == 0)

    def update(self) -> dict[str, float]:
        """Every due gradient step, then the due target-network updates.

        Raises ValueError when no gradient step is due, and ``NonFiniteUpdate`` when a step met a
        non-finite loss, gradient, weight or moment: then the network and the optimiser are as they
        were, the due steps are skipped, and the transitions that caused it leave the replay buffer.
        """
        steps = self._due()
        if steps == 0:
            raise ValueError(f"no gradient step is due after {self.samples} transitions")
        try:
            with rollback(self.optimizer):
                losses, q = np.array([self._gradient_step(f"gradient step {i + 1} of {steps}")
                                      for i in range(steps)]).T
        finally:
            self.gradient_steps += steps  # a skipped update's steps are not due again
        self._update_target()
        self.updates += 1
        return {
            "loss": float(losses.mean()),
            "q_values": float(q.mean()),
            "gradient_steps": float(steps),
            "epsilon": self.epsilon(),
            "learning_rate": self.config.learning_rate,
            "samples": float(self.samples),
            "updates": float(self.updates),
        }

    def _gradient_step(self, where: str) -> tuple[float, float]:
        """One step on a sampled minibatch; returns its loss and mean Q-value of the taken actions.

        On ``NonFiniteUpdate`` the minibatch's culprit transitions are dropped first (``culprits``).
        """
        c = self.config
        index = self.buffer.sample_index(c.batch_size, self.generator)
        data = {k: v.to(self.device) for k, v in self.buffer.rows(index).items()}
        with torch.no_grad():
            next_q_online = q_values(self.actor, data["next_obs"]) if c.double_dqn else None
            target = td_target(data["rewards"], q_values(self.target, data["next_obs"]), data["terminated"],
                               c.gamma, next_q_online, data.get("next_masks"))  # the best legal action
        old_val = q_values(self.actor, data["obs"]).gather(1, data["actions"]).squeeze(1)
        loss = F.mse_loss(old_val, target)
        try:
            guarded_step(self.optimizer, list(self.actor.named_parameters()), loss, where, c.max_grad_norm)
        except NonFiniteUpdate:
            self.buffer.drop(index[culprits(old_val.detach() - target)])
            raise
        return loss.item(), old_val.mean().item()

    def _update_target(self) -> None:
        """The soft updates due since the last one, at once: ``k`` updates with rate tau are one
        with rate ``1 - (1 - tau)^k`` (tau = 1: a copy)."""
        due = self.samples // self.config.target_network_frequency - self.target_updates
        if due <= 0:
            return
        tau = 1.0 - (1.0 - self.config.tau) ** due
        with torch.no_grad():
            for target_param, param in zip(self.target.parameters(), self.actor.parameters()):
                target_param.copy_(tau * param + (1.0 - tau) * target_param)
        self.target_updates += due

    def epsilon(self) -> float:
        c = self.config
        return linear_schedule(c.start_epsilon, c.end_epsilon, c.exploration_samples, self.samples)

    def exploration(self) -> dict[str, float]:
        return {"epsilon": self.epsilon()}

    def state_dict(self) -> dict[str, Any]:
        """Actor, target network, optimiser, replay buffer, counters and the sampling generator."""
        return copy.deepcopy({
            "algorithm": self.algorithm,
            "actor": self.actor.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "replay_buffer": self.buffer.state_dict(),
            "samples": self.samples,
            "updates": self.updates,
            "gradient_steps": self.gradient_steps,
            "target_updates": self.target_updates,
            "generator": self.generator.get_state(),
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_algorithm(state)
        self.actor.load_state_dict(state["actor"])
        self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer.load_state_dict(state["replay_buffer"])
        self.samples, self.updates = int(state["samples"]), int(state["updates"])
        self.gradient_steps, self.target_updates = int(state["gradient_steps"]), int(state["target_updates"])
        self.generator.set_state(state["generator"])
