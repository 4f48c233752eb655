"""GRPO, PPO and MSE losses (policy_server.llm.losses) against naive Python loops."""

from __future__ import annotations

import math
import random

import pytest
import torch

from policy_server.llm.losses import (
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    kl_k3,
    masked_mean,
    ppo_token_loss,
    token_log_probs,
    value_mse,
)

B, T, V = 3, 6, 7


@pytest.fixture()
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def naive_token_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
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


def test_token_log_probs_matches_loop(gen: torch.Generator) -> None:
    logits = torch.randn(B, T, V, generator=gen)
    ids = torch.randint(0, V, (B, T), generator=gen)
    torch.testing.assert_close(token_log_probs(logits, ids), naive_token_log_probs(logits, ids))


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
    log_probs, ref = -torch.rand(B, T, generator=gen) * 3, -torch.rand(B, T, generator=gen) * 3
    out = kl_k3(log_probs, ref)
    for b in range(B):
        for t in range(T):
            r = float(ref[b, t] - log_probs[b, t])
            assert float(out[b, t]) == pytest.approx(math.exp(r) - r - 1, abs=1e-6)
    assert bool((out >= 0).all())
    assert torch.equal(kl_k3(log_probs, log_probs), torch.zeros(B, T))


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


# -- GRPO: group-normalised advantages and the clipped loss -------------------------------------------------------------


def naive_advantages(rewards: list[float], eps: float, scale: bool) -> list[float]:
    g = len(rewards)
    mean = sum(rewards) / g
    if all(r == rewards[0] for r in rewards):
        return [0.0] * g
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (g - 1))
    return [(r - mean) / (std + eps) if scale else r - mean for r in rewards]


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_group_advantages_match_naive(seed: int, scale: bool) -> None:
    rng = random.Random(seed)
    rewards = [rng.uniform(-2, 3) for _ in range(rng.randint(2, 9))]
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), eps=1e-4, scale=scale)
    assert got.tolist() == pytest.approx(naive_advantages(rewards, 1e-4, scale), rel=1e-5, abs=1e-6)


def test_group_advantages_equal_rewards_are_zero() -> None:
    for rewards in ([0.1, 0.1, 0.1], [5.0], [0.0, 0.0]):
        assert group_advantages(torch.tensor(rewards)).tolist() == [0.0] * len(rewards)


def test_group_advantages_sum_to_zero_and_refuse_bad_shapes() -> None:
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert float(adv.sum()) == pytest.approx(0.0, abs=1e-6)
    assert float(adv[0]) == pytest.approx(1.5, rel=1e-3)  # (1 - 0.25) / std=0.5
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2))


def naive_grpo_loss(new, old, ref, adv, mask, clip_eps, beta) -> float:
    per_seq = []
    for b in range(len(new)):
        total, n = 0.0, 0
        for t in range(len(new[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(new[b][t] - old[b][t])
            clipped = min(max(ratio, 1 - clip_eps), 1 + clip_eps)
            term = min(ratio * adv[b], clipped * adv[b])
            if ref is not None:
                d = ref[b][t] - new[b][t]
                term -= beta * (math.exp(d) - d - 1)
            total += -term
            n += 1
        per_seq.append(total / max(n, 1))
    return sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("with_ref", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_grpo_loss_matches_naive(seed: int, with_ref: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    b, t = 4, 7
    old = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    new = old + torch.randn(b, t, generator=gen, dtype=torch.float64) * 0.4  # some ratios outside the clip
    ref = old + torch.randn(b, t, generator=gen, dtype=torch.float64) * 0.3 if with_ref else None
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    lengths = [7, 3, 1, 5]
    mask = torch.tensor([[1] * n + [0] * (t - n) for n in lengths])
    loss, stats = grpo_loss(new, old, ref, adv, mask, clip_eps=0.2, beta=0.1)
    expected = naive_grpo_loss(
        new.tolist(),
        old.tolist(),
        None if ref is None else ref.tolist(),
        adv.tolist(),
        mask.tolist(),
        0.2,
        0.1,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert stats["loss"] == pytest.approx(expected, rel=1e-9)
    assert 0 < stats["clip_fraction"] < 1


def test_grpo_loss_gradient_on_policy_is_advantage_weighted() -> None:
    # On policy (new == old) the clip is inactive: d loss / d logp[b, t] = -A_b / |o_b|.
    new = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, _ = grpo_loss(new, new.detach(), None, torch.tensor([1.0, -2.0], dtype=torch.float64), mask)
    loss.backward()
    expected = torch.tensor([[-1 / 2, -1 / 2, 0], [2 / 3, 2 / 3, 2 / 3]], dtype=torch.float64) / 2
    torch.testing.assert_close(new.grad, expected)


def test_kl_k3_in_float64_matches_naive_and_is_nonnegative() -> None:
    log_probs = torch.tensor([-1.0, -0.5, -3.0, -0.1], dtype=torch.float64)
    ref = torch.tensor([-1.0, -2.0, -0.2, -0.3], dtype=torch.float64)
    expected = [math.exp(r - p) - (r - p) - 1 for p, r in zip(log_probs.tolist(), ref.tolist())]
    assert kl_k3(log_probs, ref).tolist() == pytest.approx(expected, rel=1e-12)
    assert kl_k3(log_probs, ref)[0].item() == 0.0
    assert bool((kl_k3(log_probs, ref) >= 0).all())
