"""The trainer without Ray or HTTP: staleness, states, updates and publication, checkpoints, resume."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support import wait_until

from policy_server.errors import InvalidRequest, NotFound, StaleSamples, TrainingNotRunning
from policy_server.export import MLPPolicy, export_module
from policy_server.policies.spaces import DiscreteSpace
from policy_server.policies.torch_policy import load_module
from policy_server.schema.training import PPOConfig, TrainingSpec
from policy_server.training.experience import ExperienceBatch
from policy_server.training.trainer import Trainer, TrainerMetrics, build_trainer

OBS_DIM, N_ACTIONS = 4, 2


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    torch.manual_seed(0)
    path = export_module(MLPPolicy(OBS_DIM, [8], nvec=[N_ACTIONS]), OBS_DIM, tmp_path_factory.mktemp("m") / "p.pt2")
    return path.read_bytes()


class Published:
    """Collects what the trainer publishes (the serving side's `set_weights`)."""

    def __init__(self) -> None:
        self.versions: list[int] = []
        self.weights: list[dict[str, np.ndarray]] = []
        self.fail = False

    def __call__(self, weights: dict[str, np.ndarray], version: int) -> None:
        if self.fail:
            raise ConnectionError("replicas restarting")
        self.versions.append(version)
        self.weights.append(weights)


def make_trainer(model_bytes: bytes, tmp_path: Path, published: Published, **spec: Any) -> Trainer:
    options = {"ppo": PPOConfig(rollout_samples=32, num_minibatches=2, update_epochs=1), "seed": 0,
               "checkpoint_dir": tmp_path, "checkpoint_every": 2, "return_window": 2} | spec
    training = TrainingSpec(**options)
    return build_trainer("p", training, load_module(model_bytes, "export"), DiscreteSpace(N_ACTIONS), OBS_DIM, published)


@pytest.fixture()
def published() -> Published:
    return Published()


@pytest.fixture()
def trainer(model_bytes: bytes, tmp_path: Path, published: Published) -> Iterator[Trainer]:
    t = make_trainer(model_bytes, tmp_path, published)
    t.open()
    yield t
    t.close()


def steps(n: int, version: int = 0, client: str = "c1", reward: float = 1.0, episode_every: int = 8) -> ExperienceBatch:
    rng = np.random.default_rng(n + version)
    ends = (np.arange(n) % episode_every) == episode_every - 1
    return ExperienceBatch(
        obs=rng.standard_normal((n, OBS_DIM)).astype(np.float32),
        next_obs=rng.standard_normal((n, OBS_DIM)).astype(np.float32),
        actions=rng.integers(0, N_ACTIONS, (n, 1)),
        rewards=np.full(n, reward, dtype=np.float32),
        terminated=ends,
        truncated=np.zeros(n, dtype=bool),
        segment_end=ends | (np.arange(n) == n - 1),
        log_probs=np.full(n, np.log(0.5), dtype=np.float32),
        versions=np.full(n, version, dtype=np.int64),
        client_id=client,
    )


def test_enough_samples_update_the_policy_and_publish_the_next_version(trainer: Trainer, published: Published) -> None:
    assert trainer.submit(steps(32))["accepted"] == 32
    wait_until(lambda: trainer.status()["model_version"] == 1)
    assert published.versions == [1]
    status = trainer.status()
    assert status["updates"] == 1 and status["samples_accepted"] == 32 and "pg_loss" in status["last_update"]


def test_samples_older_than_the_allowed_delay_are_rejected_and_counted(trainer: Trainer) -> None:
    trainer.submit(steps(32))
    wait_until(lambda: trainer.status()["model_version"] == 1)
    trainer.submit(steps(32, version=1))
    wait_until(lambda: trainer.status()["model_version"] == 2)
    with pytest.raises(StaleSamples, match="older than 1"):  # PPO accepts one version of delay
        trainer.submit(steps(4, version=0))
    mixed = ExperienceBatch.concat([steps(3, version=0), steps(5, version=2)])
    answer = trainer.submit(mixed)
    assert (answer["accepted"], answer["rejected"]) == (5, 3)
    assert trainer.status()["samples_rejected"]["stale"] == 7


def test_a_version_from_the_future_is_invalid(trainer: Trainer) -> None:
    with pytest.raises(InvalidRequest, match="newer than the current version 0"):
        trainer.submit(steps(4, version=3))


def test_a_paused_trainer_refuses_experience_but_still_counts_returns(trainer: Trainer) -> None:
    trainer.pause()
    with pytest.raises(TrainingNotRunning):
        trainer.submit(steps(8))
    assert trainer.status()["episodes"] == 1 and trainer.status()["samples_accepted"] == 0
    trainer.start()
    assert trainer.submit(steps(8))["accepted"] == 8


def test_checkpoints_every_n_updates_best_and_final(trainer: Trainer, tmp_path: Path) -> None:
    for version in range(2):
        trainer.submit(steps(32, version=version, reward=float(version + 1)))
        wait_until(lambda v=version: trainer.status()["model_version"] == v + 1)
    wait_until(lambda: trainer.status()["last_checkpoint"] is not None)
    trainer.stop()
    names = {c["name"] for c in trainer.checkpoints()["checkpoints"]}
    assert {"update-00000002", "best", "final"} <= names
    assert trainer.status()["state"] == "stopped"


def test_resume_restores_weights_counters_and_continues_the_version(model_bytes: bytes, tmp_path: Path) -> None:
    first_published = Published()
    first = make_trainer(model_bytes, tmp_path, first_published)
    first.open()
    first.submit(steps(32))
    wait_until(lambda: first.status()["model_version"] == 1)
    saved = first.save()
    weights = first.learner.actor_weights()
    first.close()

    published = Published()
    second = make_trainer(model_bytes, tmp_path, published, resume=True)
    second.open()
    try:
        status = second.status()
        assert status["updates"] == 1 and status["model_version"] == 1 and status["last_checkpoint"] == saved["checkpoint"]
        assert published.versions == [1]
        for name, value in second.learner.actor_weights().items():
            np.testing.assert_array_equal(value, weights[name])
        with pytest.raises(NotFound):
            second.resume("no-such-checkpoint")
    finally:
        second.close()


def test_a_failed_publication_is_reported_and_retried(trainer: Trainer, published: Published) -> None:
    published.fail = True
    trainer.submit(steps(32))
    wait_until(lambda: trainer.status()["last_error"] is not None)
    assert "publishing version 1 failed" in trainer.status()["last_error"]
    published.fail = False
    wait_until(lambda: published.versions == [1])


def test_registration_answers_the_version_and_counts_active_clients(trainer: Trainer) -> None:
    answer = trainer.register("robot-7", {"env": "CartPole-v1"})
    assert answer["client_id"] == "robot-7" and answer["model_version"] == 0 and answer["state"] == "running"
    assert trainer.status()["active_clients"] == 1


class Skips(TrainerMetrics):
    """Records the reasons of skipped updates, as the Ray metrics would count them."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def skipped(self, reason: str) -> None:
        self.reasons.append(reason)


@pytest.mark.parametrize(("reward", "reason"), [(3e38, "data"), (float("nan"), "data")])
def test_a_non_finite_update_is_skipped_counted_and_never_published_or_saved(
    model_bytes: bytes, tmp_path: Path, published: Published, reward: float, reason: str
) -> None:
    skips = Skips()
    t = make_trainer(model_bytes, tmp_path, published)
    t.metrics = skips
    t.open()
    try:
        initial = t.learner.actor_weights()
        t.submit(steps(32, reward=reward))  # 3e38 is valid float32: only its sums overflow
        wait_until(lambda: t.status()["skipped_updates"] == 1)
        status = t.status()
        assert status["model_version"] == 0 and status["updates"] == 0 and published.versions == []
        assert status["last_error"].startswith("update skipped, model version 0 kept: non-finite")
        assert skips.reasons == [reason] and status["state"] == "running"
        for name, value in t.learner.actor_weights().items():
            np.testing.assert_array_equal(value, initial[name])
        for entry in t.checkpoints()["checkpoints"]:  # "best" may be written: with the kept weights
            saved = t.store.load(entry["name"])["learner"]["actor"]
            assert all(torch.equal(v, torch.as_tensor(initial[k])) for k, v in saved.items())

        t.submit(steps(32, reward=1.0))
        wait_until(lambda: t.status()["model_version"] == 1)
        assert published.versions == [1] and t.status()["updates"] == 1
        assert all(np.isfinite(w).all() for w in published.weights[0].values())
        assert any(not np.array_equal(published.weights[0][k], initial[k]) for k in initial)
    finally:
        t.close()


def test_a_checkpoint_with_non_finite_weights_is_not_resumed(trainer: Trainer, published: Published) -> None:
    trainer.save()
    name = trainer.store.latest()
    assert name is not None
    state = trainer.store.load(name)
    first = next(iter(state["learner"]["actor"]))
    state["learner"]["actor"][first].view(-1)[0] = float("nan")
    trainer.store.save("poisoned", state)
    with pytest.raises(InvalidRequest, match=rf"checkpoint 'poisoned' holds non-finite weights \['{first}'\]"):
        trainer.resume("poisoned")
    assert trainer.status()["model_version"] == 0 and published.versions == []
    assert all(np.isfinite(w).all() for w in trainer.learner.actor_weights().values())


def test_a_checkpoints_weights_are_handed_out_without_changing_the_trainer(trainer: Trainer, published: Published) -> None:
    """For a candidate version of the policy (``gateway.policy.candidate``): the checkpoint's actor
    weights and version, checked like a resume's, while the trainer keeps its own."""
    trainer.submit(steps(32))
    wait_until(lambda: trainer.status()["model_version"] == 1)
    name = trainer.save()["checkpoint"]
    expected = trainer.learner.actor_weights()
    trainer.submit(steps(32, version=1))
    wait_until(lambda: trainer.status()["model_version"] == 2)
    saved = trainer.checkpoint_weights(name)
    assert saved["checkpoint"] == name and saved["model_version"] == 1
    assert saved["weights"].keys() == expected.keys()
    assert all(np.array_equal(saved["weights"][k], expected[k]) for k in expected)
    assert trainer.status()["model_version"] == 2 and published.versions == [1, 2]
    with pytest.raises(NotFound):
        trainer.checkpoint_weights("no-such")


def test_a_trainer_that_died_gets_back_every_acknowledged_step_from_its_journal(model_bytes: bytes, tmp_path: Path) -> None:
    first = make_trainer(model_bytes, tmp_path, Published())
    first.open()
    first.submit(steps(32))  # one update, then a checkpoint holds these rows
    wait_until(lambda: first.status()["model_version"] == 1)
    first.save()
    first.submit(steps(20, version=1, client="after"))  # acknowledged, in no checkpoint
    # the process dies here: no close(), nothing more written

    published = Published()
    second = build_restarted(model_bytes, tmp_path, published)
    second.open()
    try:
        wait_until(lambda: len(second.learner.buffer) == 20, 10)  # the 20 journaled rows, not the 32 trained ones
        counts = second.status()
        assert (counts["samples_received"], counts["samples_accepted"]) == (52, 52)  # none go backwards
        assert second.submit(steps(12, version=2))["accepted"] == 12  # with them, a full rollout
        wait_until(lambda: second.status()["updates"] == 2, 10)
    finally:
        second.close()


def build_restarted(model_bytes: bytes, tmp_path: Path, published: Published) -> Trainer:
    """A trainer on ``tmp_path`` as Ray restarts one: resuming, and past the served version (1)."""
    options = {"ppo": PPOConfig(rollout_samples=32, num_minibatches=2, update_epochs=1), "seed": 0,
               "checkpoint_dir": tmp_path, "checkpoint_every": 2, "return_window": 2, "resume": True}
    return build_trainer("p", TrainingSpec(**options), load_module(model_bytes, "export"), DiscreteSpace(N_ACTIONS),
                         OBS_DIM, published, version=1)


def test_a_fresh_start_does_not_train_on_an_earlier_runs_journal(model_bytes: bytes, tmp_path: Path) -> None:
    first = make_trainer(model_bytes, tmp_path, Published())
    first.open()
    first.submit(steps(20))
    first.close()
    second = make_trainer(model_bytes, tmp_path, Published())  # resume: false
    second.open()
    try:
        assert second.submit(steps(12))["accepted"] == 12
        assert second.status()["model_version"] == 0 and len(second.learner.buffer) <= 12
        assert second.journal is not None and [s for s, _ in second.journal.since(0)] == [2]
    finally:
        second.close()
