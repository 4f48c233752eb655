"""Token-level losses for x1-style training: PPO for the policy, MSE for the value model.

Pure functions of tensors; ``tests/llm/test_losses.py`` compares each with a naive loop.
Shapes: B sequences, T tokens, V vocabulary; a (B, T-1) tensor is about the tokens ``1..T-1``,
each predicted from the tokens before it.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]): (B, T, V) logits, (B, T) ids → (B, T-1).

    Naive equivalent: ``logits[b, t].log_softmax(-1)[input_ids[b, t + 1]]`` for every b, t < T-1.
    """
    logp = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at each position: (..., V) → (...)."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is nonzero (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy ‖ reference) per token: ``exp(r) - r - 1``, r = ref - logp.

    Non-negative, unbiased for samples drawn from the policy, and low-variance.
    """
    log_ratio = ref_logp - logp
    return log_ratio.exp() - log_ratio - 1.0


def ppo_token_loss(
    new_logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    kl_coef: float = 0.01,
    ent_coef: float = 0.01,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate per token, plus a KL penalty to the reference, minus an entropy bonus.

    ``new_logp``, ``old_logp``, ``ref_logp``, ``mask`` and ``entropy`` are (B, T-1); ``advantages``
    is (B,), one per sequence, broadcast over its masked tokens. The loss is the mean over masked
    tokens of ``max(-A·ratio, -A·clip(ratio, 1±clip)) + kl_coef·k3 - ent_coef·entropy``.
    """
    b_advantages = advantages.to(new_logp.dtype).unsqueeze(-1)  # (B, 1)
    log_ratio = new_logp - old_logp
    ratio = log_ratio.exp()
    pg_loss1 = -b_advantages * ratio
    pg_loss2 = -b_advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    pg_tokens = torch.maximum(pg_loss1, pg_loss2)
    kl_tokens = kl_k3(new_logp, ref_logp)
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
