"""VersionedWeights: one checked, versioned weight swap for torch policies, LLM engines and value models."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch

from policy_server.weights import VersionedWeights, check_weights


class Tiny(VersionedWeights):
    """A linear layer and an integer buffer, as a served model holds them."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3, 2).to(dtype)
        self.net.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def _named_weights(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()


class TinyAdapter(Tiny):
    partial_updates = True
    version_in_errors = False


Change = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def shifted(model: Tiny, by: float) -> dict[str, np.ndarray]:
    return {k: (v + by if v.dtype.kind == "f" else v) for k, v in model.get_weights().items()}


def test_new_weights_are_served_with_their_version_and_snapshots_are_copies() -> None:
    model = Tiny()
    new = shifted(model, 1.0)
    assert model.set_weights(new, 7) == 7
    weights, version = model.snapshot()
    assert version == model.version == 7
    for name, value in new.items():
        np.testing.assert_array_equal(weights[name], value)
    weights["weight"] += 100.0
    assert not np.array_equal(model.get_weights()["weight"], weights["weight"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w | {"bias2": np.zeros(2, np.float32)}, r"unknown \['bias2'\]"),
        (lambda w: {k: v for k, v in w.items() if k != "bias"}, r"missing \['bias'\]"),
        (lambda w: w | {"bias": np.zeros(3, np.float32)}, r"wrong shapes .*'bias': \(\[3\], \[2\]\)"),
        (lambda w: w | {"bias": np.zeros(2, np.int64)}, r"wrong kind .*'bias': \('torch.int64', 'torch.float32'\)"),
        (lambda w: w | {"steps": np.array(1.5)}, r"wrong kind .*'steps'"),
        (lambda w: w | {"bias": np.array([0.0, np.nan], np.float32)}, r"refused weights of version 1: \['bias'\] hold NaN"),
        (lambda w: w | {"bias": np.array([0.0, 1e300])}, r"refused weights of version 1: \['bias'\] hold NaN"),
    ],
)
def test_an_update_that_does_not_fit_changes_nothing(change: Change, message: str) -> None:
    model = Tiny()
    before = model.get_weights()
    with pytest.raises(ValueError, match=message):
        model.set_weights(change(shifted(model, 1.0)), 1)
    assert model.version == 0
    for name, value in model.get_weights().items():
        np.testing.assert_array_equal(value, before[name])


def test_a_partial_model_takes_some_weights_and_refusals_do_not_name_the_version() -> None:
    model = TinyAdapter()
    before = model.get_weights()
    assert model.set_weights({"bias": torch.ones(2)}, 1) == 1
    after = model.get_weights()
    np.testing.assert_array_equal(after["bias"], [1.0, 1.0])
    np.testing.assert_array_equal(after["weight"], before["weight"])
    with pytest.raises(ValueError, match=r"^refused weights: \['bias'\] hold NaN or infinite values"):
        model.set_weights({"bias": torch.tensor([0.0, float("inf")])}, 2)
    with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
        model.set_weights({"nope": torch.ones(2)}, 2)
    assert model.version == 1


def test_values_are_checked_at_the_precision_of_the_parameter() -> None:
    model = Tiny(torch.float16)
    fine = shifted(model, 0.0) | {"bias": np.full(2, 1e4, np.float32)}
    model.set_weights(fine, 1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.set_weights(fine | {"bias": np.full(2, 1e5, np.float32)}, 2)  # over float16's 65504
    assert model.version == 1 and model.get_weights()["bias"].dtype == np.float16


def test_bfloat16_weights_snapshot_as_float32_and_load_back() -> None:
    model = Tiny(torch.bfloat16)
    weights = model.get_weights()
    assert weights["weight"].dtype == np.float32
    model.set_weights(weights, 1)
    assert model.net.weight.dtype == torch.bfloat16


def test_a_swap_waits_for_the_computation_that_holds_the_lock() -> None:
    model = Tiny()
    new = shifted(model, 1.0)
    swapped = threading.Event()
    with model._lock:  # as a forward pass holds it
        worker = threading.Thread(target=lambda: (model.set_weights(new, 1), swapped.set()))
        worker.start()
        assert not swapped.wait(0.2)
        assert model.version == 0
    worker.join(timeout=10)
    assert swapped.is_set() and model.version == 1


def test_check_weights_casts_to_the_models_dtypes_and_devices() -> None:
    current = {"w": torch.zeros(2, dtype=torch.float16), "n": torch.zeros((), dtype=torch.int32)}
    cast = check_weights(current, {"w": np.ones(2, np.float64), "n": np.array(3, np.int64)})
    assert cast["w"].dtype == torch.float16 and cast["n"].dtype == torch.int32 and int(cast["n"]) == 3
