"""Torch action distributions against torch.distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sb3_contrib.common.maskable.distributions import MaskableCategorical
from torch.distributions import (
    AffineTransform,
    Bernoulli,
    Categorical,
    Independent,
    Normal,
    TanhTransform,
    TransformedDistribution,
)

from policy_server.policies.spaces import BoxSpace, DiscreteSpace, MultiBinarySpace, TupleSpace
from policy_server.training.distributions import as_heads, gaussian_log_prob, log_prob_entropy

B = 7


@pytest.fixture()
def g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_discrete_matches_categorical(g: torch.Generator) -> None:
    logits = torch.randn(B, 5, generator=g) * 3
    actions = torch.randint(5, (B, 1), generator=g)
    log_prob, entropy = log_prob_entropy(DiscreteSpace(5), [logits], actions)
    reference = Categorical(logits=logits)
    assert log_prob.shape == entropy.shape == (B,)
    torch.testing.assert_close(log_prob, reference.log_prob(actions[:, 0]))
    torch.testing.assert_close(entropy, reference.entropy())


def test_a_masked_action_has_no_probability_and_a_finite_entropy(g: torch.Generator) -> None:
    logits = torch.randn(B, 4, generator=g)
    logits[:, 0] = -torch.inf
    log_prob, entropy = log_prob_entropy(DiscreteSpace(4), [logits], torch.zeros(B, 1, dtype=torch.int64))
    assert torch.isneginf(log_prob).all()
    torch.testing.assert_close(entropy, Categorical(logits=logits).entropy())


def test_tuple_sums_the_components(g: torch.Generator) -> None:
    heads = [torch.randn(B, 3, generator=g), torch.randn(B, 2, generator=g)]
    actions = torch.stack([torch.randint(3, (B,), generator=g), torch.randint(2, (B,), generator=g)], dim=1)
    log_prob, entropy = log_prob_entropy(TupleSpace([3, 2]), heads, actions)
    components = [Categorical(logits=h) for h in heads]
    torch.testing.assert_close(log_prob, sum(d.log_prob(actions[:, i]) for i, d in enumerate(components)))
    torch.testing.assert_close(entropy, sum(d.entropy() for d in components))


@pytest.mark.parametrize("per_row_std", [False, True])
def test_box_is_a_diagonal_gaussian_summed_over_dims(g: torch.Generator, per_row_std: bool) -> None:
    mean = torch.randn(B, 3, generator=g)
    log_std = torch.randn(B, 3, generator=g) * 0.5 if per_row_std else torch.tensor([-1.0, 0.0, 0.7])
    x = torch.randn(B, 3, generator=g)
    space = BoxSpace(3, np.full(3, -np.inf), np.full(3, np.inf))
    log_prob, entropy = log_prob_entropy(space, [mean, log_std], x)
    reference = Normal(mean, log_std.exp().expand_as(mean))
    torch.testing.assert_close(log_prob, reference.log_prob(x).sum(-1))
    torch.testing.assert_close(entropy, reference.entropy().sum(-1))


def test_gradients_flow_to_every_head(g: torch.Generator) -> None:
    mean, log_std = torch.randn(B, 2, generator=g, requires_grad=True), torch.zeros(2, requires_grad=True)
    space = BoxSpace(2, np.full(2, -1.0), np.full(2, 1.0))
    log_prob, entropy = log_prob_entropy(space, [mean, log_std], torch.randn(B, 2, generator=g))
    (log_prob.sum() + entropy.sum()).backward()
    assert mean.grad is not None and log_std.grad is not None and log_std.grad.abs().sum() > 0


def test_heads_of_a_module_output() -> None:
    t = torch.zeros(2, 3)
    assert len(as_heads(t)) == 1 and len(as_heads((t, t))) == 2
    with pytest.raises(TypeError, match="tensor or a tuple"):
        as_heads({"logits": t})


def test_a_wrong_number_of_heads_is_refused(g: torch.Generator) -> None:
    with pytest.raises(ValueError, match="1 logits heads for actions of 2 components"):
        log_prob_entropy(TupleSpace([3, 2]), [torch.randn(B, 3, generator=g)], torch.zeros(B, 2, dtype=torch.int64))


# --- the spaces of issue 15: multi-binary, tanh-squashed and clipped boxes, masks ------------


def test_multi_binary_matches_independent_bernoullis(g: torch.Generator) -> None:
    logits = torch.randn(B, 4, generator=g) * 3
    bits = torch.randint(2, (B, 4), generator=g)
    log_prob, entropy = log_prob_entropy(MultiBinarySpace(4), [logits], bits)
    reference = Independent(Bernoulli(logits=logits), 1)
    torch.testing.assert_close(log_prob, reference.log_prob(bits.float()))
    torch.testing.assert_close(entropy, reference.entropy())


def test_tanh_box_matches_a_transformed_gaussian_and_the_served_log_prob(g: torch.Generator) -> None:
    low, high = np.array([-1.0, 0.0]), np.array([1.0, 4.0])
    space = BoxSpace(2, low, high, "tanh")
    mean, log_std = torch.randn(B, 2, generator=g, dtype=torch.float64), torch.randn(B, 2, generator=g, dtype=torch.float64) * 0.3
    reference = TransformedDistribution(
        Independent(Normal(mean, log_std.exp()), 1),
        [TanhTransform(), AffineTransform(torch.tensor((low + high) / 2), torch.tensor((high - low) / 2))],
    )
    x = reference.sample()
    log_prob, _ = log_prob_entropy(space, [mean, log_std], x)
    torch.testing.assert_close(log_prob, reference.log_prob(x), atol=1e-6, rtol=1e-6)
    served = space.log_prob(x.numpy(), mean.numpy(), log_std.numpy())
    np.testing.assert_allclose(log_prob.numpy(), served, atol=1e-9)


def test_clipped_box_matches_the_served_censored_gaussian(g: torch.Generator) -> None:
    space = BoxSpace(3, np.array([-1.0, -np.inf, 0.0]), np.array([1.0, 2.0, np.inf]))
    mean, log_std = torch.randn(B, 3, generator=g, dtype=torch.float64), torch.randn(B, 3, generator=g, dtype=torch.float64)
    x = torch.clamp(torch.randn(B, 3, generator=g, dtype=torch.float64) * 2, torch.tensor(space.low), torch.tensor(space.high))
    log_prob, entropy = log_prob_entropy(space, [mean.requires_grad_(), log_std.requires_grad_()], x)
    np.testing.assert_allclose(log_prob.detach().numpy(), space.log_prob(x.numpy(), mean.detach().numpy(),
                                                                          log_std.detach().numpy()), atol=1e-12)
    torch.testing.assert_close(entropy, Normal(mean, log_std.exp()).entropy().sum(-1))  # the Gaussian's, kept
    log_prob.sum().backward()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_std.grad).all()


def test_the_censored_mass_at_a_bound_is_the_share_of_draws_clipped_there() -> None:
    """Monte Carlo: exp(log-prob at the bound) = the share of N(mean, std) draws beyond it."""
    space = BoxSpace(1, np.array([-0.5]), np.array([1.0]))
    mean, log_std = np.array([[0.3]]), np.array([[np.log(0.9)]])
    draws = np.random.default_rng(0).normal(0.3, 0.9, 400_000)
    for bound, share in ((-0.5, (draws <= -0.5).mean()), (1.0, (draws >= 1.0).mean())):
        mass = np.exp(space.log_prob(np.array([[bound]]), mean, log_std))[0]
        assert mass == pytest.approx(share, abs=2e-3)


def test_clipping_no_longer_biases_the_ratio_at_the_bounds() -> None:
    """Served answers scored by the trainer with unchanged weights: the ratio must be 1 for every
    action. Before the fix the server answered the log-density of the raw draw and the trainer
    evaluated the clipped action: at a bound, the ratio was far from 1."""
    space = BoxSpace(2, np.full(2, -1.0), np.full(2, 1.0))
    mean = np.tile(np.array([[0.8, -0.2]], dtype=np.float32), (256, 1))
    log_std = np.zeros_like(mean)
    answers = space.sample([mean, log_std], np.random.default_rng(5))
    actions = torch.tensor([a.action for a in answers], dtype=torch.float32)  # as experience carries them
    served = torch.tensor([a.log_prob for a in answers], dtype=torch.float32)
    at_bound = (actions.abs() == 1.0).any(dim=1)
    assert at_bound.sum() > 50 and (~at_bound).sum() > 50

    new, _ = log_prob_entropy(space, [torch.from_numpy(mean), torch.from_numpy(log_std)], actions)
    np.testing.assert_allclose(torch.exp(new - served).numpy(), 1.0, atol=1e-5)  # every action, either side

    raw = torch.from_numpy(mean) + torch.from_numpy(np.random.default_rng(5).standard_normal(mean.shape).astype(np.float32))
    old_served = gaussian_log_prob(raw, torch.from_numpy(mean), torch.from_numpy(log_std))  # the old answer
    old_trainer = gaussian_log_prob(actions, torch.from_numpy(mean), torch.from_numpy(log_std))
    old_ratio = torch.exp(old_trainer - old_served)
    assert (old_ratio[at_bound] - 1.0).abs().min() > 1e-3 and (old_ratio[at_bound] > 1.0).all()
    torch.testing.assert_close(old_ratio[~at_bound], torch.ones(int((~at_bound).sum())))


def test_masked_categorical_matches_sb3_contrib(g: torch.Generator) -> None:
    logits = [torch.randn(B, 3, generator=g), torch.randn(B, 4, generator=g)]
    mask = torch.rand(B, 7, generator=g) > 0.4
    mask[:, 0] = mask[:, 3] = True  # one action allowed per component
    actions = torch.zeros(B, 2, dtype=torch.int64)  # allowed in every row
    log_prob, entropy = log_prob_entropy(TupleSpace([3, 4]), logits, actions, mask)
    reference = [MaskableCategorical(logits=lg, masks=m) for lg, m in zip(logits, torch.split(mask, [3, 4], dim=1))]
    torch.testing.assert_close(log_prob, sum(d.log_prob(actions[:, i]) for i, d in enumerate(reference)))
    torch.testing.assert_close(entropy, sum(d.entropy() for d in reference))
    logits[0].requires_grad_()
    log_prob_entropy(DiscreteSpace(3), [logits[0]], actions[:, :1], mask[:, :3])[1].sum().backward()
    assert torch.isfinite(logits[0].grad).all() and (logits[0].grad[~mask[:, :3]] == 0).all()
