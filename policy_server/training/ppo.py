"""PPO (Schulman et al. 2017) as cleanrl's ``ppo.py`` does it, on experience clients send.

The maths and hyper-parameters of ``examples/cartpole/train_policy.py``: one Adam over actor and
critic (eps 1e-5), GAE(lambda), ``update_epochs`` epochs of ``num_minibatches`` shuffled
minibatches, per-minibatch advantage normalisation, clipped surrogate, (clipped) value loss,
entropy bonus, global grad-norm clip. Differences that come from serving: rows arrive as
fragments of many clients' episodes (advantages stop at each fragment's end and bootstrap from
its ``next_obs``), and a truncated episode bootstraps where cleanrl's does not.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from policy_server.policies.spaces import ActionSpace
from policy_server.schema.training import PPOConfig
from policy_server.training.base import Learner, make_generator
from policy_server.training.buffers import RolloutBuffer
from policy_server.training.distributions import as_heads, log_prob_entropy
from policy_server.training.experience import ExperienceBatch
from policy_server.training.functional import gae, normalize, ppo_clip_loss
from policy_server.training.guard import check, guarded_step, rollback
from policy_server.training.normalizer import RewardScaler


def layer_init(layer: nn.Linear, std: float, generator: torch.Generator) -> nn.Linear:
    """cleanrl's initialisation: orthogonal weights scaled by ``std``, zero bias."""
    nn.init.orthogonal_(layer.weight, std, generator=generator)
    nn.init.constant_(layer.bias, 0.0)
    return layer


def make_critic(obs_dim: int, hidden: list[int], generator: torch.Generator) -> nn.Sequential:
    """The value network ``(B, obs_dim) → (B, 1)``: a tanh MLP, last layer initialised with std 1
    (it reads observations of any shape flattened: ``critic_input``)."""
    layers: list[nn.Module] = []
    width = obs_dim
    for h in hidden:
        layers += [layer_init(nn.Linear(width, h), math.sqrt(2), generator), nn.Tanh()]
        width = h
    layers.append(layer_init(nn.Linear(width, 1), 1.0, generator))
    return nn.Sequential(*layers)


def value_loss(
    new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_coef: float | None
) -> torch.Tensor:
    """``0.5 * mean((V - R)^2)`` over ``(B,)``; with ``clip_coef``, cleanrl's clipped variant.

    Clipped: ``0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2))``.
    """
    unclipped = (new_values - returns) ** 2
    if clip_coef is None:
        return 0.5 * unclipped.mean()
    clipped = old_values + torch.clamp(new_values - old_values, -clip_coef, clip_coef)
    return 0.5 * torch.max(unclipped, (clipped - returns) ** 2).mean()


def explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """``1 - Var(target - predicted) / Var(target)``; 0 where the target is constant (undefined)."""
    var = target.var(unbiased=False)
    return 0.0 if var == 0 else float(1.0 - (target - predicted).var(unbiased=False) / var)


def critic_input(obs: torch.Tensor) -> torch.Tensor:
    """``(B, *obs_shape)`` → the critic's float32 ``(B, obs_dim)``; uint8 (images) scaled to [0, 1]
    as SB3's preprocessing scales image spaces."""
    flat = obs.reshape(len(obs), -1)
    return flat.to(torch.float32) / 255.0 if flat.dtype == torch.uint8 else flat.to(torch.float32)


def batch_tensors(batch: ExperienceBatch, device: str) -> dict[str, torch.Tensor]:
    """The rows as ``(N, ...)`` tensors; flags as float 0/1, ``ends`` where GAE must stop; ``masks``
    (bool ``(N, W)``, the legal actions) when the batch has them."""
    arrays = {
        "obs": batch.obs,
        "next_obs": batch.next_obs,
        "actions": batch.actions,
        "rewards": batch.rewards,
        "log_probs": batch.log_probs,
        "terminated": batch.terminated.astype(np.float32),
        "ends": (batch.episode_end | batch.segment_end).astype(np.float32),
    }
    if batch.masks is not None:
        arrays["masks"] = batch.masks
    return {name: torch.as_tensor(value, device=device) for name, value in arrays.items()}


class PPOLearner(Learner):
    algorithm = "ppo"

    def __init__(
        self,
        actor: torch.nn.Module,
        obs_dim: int,
        space: ActionSpace,
        config: PPOConfig,
        seed: int | None = None,
        device: str = "cpu",
    ) -> None:
        super().__init__(actor, device)
        self.space, self.config = space, config
        self.generator = make_generator(seed)
        self.critic = make_critic(obs_dim, config.critic_hidden, self.generator).to(device)
        self.params = [*actor.parameters(), *self.critic.parameters()]
        self.optimizer = torch.optim.Adam(self.params, lr=config.learning_rate, eps=1e-5)
        self.buffer = RolloutBuffer()
        self.reward_scaler = RewardScaler(config.gamma) if config.normalize_rewards else None

    def add(self, batch: ExperienceBatch) -> None:
        self.samples += len(batch)
        if self.reward_scaler is not None:
            scaled = self.reward_scaler(batch.rewards, batch.episode_end, batch.client_id)
            batch = dataclasses.replace(batch, rewards=scaled)
        self.buffer.add(batch)

    def ready(self) -> bool:
        return len(self.buffer) >= self.config.rollout_samples

    def update(self) -> dict[str, float]:
        """One PPO update on every row in the buffer, which it empties.

        Raises ValueError when the buffer is empty, and ``NonFiniteUpdate`` when the rows' returns or
        advantages, a loss, a gradient, a weight or a moment is not finite: then the actor, the
        critic and the optimiser are as they were, and the rows are dropped.
        """
        batch = self.buffer.take()
        learning_rate = self._anneal_lr(samples_before=self.samples - len(batch))
        with rollback(self.optimizer):
            b = self._rollout(batch)
            check("data", ((k, b[k]) for k in ("advantages", "returns", "log_probs")), "the rollout")
            stats = self._optimise(b)
        self.updates += 1
        return {
            **stats,
            "explained_variance": explained_variance(b["values"], b["returns"]),
            "learning_rate": learning_rate,
            "batch_size": float(len(batch)),
            "samples": float(self.samples),
            "updates": float(self.updates),
        }

    def _anneal_lr(self, samples_before: int) -> float:
        lr = self.config.learning_rate
        if self.config.anneal_lr_samples is not None:
            lr *= max(0.0, 1.0 - samples_before / self.config.anneal_lr_samples)
        self.optimizer.param_groups[0]["lr"] = lr
        return lr

    def _rollout(self, batch: ExperienceBatch) -> dict[str, torch.Tensor]:
        """The batch as ``(N, ...)`` tensors with values, old log-probs, advantages and returns."""
        t = batch_tensors(batch, self.device)
        with torch.no_grad():
            values = self.critic(critic_input(t["obs"])).flatten()
            next_values = self.critic(critic_input(t["next_obs"])).flatten()
            current_log_prob, _ = log_prob_entropy(self.space, self._heads(t["obs"]), t["actions"], t.get("masks"))
        # the rows arrive as one sequence: a (N, 1) rollout whose fragments end at `ends`
        advantages, returns = gae(
            t["rewards"][:, None], values[:, None], next_values[:, None], t["terminated"][:, None],
            t["ends"][:, None], self.config.gamma, self.config.gae_lambda,
        )
        return {
            "obs": t["obs"],
            "actions": t["actions"],
            # the acting model's log-probs where the client sent them, else the current model's
            "log_probs": torch.where(torch.isnan(t["log_probs"]), current_log_prob, t["log_probs"]),
            "advantages": advantages[:, 0],
            "returns": returns[:, 0],
            "values": values,
        } | ({"masks": t["masks"]} if "masks" in t else {})

    def _optimise(self, b: dict[str, torch.Tensor]) -> dict[str, float]:
        """The epochs of minibatch steps; statistics are means over the steps taken."""
        c = self.config
        n = len(b["obs"])
        num_minibatches = max(1, min(c.num_minibatches, n // 2))  # >= 2 rows: advantages get a std
        totals: dict[str, float] = {}
        steps = epochs = 0
        for epoch in range(c.update_epochs):
            b_inds = torch.randperm(n, generator=self.generator).to(self.device)
            for i, mb_inds in enumerate(torch.tensor_split(b_inds, num_minibatches)):
                step = self._step({k: v[mb_inds] for k, v in b.items()}, f"epoch {epoch} minibatch {i}")
                totals = {k: totals.get(k, 0.0) + v for k, v in step.items()}
                steps += 1
            epochs += 1
            if c.target_kl is not None and step["approx_kl"] > c.target_kl:
                break
        return {**{k: v / steps for k, v in totals.items()}, "epochs": float(epochs)}

    def _step(self, mb: dict[str, torch.Tensor], where: str) -> dict[str, float]:
        c = self.config
        new_log_prob, entropy = self._policy_terms(mb)
        newvalue = self.critic(critic_input(mb["obs"])).flatten()
        mb_advantages = normalize(mb["advantages"]) if c.norm_adv else mb["advantages"]
        pg_loss, approx_kl, clipfrac = ppo_clip_loss(new_log_prob, mb["log_probs"], mb_advantages, c.clip_coef)
        v_loss = value_loss(newvalue, mb["values"], mb["returns"], c.clip_coef if c.clip_vloss else None)
        entropy_loss = entropy.mean()
        loss = pg_loss - c.ent_coef * entropy_loss + c.vf_coef * v_loss

        guarded_step(self.optimizer, self._named_params(), loss, where, c.max_grad_norm)
        return {
            "pg_loss": pg_loss.item(),
            "v_loss": v_loss.item(),
            "entropy": entropy_loss.item(),
            "approx_kl": approx_kl.item(),
            "clipfrac": clipfrac.item(),
        }

    def _heads(self, obs: torch.Tensor) -> list[torch.Tensor]:
        """The actor's action heads for rows ``(N, obs_dim)`` (a recurrent learner unpacks its state)."""
        return as_heads(self.actor(obs))

    def _policy_terms(self, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The new log-probs of a minibatch's actions and the policy's entropy, both ``(M,)``; with
        the rows' action masks, of the masked logits (as sb3-contrib's MaskablePPO)."""
        return log_prob_entropy(self.space, self._heads(mb["obs"]), mb["actions"], mb.get("masks"))

    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        return [*(("actor." + n, p) for n, p in self.actor.named_parameters()),
                *(("critic." + n, p) for n, p in self.critic.named_parameters())]

    def state_dict(self) -> dict[str, Any]:
        """Actor, critic, optimiser, reward statistics, counters and the shuffling generator.

        Rows waiting in the rollout buffer are not included: a resumed learner gathers anew.
        """
        return copy.deepcopy({
            "algorithm": self.algorithm,
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "reward_scaler": self.reward_scaler.state_dict() if self.reward_scaler else None,
            "samples": self.samples,
            "updates": self.updates,
            "generator": self.generator.get_state(),
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_algorithm(state)
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.reward_scaler is not None and state["reward_scaler"] is not None:
            self.reward_scaler.load_state_dict(state["reward_scaler"])
        self.samples, self.updates = int(state["samples"]), int(state["updates"])
        self.generator.set_state(state["generator"])
