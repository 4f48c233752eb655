"""Served action spaces in Gymnasium's form, and the spaces file's round trip through Minari's
serialisation."""

from __future__ import annotations

import gymnasium.spaces as gs
import numpy as np
import pytest

from policy_server.experience_log.spaces import action_space, model_input_box
from policy_server.policies.spaces import BoxSpace, DiscreteSpace, MultiBinarySpace, TupleSpace


@pytest.mark.parametrize(("served", "expected"), [
    (DiscreteSpace(4, ["a", "b", "c", "d"]), gs.Discrete(4)),
    (TupleSpace([3, 2]), gs.MultiDiscrete([3, 2])),
    (TupleSpace([3, 2], kind="multi_discrete"), gs.MultiDiscrete([3, 2])),
    (MultiBinarySpace(5), gs.MultiBinary(5)),
    (BoxSpace(2, np.array([-1.0, -np.inf]), np.array([1.0, 2.0])),
     gs.Box(np.array([-1, -np.inf], dtype=np.float32), np.array([1, 2], dtype=np.float32), dtype=np.float32)),
], ids=["discrete", "tuple", "multi_discrete", "multi_binary", "box"])
def test_served_action_spaces_have_their_gymnasium_form(served: object, expected: gs.Space[object]) -> None:
    assert action_space(served) == expected  # type: ignore[arg-type]


def test_the_model_input_box_spans_its_dtype() -> None:
    assert model_input_box((84, 84, 4), np.dtype(np.uint8)) == gs.Box(0, 255, (84, 84, 4), np.uint8)
    box = model_input_box((3,), np.dtype(np.float32))
    assert box.dtype == np.float32 and np.isinf(box.low).all() and np.isinf(box.high).all()
