"""The RL maths against naive loops over Python floats."""

from __future__ import annotations

import math

import pytest
import torch

from policy_server.training.functional import gae, normalize, ppo_clip_loss, td_target

GAMMA, LAM = 0.97, 0.9


def naive_gae(r, v, nv, term, end, gamma, lam):  # type: ignore[no-untyped-def]
    """One environment, step by step, the textbook recursion."""
    T = len(r)
    adv = [0.0] * T
    for t in reversed(range(T)):
        delta = r[t] + (0.0 if term[t] else gamma * nv[t]) - v[t]
        later = 0.0 if (end[t] or t == T - 1) else adv[t + 1]
        adv[t] = delta + gamma * lam * later
    return adv


def rollout(seed: int, T: int = 12, N: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    terminated = (torch.rand(T, N, generator=g) < 0.15).float()
    truncated = (torch.rand(T, N, generator=g) < 0.1).float() * (1 - terminated)
    return {
        "rewards": torch.randn(T, N, generator=g),
        "values": torch.randn(T, N, generator=g),
        "next_values": torch.randn(T, N, generator=g),
        "terminated": terminated,
        "episode_end": torch.clamp(terminated + truncated, max=1.0),
    }


@pytest.mark.parametrize("seed", range(5))
def test_gae_matches_the_naive_recursion(seed: int) -> None:
    ro = rollout(seed)
    adv, ret = gae(**ro, gamma=GAMMA, gae_lambda=LAM)
    for n in range(ro["rewards"].shape[1]):
        col = {k: v[:, n].tolist() for k, v in ro.items()}
        expected = naive_gae(col["rewards"], col["values"], col["next_values"], col["terminated"],
                             col["episode_end"], GAMMA, LAM)
        assert adv[:, n].tolist() == pytest.approx(expected, abs=1e-5)
    assert torch.allclose(ret, adv + ro["values"])


def test_gae_bootstraps_a_truncated_episode_but_not_a_terminated_one() -> None:
    one = {k: torch.tensor([[x]]) for k, x in
           {"rewards": 1.0, "values": 0.0, "next_values": 10.0, "episode_end": 1.0}.items()}
    truncated, _ = gae(**one, terminated=torch.tensor([[0.0]]), gamma=0.5, gae_lambda=1.0)
    terminated, _ = gae(**one, terminated=torch.tensor([[1.0]]), gamma=0.5, gae_lambda=1.0)
    assert truncated.item() == pytest.approx(1.0 + 0.5 * 10.0)
    assert terminated.item() == pytest.approx(1.0)


def test_gae_with_lambda_one_is_the_discounted_return_minus_value() -> None:
    T = 6
    rewards = torch.arange(1.0, T + 1).reshape(T, 1)
    zeros = torch.zeros(T, 1)
    end = zeros.clone()
    end[-1] = 1.0
    adv, _ = gae(rewards, zeros, zeros, end, end, gamma=0.9, gae_lambda=1.0)
    expected = [sum(0.9**k * float(rewards[t + k]) for k in range(T - t)) for t in range(T)]
    assert adv[:, 0].tolist() == pytest.approx(expected)


def test_ppo_clip_loss_matches_the_naive_definition() -> None:
    g = torch.Generator().manual_seed(0)
    new, old, adv = (torch.randn(64, generator=g) * s for s in (0.3, 0.3, 1.0))
    eps = 0.2
    pg_loss, approx_kl, clipfrac = ppo_clip_loss(new, old, adv, eps)
    terms, kls, clipped = [], [], 0
    for n, o, a in zip(new.tolist(), old.tolist(), adv.tolist()):
        r = math.exp(n - o)
        terms.append(max(-a * r, -a * min(max(r, 1 - eps), 1 + eps)))
        kls.append((r - 1) - math.log(r))
        clipped += abs(r - 1) > eps
    assert pg_loss.item() == pytest.approx(sum(terms) / 64, rel=1e-5)
    assert approx_kl.item() == pytest.approx(sum(kls) / 64, rel=1e-4)
    assert clipfrac.item() == pytest.approx(clipped / 64)


def test_ppo_clip_loss_has_no_gradient_where_the_ratio_is_clipped_against_the_advantage() -> None:
    new = torch.tensor([math.log(1.5), math.log(1.5), math.log(0.5)], requires_grad=True)
    old = torch.zeros(3)
    adv = torch.tensor([1.0, -1.0, -1.0])
    pg_loss, _, _ = ppo_clip_loss(new, old, adv, 0.2)
    pg_loss.backward()
    # ratio 1.5 with A > 0 is clipped (no incentive to grow); with A < 0 it is not;
    # ratio 0.5 with A < 0 is clipped (no incentive to shrink further)
    assert new.grad is not None
    assert new.grad.tolist() == pytest.approx([0.0, 1.5 / 3, 0.0])


@pytest.mark.parametrize("double", [False, True])
def test_td_target_matches_the_naive_definition(double: bool) -> None:
    g = torch.Generator().manual_seed(1)
    rewards, terminated = torch.randn(16, generator=g), (torch.rand(16, generator=g) < 0.3).float()
    q_target, q_online = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    target = td_target(rewards, q_target, terminated, 0.99, q_online if double else None)
    for b in range(16):
        row = q_online[b] if double else q_target[b]
        a_star = max(range(4), key=lambda a: float(row[a]))
        bootstrap = 0.0 if terminated[b] else 0.99 * float(q_target[b, a_star])
        assert target[b].item() == pytest.approx(float(rewards[b]) + bootstrap, abs=1e-6)
    assert not target.requires_grad


def test_normalize() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 10.0])
    y = normalize(x)
    assert y.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert y.std().item() == pytest.approx(1.0, abs=1e-6)


def test_td_target_takes_the_best_legal_action_under_a_mask() -> None:
    next_q = torch.tensor([[5.0, 1.0, 2.0], [0.0, 9.0, 3.0]])
    mask = torch.tensor([[False, True, True], [True, False, False]])
    target = td_target(torch.zeros(2), next_q, torch.zeros(2), 1.0, next_mask=mask)
    assert target.tolist() == [2.0, 0.0]  # unmasked: 5 and 9
    double = td_target(torch.zeros(2), next_q, torch.zeros(2), 1.0, next_q_online=-next_q, next_mask=mask)
    assert double.tolist() == [1.0, 0.0]  # the online net's best legal action, valued by the target net
