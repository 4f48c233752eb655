"""Token-level losses of LLM training: GRPO (client-scored groups), PPO for the x1 policy, MSE for
the value model.

Pure functions of tensors; ``tests/llm/test_losses.py`` compares each with a naive loop.
Shapes: B sequences, T tokens, V vocabulary; a (B, T-1) tensor is about the tokens ``1..T-1``,
each predicted from the tokens before it.
"""

from __future__ import annotations

import torch


def token_log_probs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]): (B, T, V) logits, (B, T) ids → (B, T-1).

    Naive equivalent: ``logits[b, t].log_softmax(-1)[input_ids[b, t + 1]]`` for every b, t < T-1.
    """
    log_probs = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    return log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position: (..., V) → (...)."""
    log_probs = logits.float().log_softmax(-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is nonzero (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy ‖ reference) per token: any shape → same shape, >= 0.

    ``exp(r) - r - 1`` with ``r = ref - log_probs``, for tokens sampled from the policy: unbiased
    and low-variance.
    """
    log_ratio = ref_log_probs - log_probs
    return log_ratio.exp() - log_ratio - 1.0


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """Group-normalised advantages: (G,) rewards of one prompt's completions → (G,).

    ``(r - mean(r)) / (std(r) + eps)`` with the Bessel-corrected std, as TRL's ``GRPOTrainer``
    (``torch.std``'s default); ``scale=False`` gives ``r - mean(r)`` (Dr. GRPO). A group whose
    rewards are all equal (including a group of one) carries no signal: all zeros, exactly.

    Naive equivalent: ``m = sum(r) / G; s = sqrt(sum((x - m) ** 2 for x in r) / (G - 1));
    [(x - m) / (s + eps) for x in r]``.
    """
    if rewards.ndim != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty 1-D tensor, got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    if bool((rewards == rewards[0]).all()):
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean()
    return centred / (rewards.std() + eps) if scale else centred


def grpo_loss(
    new_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.04,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO loss to minimise (DeepSeekMath eq. 3, TRL's ``loss_type="grpo"``), and statistics.

    ``new_log_probs``, ``old_log_probs``, ``ref_log_probs``: (B, T) log-probs of the completion
    tokens under the policy being trained, the policy that sampled them, and the reference (None:
    no KL term); ``advantages``: (B,); ``mask``: (B, T), 1 on completion tokens. Per token
    ``-(min(ρ·A, clip(ρ, 1-ε, 1+ε)·A) - β·k3)`` with ``ρ = exp(new - old)``, averaged over each
    sequence's tokens, then over the sequences. Returns ``(loss (), {"loss", "kl", "clip_fraction",
    "ratio"})``, the statistics averaged over all masked tokens.
    """
    mask = mask.to(new_log_probs.dtype)
    ratio = torch.exp(new_log_probs - old_log_probs)
    adv = advantages[:, None].to(new_log_probs.dtype)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    if ref_log_probs is not None:
        kl = kl_k3(new_log_probs, ref_log_probs)
        per_token = per_token + beta * kl
    else:
        kl = torch.zeros_like(new_log_probs)
    tokens = mask.sum(-1).clamp(min=1)  # (B,)
    loss = ((per_token * mask).sum(-1) / tokens).mean()
    with torch.no_grad():
        total = mask.sum().clamp(min=1)
        clipped = ((ratio - 1).abs() > clip_eps).to(mask.dtype)
        stats = {
            "loss": loss.item(),
            "kl": ((kl * mask).sum() / total).item(),
            "clip_fraction": ((clipped * mask).sum() / total).item(),
            "ratio": ((ratio * mask).sum() / total).item(),
        }
    return loss, stats


def ppo_token_loss(
    new_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    kl_coef: float = 0.01,
    ent_coef: float = 0.01,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate per token, plus a KL penalty to the reference, minus an entropy bonus.

    ``new_log_probs``, ``old_log_probs``, ``ref_log_probs``, ``mask`` and ``entropy`` are (B, T-1);
    ``advantages`` is (B,), one per sequence, broadcast over its masked tokens. The loss is the mean
    over masked tokens of ``max(-A·ratio, -A·clip(ratio, 1±clip)) + kl_coef·k3 - ent_coef·entropy``.
    """
    b_advantages = advantages.to(new_log_probs.dtype).unsqueeze(-1)  # (B, 1)
    log_ratio = new_log_probs - old_log_probs
    ratio = log_ratio.exp()
    pg_loss1 = -b_advantages * ratio
    pg_loss2 = -b_advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    pg_tokens = torch.maximum(pg_loss1, pg_loss2)
    kl_tokens = kl_k3(new_log_probs, ref_log_probs)
    tokens = pg_tokens + kl_coef * kl_tokens
    if entropy is not None:
        tokens = tokens - ent_coef * entropy
    loss = masked_mean(tokens, mask)
    with torch.no_grad():
        stats = {
            "pg_loss": masked_mean(pg_tokens, mask).item(),
            "kl": masked_mean(kl_tokens, mask).item(),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask).item(),
            "clip_frac": masked_mean(((ratio - 1.0).abs() > clip).to(ratio.dtype), mask).item(),
            "entropy": masked_mean(entropy, mask).item() if entropy is not None else float("nan"),
        }
    return loss, stats


def value_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between (B,) predicted scores and (B,) targets."""
    return (pred - target.to(pred.dtype)).pow(2).mean()
