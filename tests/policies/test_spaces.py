"""Action spaces: sizes resolved from model heads, actions, probabilities and descriptions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import norm

from policy_server.policies import distributions as D
from policy_server.policies.spaces import (
    BoxSpace,
    DiscreteSpace,
    MultiBinarySpace,
    TupleSpace,
    make_action_space,
)
from policy_server.schema.config import BoxSpec, DiscreteSpec, MultiBinarySpec, TupleSpec

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


def test_box_mode_is_the_clipped_mean_scored_as_a_censored_gaussian(box_heads: list[np.ndarray]) -> None:
    mean, log_std = box_heads
    samples = bounded_box().mode(box_heads)
    assert [s.action for s in samples] == [[0.5, -2.0], [1.0, 0.1]]
    assert all(s.probability is None for s in samples)
    # row 0: dim 0 inside (the density at the mean), dim 1 clipped at low = -2 (the mass below it)
    want0 = -log_std[0, 0] - 0.5 * math.log(2 * math.pi) + norm.logcdf((-2.0 - mean[0, 1]) / np.exp(log_std[0, 1]))
    # row 1: dim 0 clipped at high = 1 (the mass above it), dim 1 inside
    want1 = norm.logsf((1.0 - mean[1, 0]) / np.exp(log_std[1, 0])) - log_std[1, 1] - 0.5 * math.log(2 * math.pi)
    assert samples[0].log_prob == pytest.approx(want0, abs=1e-12)
    assert samples[1].log_prob == pytest.approx(want1, abs=1e-12)


def test_box_sample_is_clipped_and_scored_on_the_clipped_action() -> None:
    mean = np.zeros((500, 2))
    log_std = np.full((500, 2), np.log(3.0))  # wide enough that most draws leave the bounds
    space = bounded_box()
    samples = space.sample([mean, log_std], np.random.default_rng(11))
    actions = np.array([s.action for s in samples])
    assert (actions >= space.low).all() and (actions <= space.high).all()
    raw = mean + np.exp(log_std) * np.random.default_rng(11).standard_normal(mean.shape)
    assert (np.abs(raw) > space.high).any(), "the test should exercise clipping"
    np.testing.assert_allclose(actions, np.clip(raw, space.low, space.high), atol=1e-12)
    want = D.clipped_gaussian_log_prob(actions, mean, log_std, space.low, space.high)
    np.testing.assert_allclose([s.log_prob for s in samples], want, atol=1e-12)
    # every draw beyond a bound has the same answer: its log-prob is the mass, not the raw density
    at_high = actions[:, 0] == 1.0
    assert len({s.log_prob for s, hit in zip(samples, at_high & (actions[:, 1] == 2.0)) if hit}) <= 1


def test_an_unbounded_box_is_a_plain_gaussian(box_heads: list[np.ndarray]) -> None:
    space = BoxSpace(2, np.full(2, -np.inf), np.full(2, np.inf))
    samples = space.sample(box_heads, np.random.default_rng(0))
    actions = np.array([s.action for s in samples])
    want = D.gaussian_log_prob(actions, *box_heads)
    np.testing.assert_allclose([s.log_prob for s in samples], want, atol=1e-12)
    assert "squash" not in space.distribution(box_heads)[0]


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


# --- multi_discrete, multi_binary, tanh-squashed box ----------------------------------------


def test_multi_discrete_answers_exactly_as_tuple(tuple_heads: list[np.ndarray]) -> None:
    named = make_action_space(TupleSpec(type="multi_discrete"), tuple_heads, WHERE)
    legacy = make_action_space(TupleSpec(type="tuple"), tuple_heads, WHERE)
    assert named.describe() == legacy.describe() | {"type": "multi_discrete"}
    assert named.sample(tuple_heads, np.random.default_rng(3)) == legacy.sample(tuple_heads, np.random.default_rng(3))
    assert named.mode(tuple_heads) == legacy.mode(tuple_heads)
    assert named.distribution(tuple_heads) == legacy.distribution(tuple_heads)


def test_multi_binary_bits_log_probs_and_mode() -> None:
    logits = np.array([[2.0, -1.0, 0.0], [-3.0, 0.5, 4.0]])
    space = make_action_space(MultiBinarySpec(n=3), [logits], WHERE)
    assert isinstance(space, MultiBinarySpace) and space.describe() == {"type": "multi_binary", "n": 3}
    p1 = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose([d["bits"] for d in space.distribution([logits])], p1, atol=1e-15)
    modes = space.mode([logits])
    assert [m.action for m in modes] == [[1, 0, 0], [0, 1, 1]]  # logit > 0
    want = np.log(np.where(np.array([m.action for m in modes]) == 1, p1, 1 - p1)).sum(axis=1)
    np.testing.assert_allclose([m.log_prob for m in modes], want, atol=1e-12)
    np.testing.assert_allclose([m.probability for m in modes], np.exp(want), atol=1e-12)


def test_multi_binary_samples_each_bit_at_its_probability() -> None:
    logits = np.tile([[1.0, -2.0, 0.0]], (20000, 1))
    bits = np.array([s.action for s in MultiBinarySpace(3).sample([logits], np.random.default_rng(1))])
    assert set(np.unique(bits)) <= {0, 1}
    np.testing.assert_allclose(bits.mean(axis=0), 1 / (1 + np.exp(-logits[0])), atol=0.01)


def tanh_box() -> BoxSpace:
    space = make_action_space(BoxSpec(low=[-1.0, 0.0], high=[1.0, 4.0], squash="tanh"),
                              [np.zeros((2, 2)), np.zeros((2, 2))], WHERE)
    assert isinstance(space, BoxSpace) and space.squash == "tanh"
    return space


def test_tanh_box_actions_stay_inside_and_mode_is_the_squashed_mean(box_heads: list[np.ndarray]) -> None:
    space = tanh_box()
    mean, log_std = box_heads
    samples = space.sample([mean, log_std + 2.0], np.random.default_rng(0))
    actions = np.array([s.action for s in samples])
    assert ((actions >= space.low) & (actions <= space.high)).all()
    modes = np.array([s.action for s in space.mode(box_heads)])
    np.testing.assert_allclose(modes, space.low + (np.tanh(mean) + 1) / 2 * (space.high - space.low), atol=1e-12)
    dist = space.distribution(box_heads)[0]
    assert dist["squash"] == "tanh" and dist["low"] == [-1.0, 0.0] and dist["high"] == [1.0, 4.0]
    assert dist["mean"] == mean[0].tolist()
    assert space.describe()["squash"] == "tanh"


def test_tanh_box_density_integrates_to_one() -> None:
    """The change of variables is right when the answered density integrates to 1 over the bounds."""
    space = BoxSpace(1, np.array([0.0]), np.array([4.0]), "tanh")
    x = np.linspace(0.0, 4.0, 400_001)[1:-1, None]
    mean, log_std = np.full_like(x, 0.7), np.full_like(x, np.log(0.8))
    density = np.exp(space.log_prob(x, mean, log_std))
    assert np.trapezoid(density, x[:, 0]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("spec, field", [
    (BoxSpec(low=-1.0, high=[1.0, np.inf], squash="tanh"), "high"),
])
def test_tanh_box_needs_finite_bounds(spec: BoxSpec, field: str) -> None:
    with pytest.raises(ValueError, match=rf"{WHERE}\.{field}: squash: tanh needs finite bounds"):
        make_action_space(spec, [np.zeros((2, 2)), np.zeros((2, 2))], WHERE)


def test_tanh_box_without_bounds_is_refused_by_the_schema() -> None:
    with pytest.raises(ValueError, match="squash: tanh needs finite bounds; set high"):
        BoxSpec(low=-1.0, squash="tanh")


# --- masks ----------------------------------------------------------------------------------


def test_masked_discrete_actions_have_probability_exactly_zero(logits: np.ndarray) -> None:
    space = DiscreteSpace(4)
    mask = np.array([[True, False, True, True], [False, True, True, True], [True, True, False, False]])
    for dist, row in zip(space.distribution([logits], mask), mask):
        probs = np.array(list(dist["probabilities"].values()))
        assert (probs[~row] == 0.0).all() and probs.sum() == pytest.approx(1.0)
    for dist, lg, row in zip(space.distribution([logits], mask), logits, mask):  # the softmax of the allowed
        np.testing.assert_allclose(np.array(list(dist["probabilities"].values()))[row], softmax(lg[row]), atol=1e-12)
    modes = [s.action for s in space.mode([logits], mask)]
    assert modes == [3, 1, 0]  # the unmasked argmax is 1, 0, 2
    rng = np.random.default_rng(0)
    for _ in range(50):
        for s, row in zip(space.sample([logits], rng, mask), mask):
            assert row[s.action] and s.probability > 0


def test_multi_discrete_masks_each_component(tuple_heads: list[np.ndarray]) -> None:
    space = TupleSpace([3, 2], kind="multi_discrete")
    mask = np.array([[False, False, True, True, False], [True, True, False, False, True]])
    first, second = (d["components"] for d in space.distribution(tuple_heads, mask))
    assert first[0] == {"0": 0.0, "1": 0.0, "2": 1.0} and first[1]["1"] == 0.0
    assert second[0]["2"] == 0.0 and second[1] == {"0": 0.0, "1": 1.0}
    assert [s.action for s in space.mode(tuple_heads, mask)] == [[2, 0], [0, 1]]
    assert space.mask_problems(mask) == []


def test_a_component_with_every_action_masked_is_named() -> None:
    space = TupleSpace([3, 2])
    mask = np.array([[True, False, False, False, False], [True, True, True, True, True]])
    assert space.mask_problems(mask) == [(0, "component 1 of the action: the mask allows none of its 2 actions")]
    assert DiscreteSpace(2).mask_problems(np.array([[False, False]])) == [
        (0, "the mask allows none of the 2 actions")]


def test_the_rows_whose_action_their_mask_forbids_are_found() -> None:
    mask = np.array([[False, True, True], [True, True, False], [True, False, True]])
    assert DiscreteSpace(3).forbidden_actions(mask, np.array([[0], [1], [1]])) == [(0, [0]), (2, [0])]
    assert DiscreteSpace(3).forbidden_actions(mask, np.array([[1], [0], [2]])) == []


def test_a_multi_discrete_action_is_forbidden_per_component() -> None:
    space = TupleSpace([3, 2], kind="multi_discrete")  # the mask: 3 columns, then 2, side by side
    mask = np.array([[True, True, False, False, True], [False, True, True, True, False], [True] * 5])
    actions = np.array([[2, 0], [0, 1], [2, 1]])
    assert space.forbidden_actions(mask, actions) == [(0, [0, 1]), (1, [0, 1])]
    assert space.forbidden_actions(mask, np.array([[1, 1], [2, 0], [0, 0]])) == []
    assert space.forbidden_actions(mask[:1], np.array([[0, 0]])) == [(0, [1])]
