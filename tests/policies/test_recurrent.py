"""Recurrent state packed into model-input rows, and a recurrent TorchPolicy's forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from policy_server.errors import InvalidRequest
from policy_server.policies.lstm import LSTMPolicy, export_recurrent
from policy_server.policies.recurrent import StateLayout, state_answer, state_rows
from policy_server.policies.torch_policy import TorchPolicy

LAYOUT = StateLayout({"h": (1, 3), "c": (2,)})


def test_pack_and_unpack_are_inverse_in_the_schema_order() -> None:
    rng = np.random.default_rng(0)
    state = {"h": rng.standard_normal((4, 1, 3)).astype(np.float32), "c": rng.standard_normal((4, 2)).astype(np.float32)}
    packed = LAYOUT.pack(state)
    assert packed.shape == (4, 5) and LAYOUT.width == 5
    np.testing.assert_array_equal(packed[:, :3], state["h"].reshape(4, 3))
    for name, value in LAYOUT.unpack(packed).items():
        np.testing.assert_array_equal(value, state[name])
    assert state_answer(LAYOUT, packed)[2] == {"h": state["h"][2].tolist(), "c": state["c"][2].tolist()}


def test_request_states_pack_per_row_and_missing_ones_are_zero() -> None:
    packed, given = state_rows(LAYOUT, [None, {"h": [[1.0, 2.0, 3.0]], "c": [4.0, 5.0]}], ["body.0", "body.1"])
    assert given == [False, True]
    np.testing.assert_array_equal(packed, [[0, 0, 0, 0, 0], [1, 2, 3, 4, 5]])


@pytest.mark.parametrize(("h", "got"), [([[1.0, 2.0]], "[1, 2]"), ([1.0, 2.0, 3.0], "[3]"), ([[1.0], [2.0, 3.0]], "ragged")])
def test_a_state_of_the_wrong_shape_is_refused_naming_the_row_and_tensor(h: list, got: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        state_rows(LAYOUT, [None, {"h": h, "c": [0.0, 0.0]}], ["body.observations.0", "body.observations.1"])
    field = caught.value.fields[0]
    assert field.field == "body.observations.1.state.h"
    assert "expected shape [1, 3]" in field.message and got in field.message


def test_the_model_new_state_of_another_shape_names_the_tensor_and_both_shapes() -> None:
    outputs = [torch.zeros(2, 4), torch.zeros(2, 1, 3), torch.zeros(2, 5)]
    with pytest.raises(ValueError, match=r"recurrent.state.c: the schema says per-row shape \[2\] .* \[5\]"):
        LAYOUT.split_outputs(outputs)


@pytest.fixture(scope="module")
def lstm(tmp_path_factory: pytest.TempPathFactory) -> tuple[LSTMPolicy, Path]:
    torch.manual_seed(0)
    module = LSTMPolicy(3, 4, 2)
    return module, export_recurrent(module, 3, module.state_shapes(), tmp_path_factory.mktemp("lstm") / "lstm.pt", "torchscript")


def test_a_recurrent_policy_unpacks_rows_into_obs_and_state_and_packs_the_new_state(lstm) -> None:
    module, path = lstm
    layout = StateLayout({"h": (1, 4), "c": (1, 4)})
    policy = TorchPolicy.from_file(path, state=layout)
    rng = np.random.default_rng(1)
    obs, h, c = (rng.standard_normal(s).astype(np.float32) for s in ((3, 3), (3, 1, 4), (3, 1, 4)))
    out = policy.forward(np.concatenate([obs, layout.pack({"h": h, "c": c})], axis=1))
    with torch.no_grad():
        logits, h1, c1 = module(torch.from_numpy(obs), torch.from_numpy(h), torch.from_numpy(c))
    assert [a.shape for a in out.heads] == [(3, 2), (3, 4), (3, 4)]
    np.testing.assert_allclose(out.heads[0], logits.numpy(), atol=1e-6)
    np.testing.assert_allclose(out.heads[1], h1.reshape(3, 4).numpy(), atol=1e-6)
    np.testing.assert_allclose(out.heads[2], c1.reshape(3, 4).numpy(), atol=1e-6)


def test_rows_with_different_states_in_one_batch_equal_each_row_alone(lstm) -> None:
    _, path = lstm
    policy = TorchPolicy.from_file(path, state=StateLayout({"h": (1, 4), "c": (1, 4)}))
    rows = np.random.default_rng(2).standard_normal((5, 3 + 8)).astype(np.float32)
    together = policy.forward(rows)
    for i in range(5):
        alone = policy.forward(rows[i:i + 1])
        for a, b in zip(together.heads, alone.heads, strict=True):
            np.testing.assert_allclose(a[i:i + 1], b, atol=1e-6)
