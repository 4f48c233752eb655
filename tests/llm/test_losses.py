"""PPO and MSE losses (policy_server.llm.losses) against naive Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from policy_server.llm.losses import (
    entropy_from_logits,
    kl_k3,
    masked_mean,
    ppo_token_loss,
    token_logprobs,
    value_mse,
)

B, T, V = 3, 6, 7


@pytest.fixture()
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def naive_token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            row = [float(x) for x in logits[b, t]]
            norm = math.log(sum(math.exp(x) for x in row))
            out[b, t] = row[int(ids[b, t + 1])] - norm
    return out


def naive_masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    picked = [float(v) for v, m in zip(values.flatten(), mask.flatten(), strict=True) if m]
    return sum(picked) / len(picked) if picked else 0.0


def test_token_logprobs_matches_loop(gen: torch.Generator) -> None:
    logits = torch.randn(B, T, V, generator=gen)
    ids = torch.randint(0, V, (B, T), generator=gen)
    torch.testing.assert_close(token_logprobs(logits, ids), naive_token_logprobs(logits, ids))


def test_entropy_matches_loop(gen: torch.Generator) -> None:
    logits = torch.randn(B, T, V, generator=gen)
    expected = torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            probs = torch.softmax(logits[b, t].double(), -1).tolist()
            expected[b, t] = -sum(p * math.log(p) for p in probs)
    torch.testing.assert_close(entropy_from_logits(logits), expected)


def test_masked_mean_matches_loop_and_handles_empty_mask(gen: torch.Generator) -> None:
    values = torch.randn(B, T, generator=gen)
    mask = (torch.rand(B, T, generator=gen) > 0.5).float()
    assert masked_mean(values, mask).item() == pytest.approx(naive_masked_mean(values, mask), abs=1e-6)
    assert masked_mean(values, torch.zeros(B, T)).item() == 0.0


def test_kl_k3_matches_formula_and_is_non_negative(gen: torch.Generator) -> None:
    logp, ref = -torch.rand(B, T, generator=gen) * 3, -torch.rand(B, T, generator=gen) * 3
    out = kl_k3(logp, ref)
    for b in range(B):
        for t in range(T):
            r = float(ref[b, t] - logp[b, t])
            assert float(out[b, t]) == pytest.approx(math.exp(r) - r - 1, abs=1e-6)
    assert bool((out >= 0).all())
    assert torch.equal(kl_k3(logp, logp), torch.zeros(B, T))


def naive_ppo(new, old, ref, adv, mask, entropy, clip, kl_coef, ent_coef) -> float:
    terms = []
    for b in range(new.shape[0]):
        for t in range(new.shape[1]):
            if not mask[b, t]:
                continue
            ratio = math.exp(float(new[b, t] - old[b, t]))
            a = float(adv[b])
            clipped = min(max(ratio, 1 - clip), 1 + clip)
            pg = max(-a * ratio, -a * clipped)
            r = float(ref[b, t] - new[b, t])
            kl = math.exp(r) - r - 1
            terms.append(pg + kl_coef * kl - ent_coef * float(entropy[b, t]))
    return sum(terms) / len(terms)


@pytest.mark.parametrize(
    ("clip", "kl_coef", "ent_coef"), [(0.2, 0.01, 0.01), (0.1, 0.5, 0.0), (0.3, 0.0, 0.2)]
)
def test_ppo_token_loss_matches_loop(
    gen: torch.Generator, clip: float, kl_coef: float, ent_coef: float
) -> None:
    old = -torch.rand(B, T, generator=gen) * 2
    new = old + torch.randn(B, T, generator=gen) * 0.4  # ratios on both sides of the clip range
    ref = -torch.rand(B, T, generator=gen) * 2
    adv = torch.tensor([1.5, -0.7, 0.3])
    mask = (torch.rand(B, T, generator=gen) > 0.3).float()
    entropy = torch.rand(B, T, generator=gen)
    loss, stats = ppo_token_loss(new, old, ref, adv, mask, clip, kl_coef, ent_coef, entropy)
    assert loss.item() == pytest.approx(
        naive_ppo(new, old, ref, adv, mask, entropy, clip, kl_coef, ent_coef), abs=1e-5
    )
    assert stats["kl"] == pytest.approx(naive_masked_mean(kl_k3(new, ref), mask), abs=1e-6)
    assert 0.0 < stats["clip_frac"] < 1.0
    assert set(stats) == {"pg_loss", "kl", "approx_kl", "clip_frac", "entropy"}


def test_ppo_gradient_is_zero_once_clipped() -> None:
    old = torch.zeros(1, 2)
    new = torch.full((1, 2), math.log(1.5), requires_grad=True)  # ratio 1.5 > 1 + clip
    loss, _ = ppo_token_loss(new, old, old, torch.tensor([1.0]), torch.ones(1, 2), kl_coef=0.0, ent_coef=0.0)
    loss.backward()
    assert new.grad is not None and torch.equal(new.grad, torch.zeros(1, 2))
    assert loss.item() == pytest.approx(-1.2)


def test_value_mse_matches_loop() -> None:
    pred, target = torch.tensor([0.5, -0.2, 0.9]), torch.tensor([1.0, 0.0, -1.0])
    expected = sum((p - t) ** 2 for p, t in zip(pred.tolist(), target.tolist(), strict=True)) / 3
    assert value_mse(pred, target).item() == pytest.approx(expected)
