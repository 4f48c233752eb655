"""Torch-side action distributions for the learners: log-probabilities and entropies with gradients.

The same distributions as ``policy_server.policies.distributions`` (numpy, for acting), written
in torch so a loss can differentiate through them. Shapes: B batch, n actions, d action dims.
Every function equals its ``torch.distributions`` counterpart, or the numpy one the server answers
with (tests/training/test_action_distributions.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from policy_server.policies.spaces import ActionSpace, BoxSpace, MultiBinarySpace, TupleSpace
from policy_server.policies.torch_policy import _as_heads

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
LOG_2 = math.log(2.0)


def as_heads(out: object) -> list[torch.Tensor]:
    """A module's output as a list of heads: a tensor is one head, a tuple one head per element."""
    return _as_heads(out)


def masked_logits(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, n)`` logits with the masked ones (``mask`` False) at -inf: probability exactly 0,
    and no gradient through them (sb3-contrib's ``MaskableCategorical`` uses -1e8 likewise)."""
    return logits if mask is None else logits.masked_fill(~mask, -torch.inf)


def categorical_log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` logits, ``(B,)`` int64 actions → ``(B,)`` log softmax(logits)[b, actions[b]]."""
    return torch.log_softmax(logits, dim=-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``(B, n)`` logits → ``(B,)`` entropy ``-sum p log p``."""
    # a -inf logit (a masked action) would give 0 * -inf = nan; torch's Categorical clamps too
    log_probs = torch.log_softmax(logits, dim=-1).clamp(min=torch.finfo(logits.dtype).min)
    return -(log_probs.exp() * log_probs).sum(-1)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log-density summed over dims: ``(B, d)``, ``(B, d)``, ``(B, d) | (d,) → (B,)``."""
    z = (x - mean) * torch.exp(-log_std)
    return (-0.5 * z**2 - log_std - LOG_SQRT_2PI).sum(-1)


def gaussian_entropy(mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian entropy summed over dims: ``(B, d)``, ``(B, d) | (d,) → (B,)``."""
    return (0.5 + LOG_SQRT_2PI + log_std.expand_as(mean)).sum(-1)


def clipped_gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, low: torch.Tensor, high: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood ``(B,)`` of clipped actions ``x = clip(u, low, high)`` ``(B, d)``: the censored
    Gaussian of Fujita & Maeda 2018 (``log Φ`` of the mass beyond a bound at the bound, the density
    inside), as ``policies.distributions.clipped_gaussian_log_prob``."""
    log_std = log_std.expand_as(mean)
    inside = -0.5 * ((x - mean) * torch.exp(-log_std)) ** 2 - log_std - LOG_SQRT_2PI
    # an infinite bound is never reached; 0 in its place keeps its (unused) branch's gradient finite
    lo, hi = torch.isfinite(low), torch.isfinite(high)
    z_low = torch.where(lo, (torch.where(lo, low, 0.0) - mean) * torch.exp(-log_std), 0.0)
    z_high = torch.where(hi, (mean - torch.where(hi, high, 0.0)) * torch.exp(-log_std), 0.0)
    at_low, at_high = torch.special.log_ndtr(z_low), torch.special.log_ndtr(z_high)
    return torch.where(x <= low, at_low, torch.where(x >= high, at_high, inside)).sum(-1)


def tanh_gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, low: torch.Tensor, high: torch.Tensor
) -> torch.Tensor:
    """Log-density ``(B,)`` of squashed actions ``x = low + (tanh(u)+1)/2 · (high - low)`` ``(B, d)``
    (SAC, appendix C): ``log N(u) - Σ log(1 - tanh(u)²) - Σ log((high - low)/2)``, with
    ``log(1 - tanh(u)²) = 2 (log 2 - u - softplus(-2u))``; as ``policies.distributions.tanh_gaussian_log_prob``."""
    y = (2.0 * (x - low) / (high - low) - 1.0).clamp(-1.0 + 1e-6, 1.0 - 1e-6)
    u = torch.atanh(y)
    log_det = 2.0 * (LOG_2 - u - F.softplus(-2.0 * u)) + torch.log((high - low) / 2.0)
    return gaussian_log_prob(u, mean, log_std) - log_det.sum(-1)


def bernoulli_log_prob_entropy(logits: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent bits, ``P(1) = sigmoid(logit)``: log-probability of 0/1 ``bits`` and entropy,
    summed over the ``n`` bits, ``(B, n) → (B,)`` each."""
    log_p1, log_p0 = F.logsigmoid(logits), F.logsigmoid(-logits)
    log_prob = torch.where(bits > 0, log_p1, log_p0).sum(-1)
    entropy = -(log_p1.exp() * log_p1 + log_p0.exp() * log_p0).sum(-1)
    return log_prob, entropy


def log_prob_entropy(
    space: ActionSpace, heads: list[torch.Tensor], actions: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``actions`` and entropy of the policy, both ``(B,)``.

    ``heads`` are the module's outputs (``as_heads``): logits ``(B, n)`` for a discrete space,
    one logits tensor per component for a multi-discrete space (the joint log-probability and
    entropy are sums over the independent components), Bernoulli logits ``(B, n)`` for a
    multi-binary one, ``(mean, log_std)`` for a box. ``actions`` are int64 ``(B, k)`` (k = 1 for
    discrete, n bits for multi-binary) or float ``(B, d)`` for a box. ``mask`` bool ``(B, Σ n)``
    (discrete, multi-discrete): masked logits, as sb3-contrib's MaskablePPO evaluates them.

    A box's log-prob is of the answered action, as the server computed it (censored Gaussian when
    clipped, change of variables when tanh-squashed); its entropy stays the Gaussian's (of ``u``:
    the censored and squashed distributions have no closed form; SB3 likewise has none for tanh).
    """
    if isinstance(space, BoxSpace):
        mean, log_std = heads
        log_std = log_std.expand_as(mean)
        low, high = (torch.as_tensor(b, dtype=mean.dtype, device=mean.device) for b in (space.low, space.high))
        fn = tanh_gaussian_log_prob if space.squash == "tanh" else clipped_gaussian_log_prob
        return fn(actions, mean, log_std, low, high), gaussian_entropy(mean, log_std)
    if isinstance(space, MultiBinarySpace):
        return bernoulli_log_prob_entropy(heads[0], actions)
    if not isinstance(space, TupleSpace):
        raise TypeError(f"no torch distribution for action space {space.kind!r}")
    if len(heads) != actions.shape[-1]:
        raise ValueError(f"{len(heads)} logits heads for actions of {actions.shape[-1]} components")
    masks = [None] * len(heads) if mask is None else torch.split(mask, space.nvec, dim=-1)
    logits = [masked_logits(lg, m) for lg, m in zip(heads, masks)]
    log_prob = torch.stack([categorical_log_prob(lg, actions[:, i]) for i, lg in enumerate(logits)])
    entropy = torch.stack([categorical_entropy(lg) for lg in logits])
    return log_prob.sum(0), entropy.sum(0)
