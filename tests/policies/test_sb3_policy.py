"""Stable-Baselines3 files served as SB3 computes: each algorithm trained for a handful of steps,
saved, imported (its schema written from the file), served through the local backend, and its
answers compared with ``model.predict`` and ``policy.get_distribution`` on 100 observations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import make_client, train_sb3
from sb3_contrib import MaskablePPO
from sb3_contrib.common.envs import InvalidActionEnvDiscrete
from stable_baselines3 import A2C, DQN, PPO, SAC

from policy_server.errors import Conflict, SchemaError
from policy_server.policies.importing import schema_of
from policy_server.policies.sb3_policy import SB3Policy, to_sb3
from policy_server.policies.served import resolve_policy
from policy_server.policies.spaces import make_action_space
from policy_server.policies.torch_policy import TorchPolicy
from policy_server.schema.config import BoxSpec, DiscreteSpec, PolicySpec, ResourceSpec

ROWS = 100
CLASSES = {"PPO": PPO, "A2C": A2C, "DQN": DQN, "SAC": SAC, "MaskablePPO": MaskablePPO}


@pytest.fixture(scope="module")
def zips(tmp_path_factory: pytest.TempPathFactory, format_models: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sb3")
    few = {"n_steps": 32, "batch_size": 32, "n_epochs": 1}
    off_policy = {"learning_starts": 10, "batch_size": 16}
    return {
        "PPO": format_models["ppo"],
        "A2C": train_sb3("A2C", "CartPole-v1", root / "a2c.zip", 40, n_steps=8),
        "DQN": train_sb3("DQN", "CartPole-v1", root / "dqn.zip", 40, **off_policy),
        "PPO-box": train_sb3("PPO", "Pendulum-v1", root / "ppo_box.zip", 64, **few),
        "SAC": train_sb3("SAC", "Pendulum-v1", root / "sac.zip", 40, policy_kwargs={"net_arch": [32, 32]}, **off_policy),
        "MaskablePPO": train_sb3("MaskablePPO", InvalidActionEnvDiscrete(dim=10, n_invalid_actions=3),
                                 root / "maskable.zip", 64, **few),
    }


def cart_obs() -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 0.5, (ROWS, 4)).astype(np.float32)


def pendulum_obs() -> np.ndarray:
    theta = np.random.default_rng(1).uniform(-np.pi, np.pi, ROWS)
    speed = np.random.default_rng(2).uniform(-8, 8, ROWS)
    return np.stack([np.cos(theta), np.sin(theta), speed], axis=1).astype(np.float32)


def served(tmp_path: Path, model: Path, obs: np.ndarray, *routes: str) -> list[list[dict[str, Any]]]:
    """The answers of each ``/<route>/batch`` for ``obs``, from a local-backend server of the
    schema that ``import`` writes for ``model``."""
    doc = schema_of(TorchPolicy.from_file(model), model, tmp_path)
    fields = list(doc["observations"])
    rows = [dict(zip(fields, map(float, row))) for row in obs]
    with make_client(tmp_path, doc) as client:
        answers = [client.post(f"/{route}/batch", json={"observations": rows}) for route in routes]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return [a.json()["results"] for a in answers]


def distribution_of(model: Any, obs: np.ndarray, **kwargs: Any) -> Any:
    with torch.no_grad():
        return model.policy.get_distribution(model.policy.obs_to_tensor(obs)[0], **kwargs)


@pytest.mark.parametrize("algorithm", ["PPO", "A2C"])
def test_discrete_actor_critic_answers_are_sb3s(tmp_path: Path, zips: dict[str, Path], algorithm: str) -> None:
    model, obs = CLASSES[algorithm].load(zips[algorithm], device="cpu"), cart_obs()
    deterministic, distribution = served(tmp_path, zips[algorithm], obs, "predict_deterministic", "distribution")
    actions, _ = model.predict(obs, deterministic=True)
    assert [r["action"] for r in deterministic] == actions.tolist()
    dist = distribution_of(model, obs)
    expected = dist.distribution.probs.numpy()
    np.testing.assert_allclose([[r["probabilities"][k] for k in ("0", "1")] for r in distribution], expected, atol=1e-5)
    log_probs = dist.log_prob(torch.as_tensor(actions)).numpy()
    np.testing.assert_allclose([r["log_prob"] for r in deterministic], log_probs, atol=1e-5)


def test_a_gaussian_ppo_answers_sb3s_clipped_mean_and_its_log_prob_inside_the_bounds(
    tmp_path: Path, zips: dict[str, Path]
) -> None:
    model, obs = PPO.load(zips["PPO-box"], device="cpu"), pendulum_obs()
    deterministic, distribution = served(tmp_path, zips["PPO-box"], obs, "predict_deterministic", "distribution")
    actions, _ = model.predict(obs, deterministic=True)
    np.testing.assert_array_equal(np.array([r["action"] for r in deterministic], dtype=np.float32), actions)
    dist = distribution_of(model, obs)
    mean = dist.distribution.loc
    inside = (mean.abs() < 2.0).all(dim=1).numpy()  # the clipped box's density is SB3's there (mass at a bound)
    assert inside.sum() > ROWS // 2
    served_log_probs = np.array([r["log_prob"] for r in deterministic])
    np.testing.assert_allclose(served_log_probs[inside], dist.log_prob(mean).numpy()[inside], atol=1e-5)
    np.testing.assert_allclose([r["mean"] for r in distribution], mean.numpy(), atol=1e-6)
    np.testing.assert_allclose([r["std"] for r in distribution], dist.distribution.scale.numpy(), atol=1e-6)


def test_dqn_answers_its_greedy_action_and_its_epsilon_greedy_distribution(tmp_path: Path, zips: dict[str, Path]) -> None:
    model, obs = DQN.load(zips["DQN"], device="cpu"), cart_obs()
    deterministic, distribution = served(tmp_path, zips["DQN"], obs, "predict_deterministic", "distribution")
    actions, _ = model.predict(obs, deterministic=True)
    assert [r["action"] for r in deterministic] == actions.tolist()
    eps = model.exploration_rate
    assert 0 < eps < 1  # both parts of the mixture are tested
    expected = np.full((ROWS, 2), eps / 2)
    expected[np.arange(ROWS), actions] += 1 - eps  # what predict(deterministic=False) draws from
    np.testing.assert_allclose([[r["probabilities"][k] for k in ("0", "1")] for r in distribution], expected, atol=1e-5)


def test_maskable_ppo_one_hot_observations_and_masks_are_sb3s(zips: dict[str, Path]) -> None:
    model = MaskablePPO.load(zips["MaskablePPO"], device="cpu")
    rng = np.random.default_rng(3)
    index = rng.integers(0, 10, ROWS)
    masks = rng.random((ROWS, 10)) < 0.5
    masks[np.arange(ROWS), rng.integers(0, 10, ROWS)] = True  # at least one legal action per row
    one_hot = np.eye(10, dtype=np.float32)[index]  # the server's model input of a Discrete observation
    np.testing.assert_array_equal(to_sb3(model.observation_space, one_hot), index)
    heads = SB3Policy.from_file(zips["MaskablePPO"]).forward(one_hot).heads
    space = make_action_space(DiscreteSpec(n=10), heads, "parameters.action_space")
    actions, _ = model.predict(index, deterministic=True, action_masks=masks)
    assert [a.action for a in space.mode(heads, mask=masks)] == actions.tolist()
    probs = np.array([[row["probabilities"][str(i)] for i in range(10)] for row in space.distribution(heads, mask=masks)])
    expected = distribution_of(model, index, action_masks=masks).distribution.probs.numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert (probs[~masks] == 0).all()


def test_sac_answers_its_squashed_mean_and_log_prob(tmp_path: Path, zips: dict[str, Path]) -> None:
    model, obs = SAC.load(zips["SAC"], device="cpu"), pendulum_obs()
    mean, log_std = SB3Policy.from_file(zips["SAC"]).forward(obs).heads
    with torch.no_grad():
        their_mean, their_log_std, _ = model.actor.get_action_dist_params(torch.as_tensor(obs))
    np.testing.assert_array_equal(mean, their_mean.numpy())
    np.testing.assert_array_equal(log_std, their_log_std.numpy())
    (deterministic,) = served(tmp_path, zips["SAC"], obs, "predict_deterministic")
    actions, _ = model.predict(obs, deterministic=True)
    # float64 here, float32 in SB3: equal to float32's precision
    np.testing.assert_allclose([r["action"] for r in deterministic], actions, atol=1e-6)
    with torch.no_grad():
        dist = model.actor.action_dist.proba_distribution(their_mean, their_log_std)
        squashed = torch.tanh(their_mean)
        theirs = dist.log_prob(squashed, their_mean).numpy()  # of the action in [-1, 1]
    scale = np.log((model.action_space.high - model.action_space.low) / 2).sum()
    np.testing.assert_allclose([r["log_prob"] for r in deterministic], theirs - scale, atol=1e-5)


def _spec(model: Path, space: Any, **fields: Any) -> PolicySpec:
    return PolicySpec(name="default", observations=None, action_space=space, model=model,
                      resources=ResourceSpec(), **fields)


def test_sac_needs_a_tanh_squashed_box(zips: dict[str, Path]) -> None:
    with pytest.raises(SchemaError, match=r"^parameters\.action_space\.squash: sac\.zip \(SAC\) needs squash: tanh"):
        resolve_policy(_spec(zips["SAC"], BoxSpec()))
    with pytest.raises(SchemaError, match=r"^parameters\.action_space\.squash: ppo_box\.zip \(PPO\) needs no squash"):
        resolve_policy(_spec(zips["PPO-box"], BoxSpec(low=-2.0, high=2.0, squash="tanh")))


def test_a_schema_that_disagrees_with_the_file_is_refused_naming_the_field(zips: dict[str, Path]) -> None:
    with pytest.raises(SchemaError, match=r"^parameters\.action_space\.type: the schema says 'box' but ppo\.zip \(PPO\)"):
        resolve_policy(_spec(zips["PPO"], BoxSpec()))
    with pytest.raises(SchemaError, match=r"^parameters\.action_space\.n: the schema says 3 actions but the model outputs 2"):
        resolve_policy(_spec(zips["PPO"], DiscreteSpec(n=3)))
    with pytest.raises(SchemaError, match=r"^parameters\.action_space\.high: the schema says 1\.0 but ppo_box\.zip"):
        resolve_policy(_spec(zips["PPO-box"], BoxSpec(low=-2.0, high=1.0)))


def test_training_and_weight_updates_are_refused(zips: dict[str, Path], tmp_path: Path) -> None:
    from policy_server.schema.training import TrainingSpec

    with pytest.raises(SchemaError, match=r"^parameters\.training: ppo\.zip \(Stable-Baselines3 \.zip\) has fixed weights"):
        resolve_policy(_spec(zips["PPO"], DiscreteSpec(), training=TrainingSpec(checkpoint_dir=tmp_path)))
    policy = SB3Policy.from_file(zips["PPO"])
    with pytest.raises(Conflict, match="weights are fixed"):
        policy.set_weights(policy.get_weights(), 1)
    assert policy.version == 0


def test_recurrent_ppo_carries_its_lstm_state_as_sb3_does(tmp_path: Path) -> None:
    from sb3_contrib import RecurrentPPO

    from policy_server.policies.importing import import_model
    from policy_server.schema.config import load_schema

    path = train_sb3("RecurrentPPO", "CartPole-v1", tmp_path / "rppo.zip", 32, n_steps=32, batch_size=32,
                     n_epochs=1, policy_kwargs={"lstm_hidden_size": 8})
    model = RecurrentPPO.load(path, device="cpu")
    import_model(path, out=tmp_path / "schema.yaml")
    spec = load_schema(tmp_path / "schema.yaml").policies["default"]
    assert spec.recurrent is not None and {k: list(v) for k, v in spec.recurrent.shapes.items()} == {
        "hidden": [1, 8], "cell": [1, 8]}
    served, policy = resolve_policy(spec)
    layout = served.recurrent
    assert layout is not None
    rng = np.random.default_rng(4)
    state, packed = None, layout.zeros(8)  # eight episodes, five steps, from the zero state
    for _ in range(5):
        obs = rng.normal(0.0, 0.5, (8, 4)).astype(np.float32)
        actions, state = model.predict(obs, state=state, episode_start=np.zeros(8), deterministic=True)
        out = policy.forward(np.concatenate([obs, packed], axis=1))
        heads, new = out.heads[:-2], out.heads[-2:]
        assert [a.action for a in served.space.mode(heads)] == actions.tolist()
        for ours, theirs in zip(new, state):  # SB3's (layers, B, size), ours (B, layers · size)
            np.testing.assert_allclose(ours, theirs.transpose(1, 0, 2).reshape(8, -1), atol=1e-6)
        packed = np.concatenate(new, axis=1)
    with pytest.raises(SchemaError, match=r"^parameters\.recurrent\.state: rppo\.zip \(RecurrentPPO\) carries its LSTM"):
        resolve_policy(spec.model_copy(update={"recurrent": None}))
    # through the gateway, the server keeping the state per episode id
    doc = yaml.safe_load((tmp_path / "schema.yaml").read_text())
    doc["parameters"]["model"] = str(path)
    obs, state = rng.normal(0.0, 0.5, (3, 4)).astype(np.float32), None
    with make_client(tmp_path, doc) as client:
        for row in obs:
            body = dict(zip(doc["observations"], map(float, row))) | {"episode_id": "e1"}
            answer = client.post("/predict_deterministic", json=body)
            assert answer.status_code == 200, answer.text
            action, state = model.predict(row[None], state=state, episode_start=np.zeros(1), deterministic=True)
            assert answer.json()["action"] == int(action[0])
            np.testing.assert_allclose(np.array(answer.json()["state"]["hidden"]), state[0][:, 0], atol=1e-6)
