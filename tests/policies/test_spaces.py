"""Action spaces: sizes resolved from model heads, actions, probabilities and descriptions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from policy_server.policies import distributions as D
from policy_server.policies.spaces import BoxSpace, DiscreteSpace, TupleSpace, make_action_space
from policy_server.schema.config import BoxSpec, DiscreteSpec, TupleSpec

WHERE = "parameters.action_space"


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture
def logits() -> np.ndarray:
    return np.array([[0.1, 2.0, -1.0, 0.5], [3.0, 0.0, 0.0, -2.0], [-1.0, -1.0, 4.0, 0.0]])


@pytest.fixture
def tuple_heads() -> list[np.ndarray]:
    return [
        np.array([[0.0, 1.0, 2.0], [2.0, -1.0, 0.5]]),
        np.array([[1.5, -0.5], [-3.0, 0.2]]),
    ]


@pytest.fixture
def box_heads() -> list[np.ndarray]:
    mean = np.array([[0.5, -3.0], [2.0, 0.1]])
    log_std = np.array([[0.0, -1.0], [0.5, 0.2]])
    return [mean, log_std]


# --- make_action_space: sizes from the model, mismatches named ------------------------------


def test_discrete_size_comes_from_the_model(logits: np.ndarray) -> None:
    space = make_action_space(DiscreteSpec(), [logits], WHERE)
    assert isinstance(space, DiscreteSpace)
    assert space.n == 4
    assert space.labels == ["0", "1", "2", "3"]


def test_discrete_n_mismatch_names_field_and_both_numbers(logits: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"parameters\.action_space\.n\b.*5.*4"):
        make_action_space(DiscreteSpec(n=5), [logits], WHERE)


def test_discrete_names_length_mismatch(logits: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"parameters\.action_space\.names: 3 names for 4"):
        make_action_space(DiscreteSpec(names=["a", "b", "c"]), [logits], WHERE)


def test_discrete_needs_exactly_one_head(logits: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"parameters\.action_space\.type: .*one.*returns 2"):
        make_action_space(DiscreteSpec(), [logits, logits], WHERE)


def test_heads_must_be_two_dimensional() -> None:
    with pytest.raises(ValueError, match=r"parameters\.action_space: .*\[\[4\]\]"):
        make_action_space(DiscreteSpec(), [np.zeros(4)], WHERE)


def test_tuple_sizes_come_from_the_model(tuple_heads: list[np.ndarray]) -> None:
    space = make_action_space(TupleSpec(), tuple_heads, WHERE)
    assert isinstance(space, TupleSpace)
    assert space.nvec == [3, 2]
    assert make_action_space(TupleSpec(nvec=[3, 2]), tuple_heads, WHERE).nvec == [3, 2]


def test_tuple_nvec_mismatch_names_field_and_both_sizes(tuple_heads: list[np.ndarray]) -> None:
    with pytest.raises(ValueError, match=r"parameters\.action_space\.nvec: .*\[3, 3\].*\[3, 2\]"):
        make_action_space(TupleSpec(nvec=[3, 3]), tuple_heads, WHERE)


def test_tuple_wrong_number_of_heads(tuple_heads: list[np.ndarray]) -> None:
    with pytest.raises(ValueError, match=r"parameters\.action_space\.nvec: .*\[3, 2, 4\].*\[3, 2\]"):
        make_action_space(TupleSpec(nvec=[3, 2, 4]), tuple_heads, WHERE)


def test_tuple_names_mismatch(tuple_heads: list[np.ndarray]) -> None:
    names = [["a", "b", "c"], ["x", "y", "z"]]
    with pytest.raises(ValueError, match=r"parameters\.action_space\.names: .*\[3, 3\].*\[3, 2\]"):
        make_action_space(TupleSpec(names=names), tuple_heads, WHERE)


def test_box_size_and_bounds(box_heads: list[np.ndarray]) -> None:
    space = make_action_space(BoxSpec(low=-1.0, high=[1.0, 2.0]), box_heads, WHERE)
    assert isinstance(space, BoxSpace)
    assert space.dim == 2
    np.testing.assert_array_equal(space.low, [-1.0, -1.0])
    np.testing.assert_array_equal(space.high, [1.0, 2.0])
    unbounded = make_action_space(BoxSpec(), box_heads, WHERE)
    assert np.isneginf(unbounded.low).all() and np.isposinf(unbounded.high).all()


def test_box_shape_mismatch_names_field_and_both_numbers(box_heads: list[np.ndarray]) -> None:
    with pytest.raises(ValueError, match=r"parameters\.action_space\.shape: .*\[3\].*2 values"):
        make_action_space(BoxSpec(shape=[3]), box_heads, WHERE)


def test_box_needs_two_heads_of_equal_width(box_heads: list[np.ndarray]) -> None:
    with pytest.raises(ValueError, match=r"parameters\.action_space\.type: box needs two.*\[2\]$"):
        make_action_space(BoxSpec(), box_heads[:1], WHERE)
    with pytest.raises(ValueError, match=r"parameters\.action_space\.type: .*\[2, 3\]"):
        make_action_space(BoxSpec(), [box_heads[0], np.zeros((2, 3))], WHERE)


def test_box_bound_count_mismatch(box_heads: list[np.ndarray]) -> None:
    with pytest.raises(ValueError, match=r"parameters\.action_space\.low: 3 bounds .* 2 values"):
        make_action_space(BoxSpec(low=[0.0, 0.0, 0.0]), box_heads, WHERE)


# --- discrete -------------------------------------------------------------------------------


def test_discrete_mode_is_argmax_with_consistent_probability(logits: np.ndarray) -> None:
    space = DiscreteSpace(4, ["up", "right", "down", "left"])
    samples = space.mode([logits])
    assert [s.action for s in samples] == [1, 0, 2]
    assert [s.action_name for s in samples] == ["right", "up", "down"]
    probs = softmax(logits)
    for b, s in enumerate(samples):
        assert s.probability == pytest.approx(probs[b, s.action], abs=1e-12)
        assert s.probability == pytest.approx(math.exp(s.log_prob), abs=1e-15)


def test_discrete_sample_is_the_seeded_draw_with_its_log_prob(logits: np.ndarray) -> None:
    space = DiscreteSpace(4)
    samples = space.sample([logits], np.random.default_rng(3))
    expected = D.sample_categorical(logits, np.random.default_rng(3))
    assert [s.action for s in samples] == expected.tolist()
    logp = D.log_softmax(logits)
    for b, s in enumerate(samples):
        assert isinstance(s.action, int)
        assert s.action_name == str(s.action)
        assert s.log_prob == pytest.approx(logp[b, s.action], abs=1e-12)
        assert s.probability == pytest.approx(math.exp(s.log_prob), abs=1e-15)


def test_discrete_distribution_is_exact_and_keyed_by_names(logits: np.ndarray) -> None:
    names = ["up", "right", "down", "left"]
    dist = DiscreteSpace(4, names).distribution([logits])
    assert len(dist) == 3
    probs = softmax(logits)
    for b, row in enumerate(dist):
        assert list(row["probabilities"]) == names
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(list(row["probabilities"].values()), probs[b], atol=1e-12)


# --- tuple ----------------------------------------------------------------------------------


def test_tuple_mode_is_argmax_per_component_with_joint_probability(
    tuple_heads: list[np.ndarray],
) -> None:
    space = TupleSpace([3, 2], [["a", "b", "c"], ["x", "y"]])
    samples = space.mode(tuple_heads)
    assert [s.action for s in samples] == [[2, 0], [0, 1]]
    assert [s.action_name for s in samples] == [["c", "x"], ["a", "y"]]
    p0, p1 = softmax(tuple_heads[0]), softmax(tuple_heads[1])
    for b, s in enumerate(samples):
        product = p0[b, s.action[0]] * p1[b, s.action[1]]
        assert s.probability == pytest.approx(product, abs=1e-12)
        assert s.probability == pytest.approx(math.exp(s.log_prob), abs=1e-15)


def test_tuple_sample_log_prob_is_the_sum_of_components(tuple_heads: list[np.ndarray]) -> None:
    space = TupleSpace([3, 2])
    samples = space.sample(tuple_heads, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    expected = [D.sample_categorical(h, rng) for h in tuple_heads]
    logps = [D.log_softmax(h) for h in tuple_heads]
    for b, s in enumerate(samples):
        assert s.action == [int(expected[0][b]), int(expected[1][b])]
        assert s.action_name == [str(a) for a in s.action]
        joint = logps[0][b, s.action[0]] + logps[1][b, s.action[1]]
        assert s.log_prob == pytest.approx(joint, abs=1e-12)
        assert s.probability == pytest.approx(math.exp(joint), abs=1e-15)


def test_tuple_distribution_has_one_exact_distribution_per_component(
    tuple_heads: list[np.ndarray],
) -> None:
    dist = TupleSpace([3, 2], [["a", "b", "c"], ["x", "y"]]).distribution(tuple_heads)
    assert len(dist) == 2
    for b, row in enumerate(dist):
        first, second = row["components"]
        assert list(first) == ["a", "b", "c"] and list(second) == ["x", "y"]
        np.testing.assert_allclose(list(first.values()), softmax(tuple_heads[0])[b], atol=1e-12)
        np.testing.assert_allclose(list(second.values()), softmax(tuple_heads[1])[b], atol=1e-12)
        assert sum(first.values()) == pytest.approx(1.0) and sum(second.values()) == pytest.approx(1.0)


# --- box ------------------------------------------------------------------------------------


def bounded_box() -> BoxSpace:
    return BoxSpace(2, np.array([-1.0, -2.0]), np.array([1.0, 2.0]))


def test_box_mode_is_the_clipped_mean(box_heads: list[np.ndarray]) -> None:
    mean, log_std = box_heads
    samples = bounded_box().mode(box_heads)
    assert [s.action for s in samples] == [[0.5, -2.0], [1.0, 0.1]]
    for b, s in enumerate(samples):
        assert s.probability is None
        # the density at the mean: only the normalising terms remain
        want = float(np.sum(-log_std[b] - 0.5 * math.log(2 * math.pi)))
        assert s.log_prob == pytest.approx(want, abs=1e-12)
        row = slice(b, b + 1)
        assert s.log_prob == pytest.approx(D.gaussian_log_prob(mean[row], mean[row], log_std[row])[0])


def test_box_sample_is_clipped_and_scored_on_the_raw_draw() -> None:
    mean = np.zeros((500, 2))
    log_std = np.full((500, 2), np.log(3.0))  # wide enough that most draws leave the bounds
    space = bounded_box()
    samples = space.sample([mean, log_std], np.random.default_rng(11))
    actions = np.array([s.action for s in samples])
    assert actions.shape == (500, 2)
    assert (actions >= space.low).all() and (actions <= space.high).all()
    raw = mean + np.exp(log_std) * np.random.default_rng(11).standard_normal(mean.shape)
    assert (np.abs(raw) > space.high).any(), "the test should exercise clipping"
    np.testing.assert_allclose(actions, np.clip(raw, space.low, space.high), atol=1e-12)
    np.testing.assert_allclose(
        [s.log_prob for s in samples], D.gaussian_log_prob(raw, mean, log_std), atol=1e-12
    )


def test_box_distribution_gives_mean_and_std(box_heads: list[np.ndarray]) -> None:
    mean, log_std = box_heads
    dist = bounded_box().distribution(box_heads)
    assert [d["mean"] for d in dist] == mean.tolist()
    np.testing.assert_allclose([d["std"] for d in dist], np.exp(log_std), atol=1e-15)


# --- describe -------------------------------------------------------------------------------


def test_describe_is_json_serialisable() -> None:
    spaces = {
        "discrete": make_action_space(DiscreteSpec(names=["a", "b"]), [np.zeros((2, 2))], WHERE),
        "tuple": make_action_space(TupleSpec(), [np.zeros((2, 3)), np.zeros((2, 2))], WHERE),
        "box": make_action_space(BoxSpec(low=0.0), [np.zeros((2, 2)), np.zeros((2, 2))], WHERE),
    }
    described = {kind: json.loads(json.dumps(s.describe(), allow_nan=False)) for kind, s in spaces.items()}
    assert described["discrete"] == {"type": "discrete", "n": 2, "names": ["a", "b"]}
    assert described["tuple"] == {"type": "tuple", "nvec": [3, 2], "names": [["0", "1", "2"], ["0", "1"]]}
    assert described["box"] == {"type": "box", "shape": [2], "low": [0.0, 0.0], "high": [None, None]}
