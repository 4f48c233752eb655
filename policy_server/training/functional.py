"""Pure tensor maths of the RL algorithms: advantages, losses and targets.

Shapes: T steps, N environments (or clients), B batch, A actions. Every function is tested
against a naive loop over Python floats (tests/training/test_functional.py).
"""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    episode_end: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over ``(T, N)`` rollouts.

    ``next_values[t]`` is V(s_{t+1}) of the observation that followed step t, also when the
    episode ended there, so a truncated episode bootstraps from its last observation while a
    terminated one does not (``terminated[t]`` = 1). ``episode_end[t]`` = 1 (terminated or
    truncated) stops the advantage from flowing back across episodes. Returns ``(advantages,
    returns)``, with ``returns = advantages + values``::

        delta_t = r_t + gamma * (1 - terminated_t) * next_values_t - values_t
        A_t     = delta_t + gamma * lambda * (1 - episode_end_t) * A_{t+1}
    """
    deltas = rewards + gamma * (1.0 - terminated) * next_values - values
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        running = deltas[t] + gamma * gae_lambda * (1.0 - episode_end[t]) * running
        advantages[t] = running
    return advantages, advantages + values


def normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit (unbiased) standard deviation."""
    return (x - x.mean()) / (x.std() + eps)


def ppo_clip_loss(
    new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), to minimise, over ``(B,)`` samples.

    Returns ``(pg_loss, approx_kl, clipfrac)``: the loss ``mean(max(-A r, -A clip(r, 1-eps,
    1+eps)))`` with ``r = exp(new - old)``; the KL estimate ``mean((r - 1) - log r)``; the share
    of samples whose ratio was clipped. The last two carry no gradient.
    """
    log_ratio = new_log_prob - old_log_prob
    ratio = log_ratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1.0) - log_ratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean()
    return pg_loss, approx_kl, clipfrac


def td_target(
    rewards: torch.Tensor,
    next_q_target: torch.Tensor,
    terminated: torch.Tensor,
    gamma: float,
    next_q_online: torch.Tensor | None = None,
    next_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The DQN target ``r + gamma * (1 - terminated) * Q_target(s', a*)`` over ``(B,)`` samples.

    ``next_q_target`` is ``(B, A)``. Without ``next_q_online``, ``a*`` is the target network's
    argmax (Mnih et al. 2015); with it, the online network's argmax (double DQN, van Hasselt et
    al. 2016). Truncated transitions pass ``terminated = 0``: they bootstrap. ``next_mask`` bool
    ``(B, A)``: ``a*`` is the best *legal* action in ``s'`` (a masked argmax).
    """
    chooser = next_q_target if next_q_online is None else next_q_online
    if next_mask is not None:
        chooser = chooser.masked_fill(~next_mask, -torch.inf)
    best = chooser.argmax(dim=1, keepdim=True)
    next_value = next_q_target.gather(1, best).squeeze(1)
    return (rewards + gamma * (1.0 - terminated) * next_value).detach()
