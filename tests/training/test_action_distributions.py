"""Torch action distributions against torch.distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Normal

from policy_server.policies.spaces import BoxSpace, DiscreteSpace, TupleSpace
from policy_server.training.distributions import as_heads, log_prob_entropy

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
