"""The shared non-finite guard: which tensors it names, and a refused step leaving no trace."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from policy_server.training.guard import (
    MAX_SQUARABLE,
    NonFiniteUpdate,
    guarded_step,
    is_finite,
    nonfinite,
    rollback,
)


def test_nonfinite_names_every_tensor_or_array_with_a_nan_or_an_infinity_in_order() -> None:
    named = {
        "ok": torch.ones(3),
        "nan": torch.tensor([1.0, math.nan]),
        "skipped": None,
        "ints": torch.tensor([1, 2]),
        "inf": np.array([np.inf], dtype=np.float32),
        "ninf": torch.tensor([-math.inf], dtype=torch.bfloat16),
        "array": np.zeros((2, 2)),
    }
    assert nonfinite(named) == ["nan", "inf", "ninf"]
    assert nonfinite(list(named.items())) == ["nan", "inf", "ninf"]
    assert is_finite(3.0e38) and not is_finite(math.nan) and is_finite(np.array([1, 2]))
    assert torch.isfinite(torch.tensor(MAX_SQUARABLE) ** 2)
    assert not torch.isfinite(torch.tensor(MAX_SQUARABLE * 1.001) ** 2)


def test_tensors_whose_sums_overflow_are_finite_and_mixed_dtypes_are_checked_together() -> None:
    """``nonfinite``'s fast path sums each tensor: a finite tensor whose sum overflows float32 (or
    float16) must still pass, through the exact check; one infinity among many dtypes is found."""
    edge = {"big": torch.full((4,), 3.0e38), "half": torch.full((8,), 60000.0, dtype=torch.float16),
            "bf16": torch.ones(3, dtype=torch.bfloat16), "f64": torch.ones(2, dtype=torch.float64),
            "empty": torch.empty(0)}
    assert torch.isinf(edge["big"].sum()) and torch.isinf(edge["half"].sum())
    assert nonfinite(edge) == []
    assert nonfinite({**edge, "late": torch.tensor([0.0, math.inf], dtype=torch.float64)}) == ["late"]
    assert nonfinite({"cancels": torch.tensor([math.inf, -math.inf]), **edge}) == ["cancels"]


def model_and_adam(lr: float = 0.1) -> tuple[torch.nn.Linear, torch.optim.Adam]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.Adam(model.parameters(), lr=lr)


def train_once(model: torch.nn.Linear, optimizer: torch.optim.Adam) -> None:
    guarded_step(optimizer, list(model.named_parameters()), model(torch.ones(4, 3)).pow(2).mean(), "warm-up")


def state_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def assert_same_state(before: tuple[dict, dict], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    weights, opt = before
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    now = optimizer.state_dict()
    assert now["param_groups"] == opt["param_groups"]
    assert now["state"].keys() == opt["state"].keys()
    for index, state in opt["state"].items():
        for key, value in state.items():
            assert torch.equal(now["state"][index][key], value), (index, key)
    assert all(p.grad is None for p in model.parameters())


def loss_with_inf_gradient(model: torch.nn.Linear) -> torch.Tensor:
    """A finite loss (0) whose gradient is infinite: d sqrt(x)/dx at x = 0."""
    return (model.weight[0, 0] - model.weight[0, 0].detach()).abs().sqrt() + 0 * model.bias.sum()


@pytest.mark.parametrize(
    ("reason", "make_loss", "lr", "named"),
    [
        ("loss", lambda m: m(torch.full((1, 3), 3e38)).pow(2).sum(), 0.1, "the loss"),
        ("loss", lambda m: m(torch.tensor([[math.nan, 0.0, 0.0]])).sum(), 0.1, "the loss"),
        ("gradient", loss_with_inf_gradient, 0.1, "weight"),
        # a finite gradient of 1e22 squares to inf in Adam's second moment (weights stay finite)
        ("optimizer_state", lambda m: 1e22 * m(torch.ones(1, 3)).sum(), 0.1, "exp_avg_sq of weight"),
    ],
)
def test_a_refused_step_restores_weights_and_adam_moments_exactly(reason: str, make_loss, lr: float, named: str) -> None:
    model, optimizer = model_and_adam(lr)
    train_once(model, optimizer)  # moments exist: a refused step must not touch them
    before = state_of(model, optimizer)
    with pytest.raises(NonFiniteUpdate) as caught, rollback(optimizer):
        guarded_step(optimizer, list(model.named_parameters()), make_loss(model), "step 2")
    assert caught.value.reason == reason
    assert named in str(caught.value) and "step 2" in str(caught.value)
    assert_same_state(before, model, optimizer)
    train_once(model, optimizer)  # and the next step trains normally
    assert not torch.equal(model.weight, before[0]["weight"])
    assert is_finite(model.weight) and optimizer.state_dict()["state"][0]["step"] == 2


def test_a_step_that_pushes_a_weight_past_float32_is_refused() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e38, momentum=0.9)
    train_once(model, optimizer)
    with torch.no_grad():
        model.weight[0, 0] = 3e38
    before = state_of(model, optimizer)
    with pytest.raises(NonFiniteUpdate, match=r"non-finite weight in weight at step 2"), rollback(optimizer):
        # gradient -1 on weight[0, 0]: finite; the step adds 1e38 to 3e38
        guarded_step(optimizer, list(model.named_parameters()), -model.weight[0, 0], "step 2")
    assert_same_state(before, model, optimizer)


def test_a_refused_first_step_leaves_the_optimiser_without_state() -> None:
    model, optimizer = model_and_adam()
    before = state_of(model, optimizer)
    with pytest.raises(NonFiniteUpdate, match="gradient"), rollback(optimizer):
        guarded_step(optimizer, list(model.named_parameters()), loss_with_inf_gradient(model), "step 1")
    assert optimizer.state_dict()["state"] == {}
    assert_same_state(before, model, optimizer)


def test_rollback_restores_extra_tensors_and_lets_other_errors_through_unchanged() -> None:
    model, optimizer = model_and_adam()
    running = torch.zeros(2)
    before = state_of(model, optimizer)
    with pytest.raises(KeyError), rollback(optimizer, extra=[running]):
        train_once(model, optimizer)
        running += 1
        raise KeyError("boom")
    assert_same_state(before, model, optimizer) and torch.equal(running, torch.zeros(2))
    with rollback(optimizer):  # no exception: the step stays
        train_once(model, optimizer)
    assert not torch.equal(model.weight, before[0]["weight"])
