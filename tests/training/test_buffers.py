"""Rollout and replay buffers: order, fragment ends, ring wraparound, state round-trip."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from policy_server.training.buffers import ReplayBuffer, RolloutBuffer
from policy_server.training.experience import ExperienceBatch

OBS_DIM = 3


def steps(start: int, n: int, ends: tuple[int, ...] = ()) -> ExperienceBatch:
    """``n`` steps numbered ``start, start + 1, ...``: obs rows and rewards carry the number."""
    ids = np.arange(start, start + n)
    end = np.zeros(n, dtype=bool)
    end[list(ends)] = True
    return ExperienceBatch(
        obs=np.repeat(ids[:, None], OBS_DIM, axis=1).astype(np.float32),
        next_obs=np.repeat(ids[:, None] + 1, OBS_DIM, axis=1).astype(np.float32),
        actions=(ids % 2)[:, None].astype(np.int64),
        rewards=ids.astype(np.float32),
        terminated=end,
        truncated=np.zeros(n, dtype=bool),
        segment_end=end.copy(),
        log_probs=np.full(n, -0.69, dtype=np.float32),
        versions=np.zeros(n, dtype=np.int64),
    )


def test_rollout_take_keeps_arrival_order_marks_batch_ends_and_empties() -> None:
    buffer = RolloutBuffer()
    buffer.add(steps(0, 4, ends=(1,)))
    buffer.add(steps(100, 0))
    buffer.add(steps(10, 3))
    assert len(buffer) == 7
    batch = buffer.take()
    assert batch.rewards.tolist() == [0, 1, 2, 3, 10, 11, 12]
    assert batch.segment_end.tolist() == [False, True, False, True, False, False, True]
    assert batch.terminated.tolist() == [False, True, False, False, False, False, False]
    assert len(buffer) == 0
    with pytest.raises(ValueError, match="empty"):
        buffer.take()


def stored_rewards(buffer: ReplayBuffer) -> list[float]:
    return buffer.state_dict()["rewards"].tolist()


def test_replay_ring_wraps_around_keeping_the_newest() -> None:
    buffer = ReplayBuffer(capacity=5, obs_dim=OBS_DIM)
    buffer.add(steps(0, 3))
    assert len(buffer) == 3 and stored_rewards(buffer) == [0, 1, 2]
    buffer.add(steps(3, 4))  # wraps: 0 and 1 are overwritten
    assert len(buffer) == 5 and stored_rewards(buffer) == [2, 3, 4, 5, 6]
    assert sorted(buffer.rewards.tolist()) == [2, 3, 4, 5, 6]
    buffer.add(steps(7, 12))  # more than the capacity at once
    assert stored_rewards(buffer) == [14, 15, 16, 17, 18]


def test_replay_samples_whole_transitions() -> None:
    buffer = ReplayBuffer(capacity=8, obs_dim=OBS_DIM)
    buffer.add(steps(0, 6, ends=(5,)))
    data = buffer.sample(64, torch.Generator().manual_seed(0))
    assert data["obs"].shape == data["next_obs"].shape == (64, OBS_DIM)
    assert data["actions"].shape == (64, 1) and data["actions"].dtype == torch.int64
    # every row is one stored transition: obs, next obs, action, reward and flag agree
    ids = data["rewards"]
    assert torch.equal(data["obs"][:, 0], ids) and torch.equal(data["next_obs"][:, 0], ids + 1)
    assert torch.equal(data["actions"][:, 0], ids.long() % 2)
    assert torch.equal(data["terminated"], (ids == 5).float())
    assert set(ids.tolist()) <= set(range(6)) and len(set(ids.tolist())) > 3


def test_replay_sampling_follows_the_generator() -> None:
    buffer = ReplayBuffer(capacity=50, obs_dim=OBS_DIM)
    buffer.add(steps(0, 50))
    a, b = (buffer.sample(16, torch.Generator().manual_seed(7))["rewards"] for _ in range(2))
    assert torch.equal(a, b)


def test_replay_state_round_trips_through_a_weights_only_load() -> None:
    buffer = ReplayBuffer(capacity=5, obs_dim=OBS_DIM)
    buffer.add(steps(0, 7, ends=(4,)))
    saved = io.BytesIO()
    torch.save(buffer.state_dict(), saved)
    saved.seek(0)
    restored = ReplayBuffer(capacity=5, obs_dim=OBS_DIM)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    for name, value in buffer.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    restored.add(steps(7, 1))
    buffer.add(steps(7, 1))  # both continue alike
    assert stored_rewards(restored) == stored_rewards(buffer) == [3, 4, 5, 6, 7]


def test_replay_state_loads_into_a_smaller_buffer_keeping_the_newest() -> None:
    buffer = ReplayBuffer(capacity=6, obs_dim=OBS_DIM)
    buffer.add(steps(0, 6))
    smaller = ReplayBuffer(capacity=4, obs_dim=OBS_DIM)
    smaller.load_state_dict(buffer.state_dict())
    assert stored_rewards(smaller) == [2, 3, 4, 5]
