"""PPO and DQN learners on the served module itself: every parameter trains, state round-trips.

Synthetic CartPole-shaped experience (4 observations); the models are exported and re-loaded
exactly as the server loads them, in both file formats.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from policy_server.export import MLPPolicy, export_module
from policy_server.policies.spaces import ActionSpace, BoxSpace, DiscreteSpace, TupleSpace
from policy_server.policies.torch_policy import TorchPolicy, load_module, model_format
from policy_server.schema.training import DQNConfig, PPOConfig, TrainingSpec
from policy_server.training.checkpoint import CheckpointStore
from policy_server.training.distributions import as_heads, log_prob_entropy
from policy_server.training.dqn import culprits
from policy_server.training.experience import ExperienceBatch
from policy_server.training.guard import NonFiniteUpdate
from policy_server.training.learners import DQNLearner, Learner, PPOLearner, make_learner
from policy_server.training.ppo import explained_variance, layer_init, value_loss

OBS_DIM = 4
SPACES: dict[str, ActionSpace] = {
    "discrete": DiscreteSpace(2),
    "tuple": TupleSpace([3, 2]),
    "box": BoxSpace(2, np.full(2, -1.0), np.full(2, 1.0)),
}
MODELS = {  # name: (action space, MLPPolicy keyword, file name)
    "discrete-export": ("discrete", {"nvec": [2]}, "discrete.pt2"),
    "discrete-torchscript": ("discrete", {"nvec": [2]}, "discrete.pt"),
    "tuple-torchscript": ("tuple", {"nvec": [3, 2]}, "tuple.pt"),
    "box-export": ("box", {"box_dim": 2}, "box.pt2"),
}
PPO = PPOConfig(rollout_samples=64, num_minibatches=2, update_epochs=2, critic_hidden=[16])
DQN = DQNConfig(buffer_size=100, batch_size=16, learning_starts=32, train_frequency=4,
                target_network_frequency=32, publish_frequency=4, exploration_samples=100, end_epsilon=0.1)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    files = {}
    for name, (_, kind, file) in MODELS.items():
        torch.manual_seed(0)
        fmt = "export" if file.endswith(".pt2") else "torchscript"
        files[name] = export_module(MLPPolicy(OBS_DIM, [8], **kind), OBS_DIM, root / file, fmt=fmt)
    return files


def load(model_files: dict[str, Path], name: str) -> torch.nn.Module:
    path = model_files[name]
    return load_module(path.read_bytes(), model_format(path))


def learner_for(model_files: dict[str, Path], name: str, seed: int = 0, **spec: Any) -> Learner:
    training = TrainingSpec(**({"ppo": PPO, "dqn": DQN, "seed": seed} | spec))
    return make_learner(load(model_files, name), OBS_DIM, SPACES[MODELS[name][0]], training)


def experience(learner: Learner, space: ActionSpace, n: int, seed: int, known_log_probs: bool = True,
               client_id: str = "c") -> ExperienceBatch:
    """``n`` random steps acted by the learner's model; log-probs a little off (older acting model)."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n + 1, OBS_DIM)).astype(np.float32)
    if isinstance(space, BoxSpace):
        actions = rng.normal(size=(n, space.dim)).astype(np.float32)
    else:
        actions = np.stack([rng.integers(k, size=n) for k in getattr(space, "nvec", [2])], axis=1)
    with torch.no_grad():
        heads = as_heads(learner.actor(torch.from_numpy(obs[:-1])))
        log_probs, _ = log_prob_entropy(space, heads, torch.from_numpy(actions))
    terminated = rng.random(n) < 0.1
    truncated = (rng.random(n) < 0.05) & ~terminated
    segment_end = terminated | truncated
    segment_end[-1] = True
    return ExperienceBatch(
        obs=obs[:-1], next_obs=obs[1:], actions=actions, rewards=rng.normal(1.0, 1.0, n).astype(np.float32),
        terminated=terminated, truncated=truncated, segment_end=segment_end,
        log_probs=(log_probs.numpy() + rng.normal(0, 0.1, n) if known_log_probs else np.full(n, np.nan))
        .astype(np.float32),
        versions=np.zeros(n, dtype=np.int64), client_id=client_id,
    )


def feed(learner: Learner, name: str, n: int, seed: int) -> None:
    learner.add(experience(learner, SPACES[MODELS[name][0]], n, seed))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_all_changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = module.state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters unchanged by the update: {unchanged}"


@pytest.mark.parametrize("name", MODELS)
def test_one_ppo_update_changes_every_parameter_of_actor_and_critic(model_files: dict[str, Path], name: str) -> None:
    learner = learner_for(model_files, name)
    assert isinstance(learner, PPOLearner) and learner.exploration() == {}
    actor, critic = snapshot(learner.actor), snapshot(learner.critic)
    feed(learner, name, 40, seed=1)
    assert not learner.ready()
    feed(learner, name, 30, seed=2)
    assert learner.ready()
    stats = learner.update()
    assert_all_changed(actor, learner.actor)
    assert_all_changed(critic, learner.critic)
    assert not learner.ready() and stats["batch_size"] == 70 and stats["samples"] == 70
    assert stats["epochs"] == 2 and stats["learning_rate"] == PPO.learning_rate
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values()), stats
    assert stats["clipfrac"] > 0 and stats["approx_kl"] > 0 and stats["v_loss"] > 0


@pytest.mark.parametrize("name", MODELS)
def test_actor_weights_are_the_served_modules_and_load_into_a_torch_policy(
    model_files: dict[str, Path], name: str
) -> None:
    learner = learner_for(model_files, name)
    feed(learner, name, 64, seed=1)
    learner.update()
    weights = learner.actor_weights()
    served = load(model_files, name)
    assert {k: v.shape for k, v in weights.items()} == {k: tuple(v.shape) for k, v in served.state_dict().items()}
    policy = TorchPolicy(served)
    policy.set_weights(weights, version=1)
    obs = np.random.default_rng(0).normal(size=(5, OBS_DIM)).astype(np.float32)
    with torch.no_grad():
        expected = [h.numpy() for h in as_heads(learner.actor(torch.from_numpy(obs)))]
    for got, want in zip(policy.forward(obs).heads, expected):
        np.testing.assert_array_equal(got, want)
    weights[next(iter(weights))] += 1.0  # copies: changing them leaves the learner alone
    assert not np.array_equal(weights[next(iter(weights))], learner.actor_weights()[next(iter(weights))])


def round_trip(learner: Learner, tmp_path: Path) -> dict[str, Any]:
    """The learner's state through a real checkpoint file (weights-only load)."""
    store = CheckpointStore(tmp_path, keep=1)
    store.save("state", learner.state_dict())
    return store.load("state")


@pytest.mark.parametrize(("name", "options"), [
    ("discrete-export", {}),
    ("box-export", {"normalize_rewards": True, "anneal_lr_samples": 1000}),
])
def test_ppo_state_round_trip_gives_identical_outputs_and_continues_identically(
    model_files: dict[str, Path], tmp_path: Path, name: str, options: dict[str, Any]
) -> None:
    ppo = PPOConfig(**{**PPO.__dict__, **options})
    a = learner_for(model_files, name, ppo=ppo)
    feed(a, name, 64, seed=1)
    a.update()
    feed(a, name, 10, seed=2)  # waiting rows are not part of the state
    b = learner_for(model_files, name, seed=99, ppo=ppo)
    b.load_state_dict(round_trip(a, tmp_path))
    a.buffer.take()
    obs = torch.randn(6, OBS_DIM)
    with torch.no_grad():
        for x, y in zip(as_heads(a.actor(obs)), as_heads(b.actor(obs))):
            assert torch.equal(x, y)
        assert torch.equal(a.critic(obs), b.critic(obs))
    batch = experience(a, SPACES[MODELS[name][0]], 64, seed=3)
    a.add(batch)
    b.add(batch)
    assert a.update() == b.update()
    assert all(np.array_equal(v, b.actor_weights()[k]) for k, v in a.actor_weights().items())


def test_ppo_uses_the_current_model_where_the_log_prob_is_unknown(model_files: dict[str, Path]) -> None:
    ppo = PPOConfig(rollout_samples=32, num_minibatches=1, update_epochs=1, critic_hidden=[16])
    learner = learner_for(model_files, "discrete-export", ppo=ppo)
    learner.add(experience(learner, SPACES["discrete"], 32, seed=1, known_log_probs=False))
    stats = learner.update()  # the one step starts at ratio 1: nothing clipped, no divergence
    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    far_off = experience(learner, SPACES["discrete"], 32, seed=1)
    learner.add(ExperienceBatch(**{**far_off.__dict__, "log_probs": far_off.log_probs - 1.0}))
    assert learner.update()["clipfrac"] == 1.0  # every ratio is about e > 1 + clip_coef


def test_ppo_anneals_the_learning_rate_by_samples_and_stops_early_on_kl(model_files: dict[str, Path]) -> None:
    ppo = PPOConfig(**{**PPO.__dict__, "anneal_lr_samples": 128, "target_kl": 1e-12, "update_epochs": 4})
    learner = learner_for(model_files, "discrete-export", ppo=ppo)
    rates = []
    for seed in range(3):
        feed(learner, "discrete-export", 64, seed=seed)
        stats = learner.update()
        rates.append(stats["learning_rate"])
        assert stats["epochs"] == 1
    assert rates == [PPO.learning_rate, PPO.learning_rate / 2, 0.0]


def test_value_loss_and_explained_variance_match_their_definitions() -> None:
    new, old, ret = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 0.0, 2.5]), torch.tensor([2.0, 1.0, 0.0])
    assert value_loss(new, old, ret, None).item() == pytest.approx(0.5 * (1 + 1 + 9) / 3)
    # clipped to old ± 0.2: 0.2, 0.0, 2.7 → squared errors 3.24, 1, 7.29; the max per row: 3.24, 1, 9
    assert value_loss(new, old, ret, 0.2).item() == pytest.approx(0.5 * (3.24 + 1 + 9) / 3)
    assert explained_variance(ret, ret) == 1.0 and explained_variance(new, torch.ones(3)) == 0.0
    assert explained_variance(torch.zeros(3), ret) == pytest.approx(0.0)


def test_dqn_trains_on_due_steps_publishes_every_few_and_syncs_the_target(model_files: dict[str, Path]) -> None:
    learner = learner_for(model_files, "discrete-torchscript", algorithm="dqn")
    assert isinstance(learner, DQNLearner)
    before = snapshot(learner.actor)
    feed(learner, "discrete-torchscript", 32, seed=1)
    assert not learner.ready()  # learning starts after 32 transitions
    feed(learner, "discrete-torchscript", 4, seed=2)
    assert learner.ready()  # the first gradient step is published at once
    assert learner.update()["gradient_steps"] == 1
    feed(learner, "discrete-torchscript", 8, seed=3)
    assert not learner.ready()  # 2 steps due, 4 per publication
    feed(learner, "discrete-torchscript", 28, seed=4)
    stats = learner.update()
    assert stats["gradient_steps"] == 9 and stats["samples"] == 72
    assert_all_changed(before, learner.actor)
    # the target update due at 64 transitions comes after the update's gradient steps: a copy
    assert all(torch.equal(v, learner.target.state_dict()[k]) for k, v in learner.actor.state_dict().items())
    assert all(math.isfinite(v) for v in stats.values())


def test_dqn_decays_epsilon_linearly_by_samples(model_files: dict[str, Path]) -> None:
    learner = learner_for(model_files, "discrete-export", algorithm="dqn")
    assert learner.exploration() == {"epsilon": 1.0}
    feed(learner, "discrete-export", 50, seed=1)
    assert learner.exploration()["epsilon"] == pytest.approx(0.55)
    feed(learner, "discrete-export", 100, seed=2)
    assert learner.exploration() == {"epsilon": 0.1}


def test_dqn_state_round_trip_continues_identically(model_files: dict[str, Path], tmp_path: Path) -> None:
    a = learner_for(model_files, "discrete-export", algorithm="dqn")
    feed(a, "discrete-export", 130, seed=1)  # more than the replay capacity: the ring has wrapped
    a.update()
    b = learner_for(model_files, "discrete-export", seed=5, algorithm="dqn")
    b.load_state_dict(round_trip(a, tmp_path))
    assert b.exploration() == a.exploration() and len(b.buffer) == len(a.buffer) == 100
    batch = experience(a, SPACES["discrete"], 40, seed=2)
    a.add(batch)
    b.add(batch)
    assert a.update() == b.update()
    for k, v in a.state_dict()["target"].items():
        assert torch.equal(v, b.state_dict()["target"][k])
    assert all(np.array_equal(v, b.actor_weights()[k]) for k, v in a.actor_weights().items())


@pytest.mark.parametrize("name", ["box-export", "tuple-torchscript"])
def test_dqn_refuses_a_space_without_one_q_value_per_action(model_files: dict[str, Path], name: str) -> None:
    kind = MODELS[name][0]
    with pytest.raises(ValueError, match=f"action space is '{kind}'.*ppo"):
        learner_for(model_files, name, algorithm="dqn")


def test_a_checkpoint_of_one_algorithm_does_not_load_into_the_other(model_files: dict[str, Path]) -> None:
    ppo = learner_for(model_files, "discrete-export")
    dqn = learner_for(model_files, "discrete-export", algorithm="dqn")
    with pytest.raises(ValueError, match="'ppo' checkpoint cannot resume a 'dqn' learner"):
        dqn.load_state_dict(ppo.state_dict())


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """Tiny networks: one thread is much faster, and immune to a busy machine's other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cartpole_actor(tmp_path: Path, generator: torch.Generator) -> torch.nn.Module:
    """examples/cartpole's actor (cleanrl's initialisation), exported and loaded as the server does."""
    actor = MLPPolicy(OBS_DIM, [64, 64], nvec=[2])
    for layer in actor.body:
        if isinstance(layer, torch.nn.Linear):
            layer_init(layer, math.sqrt(2), generator)
    layer_init(actor.heads[0], 0.01, generator)
    path = export_module(actor, OBS_DIM, tmp_path / "cartpole.pt", fmt="torchscript")
    return load_module(path.read_bytes(), "torchscript")


def play(envs: list[Any], obs: np.ndarray, actor: torch.nn.Module, steps: int, g: torch.Generator
         ) -> tuple[list[ExperienceBatch], np.ndarray, list[float]]:
    """``steps`` steps of every environment, sampled from ``actor``: one fragment per environment."""
    rows: list[list[tuple[Any, ...]]] = [[] for _ in envs]
    returns = []
    for _ in range(steps):
        with torch.no_grad():
            logp = torch.log_softmax(actor(torch.from_numpy(obs)), dim=-1)
        actions = torch.multinomial(logp.exp(), 1, generator=g)
        chosen = logp.gather(1, actions)[:, 0].numpy()
        next_obs = obs.copy()
        for i, env in enumerate(envs):
            o, r, term, trunc, info = env.step(int(actions[i]))
            rows[i].append((obs[i], o, int(actions[i]), r, term, trunc, chosen[i]))
            if term or trunc:
                returns.append(float(info["episode"]["r"]))
                o, _ = env.reset()
            next_obs[i] = o
        obs = next_obs
    fragments = []
    for i, env_rows in enumerate(rows):
        o, no, a, r, te, tr, lp = map(np.array, zip(*env_rows))
        fragments.append(ExperienceBatch(
            obs=o.astype(np.float32), next_obs=no.astype(np.float32), actions=a[:, None], rewards=r.astype(np.float32),
            terminated=te, truncated=tr, segment_end=te | tr, log_probs=lp.astype(np.float32),
            versions=np.zeros(len(a), dtype=np.int64), client_id=f"env-{i}"))
    return fragments, obs, returns


def test_ppo_learns_cartpole_from_client_fragments(tmp_path: Path, one_torch_thread: None) -> None:
    """12k steps (24 updates of cleanrl's defaults) take the return from random (~22) past 60."""
    gym = pytest.importorskip("gymnasium")
    g = torch.Generator().manual_seed(0)
    actor = cartpole_actor(tmp_path, g)
    learner = make_learner(actor, OBS_DIM, SPACES["discrete"], TrainingSpec(seed=0))
    envs = [gym.wrappers.RecordEpisodeStatistics(gym.make("CartPole-v1")) for _ in range(4)]
    obs = np.stack([env.reset(seed=i)[0] for i, env in enumerate(envs)]).astype(np.float32)
    returns: list[float] = []
    for _ in range(24):
        fragments, obs, finished = play(envs, obs, actor, 128, g)
        returns += finished
        for fragment in fragments:
            learner.add(fragment)
        assert learner.ready()
        learner.update()
    first, last = np.mean(returns[:20]), np.mean(returns[-20:])
    assert first < 35 and last > 60 and last > 2 * first, (first, last)


# --- non-finite updates are refused and rolled back ----------------------------------------------


def with_rewards(batch: ExperienceBatch, rewards: np.ndarray) -> ExperienceBatch:
    return ExperienceBatch(**{**batch.__dict__, "rewards": rewards.astype(np.float32)})


def learner_state(learner: Learner) -> dict[str, Any]:
    """Everything an update may change: weights, optimiser moments, counters (a deep copy)."""
    state = learner.state_dict()
    state.pop("generator")  # shuffling draws go on: not state the update must keep
    return state


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


HUGE = 3e38  # finite in float32; discounted sums and squares of it are not


@pytest.mark.parametrize(("rewards", "reason", "options"), [
    ("all huge", "data", {}),  # GAE's sums of 3e38 overflow: infinite advantages
    ("last huge", "loss", {}),  # finite returns, whose squared value error overflows
    ("one nan", "data", {}),
    ("last huge", "loss", {"normalize_rewards": True}),
])
def test_ppo_refuses_a_non_finite_update_keeps_everything_and_trains_on_the_next_batch(
    model_files: dict[str, Path], rewards: str, reason: str, options: dict[str, Any]
) -> None:
    name = "discrete-export"
    learner = learner_for(model_files, name, ppo=PPOConfig(**{**PPO.__dict__, **options}))
    feed(learner, name, 64, seed=1)
    learner.update()  # Adam has moments now: they must survive the refused update untouched
    before = learner_state(learner)
    batch = experience(learner, SPACES["discrete"], 64, seed=2)
    poisoned = {
        "all huge": np.full(64, HUGE),
        "last huge": np.r_[np.ones(63), HUGE],
        "one nan": np.r_[np.ones(10), np.nan, np.ones(53)],
    }[rewards]
    learner.add(with_rewards(batch, poisoned))
    with pytest.raises(NonFiniteUpdate) as caught:
        learner.update()
    assert caught.value.reason == reason
    after = learner_state(learner)
    after["samples"] -= 64  # the rows were received (and dropped)
    assert_same(before, after)
    assert learner.updates == 1 and len(learner.buffer) == 0 and not learner.ready()
    assert all(p.grad is None for p in learner.params)

    actor, critic = snapshot(learner.actor), snapshot(learner.critic)
    feed(learner, name, 64, seed=3)
    stats = learner.update()
    assert learner.updates == 2 and all(math.isfinite(v) for v in stats.values())
    assert_all_changed(actor, learner.actor)
    assert_all_changed(critic, learner.critic)


def test_dqn_refuses_a_non_finite_update_and_drops_only_the_transitions_that_caused_it(
    model_files: dict[str, Path]
) -> None:
    name = "discrete-export"
    learner = learner_for(model_files, name, algorithm="dqn")
    assert isinstance(learner, DQNLearner)
    feed(learner, name, 48, seed=1)
    learner.update()
    before = learner_state(learner)
    batch = experience(learner, SPACES["discrete"], 16, seed=2)
    learner.add(with_rewards(batch, np.r_[np.ones(12), np.full(4, HUGE)]))
    assert learner.ready()
    with pytest.raises(NonFiniteUpdate, match="non-finite loss in the loss at gradient step"):
        learner.update()
    after = learner_state(learner)
    rewards = learner.buffer.state_dict()["rewards"]
    dropped = 64 - len(rewards)
    assert 1 <= dropped <= 4 and int((rewards == HUGE).sum()) == 4 - dropped  # good rows all stay
    assert_same(before["actor"], after["actor"]) and assert_same(before["target"], after["target"])
    assert_same(before["optimizer"], after["optimizer"])
    assert after["updates"] == before["updates"] and not learner.ready()  # the due steps were skipped

    actor = snapshot(learner.actor)
    skips = 0
    for seed in range(3, 20):  # each refused update drops at least one culprit: a few at most
        feed(learner, name, 16, seed=seed)
        try:
            stats = learner.update()
        except NonFiniteUpdate:
            skips += 1
            continue
        assert all(math.isfinite(v) for v in stats.values())
        break
    assert skips < 4 and learner.updates == 2
    assert_all_changed(actor, learner.actor)


def test_dqn_culprits_are_the_errors_whose_square_overflows_the_mean_or_else_the_largest() -> None:
    errors = torch.tensor([1.0, math.nan, -math.inf, 2e19, 1e18, 3.0])
    assert culprits(errors).tolist() == [False, True, True, True, False, False]
    # no single square overflows, but their mean over 4 does: each reaches max / 4
    assert culprits(torch.tensor([1.0e19, 1.0e19, -1.0e19, 1.0])).tolist() == [True, True, True, False]
    assert culprits(torch.tensor([1.0, -5.0, 2.0])).tolist() == [False, True, False]


def masked_experience(learner: Learner, n: int, seed: int) -> ExperienceBatch:
    """Tuple-space steps acted under random masks, their log-probs the masked ones (as served)."""
    rng = np.random.default_rng(seed)
    space = SPACES["tuple"]
    assert isinstance(space, TupleSpace)
    masks = rng.random((n + 1, 5)) < 0.6
    masks[:, [0, 3]] = True  # one allowed action per component
    obs = rng.normal(size=(n + 1, OBS_DIM)).astype(np.float32)
    heads = [h.numpy() for h in as_heads(learner.actor(torch.from_numpy(obs[:-1])))]
    answers = space.sample(heads, rng, masks[:-1])
    batch = experience(learner, space, n, seed)
    return ExperienceBatch(**{**batch.__dict__, "obs": obs[:-1], "next_obs": obs[1:],
                              "actions": np.array([a.action for a in answers], dtype=np.int64),
                              "log_probs": np.array([a.log_prob for a in answers], dtype=np.float32),
                              "masks": masks[:-1], "next_masks": masks[1:]})


def test_ppo_evaluates_masked_logits_so_served_masked_log_probs_give_ratio_one(model_files: dict[str, Path]) -> None:
    ppo = PPOConfig(rollout_samples=32, num_minibatches=1, update_epochs=1, critic_hidden=[16])
    learner = learner_for(model_files, "tuple-torchscript", ppo=ppo)
    with torch.no_grad():
        batch = masked_experience(learner, 32, seed=4)
    learner.add(batch)
    stats = learner.update()  # first step at unchanged weights: the ratio is 1 for every row
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6) and stats["clipfrac"] == 0.0
    unmasked = learner_for(model_files, "tuple-torchscript", ppo=ppo)
    unmasked.add(ExperienceBatch(**{**batch.__dict__, "masks": None, "next_masks": None}))
    assert unmasked.update()["approx_kl"] > 1e-3  # without the masks, the served log-probs disagree


def test_dqn_stores_masks_and_targets_the_best_legal_action(model_files: dict[str, Path]) -> None:
    learner = learner_for(model_files, "discrete-export", algorithm="dqn")
    assert isinstance(learner, DQNLearner)
    batch = experience(learner, SPACES["discrete"], 40, seed=2)
    masks = np.tile([[True, False]], (40, 1))
    learner.add(ExperienceBatch(**{**batch.__dict__, "masks": masks, "next_masks": masks}))
    rows = learner.buffer.rows(np.arange(40))
    assert rows["next_masks"].tolist() == masks.tolist()
    assert learner.update()["gradient_steps"] >= 1
