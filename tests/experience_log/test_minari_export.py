"""Logs written by the real writer, exported with Minari's own API and loaded back with
``minari.load_dataset`` (offline: ``MINARI_DATASETS_PATH`` is the test's folder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium.spaces as gs
import numpy as np
import pytest
from minari.serialization import serialize_space

from policy_server.experience_log.minari_export import export_minari
from policy_server.experience_log.records import Asker, Decisions, Outcomes
from policy_server.experience_log.writer import ExperienceLog
from policy_server.policies.spaces import ActionSample
from policy_server.schema.experience_log import ExperienceLogSpec


@pytest.fixture(autouse=True)
def local_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))


def write_episodes(folder: Path, rows: np.ndarray, obs_space: gs.Space[Any], actions: gs.Space[Any],
                   ends: list[int]) -> list[float]:
    """One decision per row of ``rows`` but the last (model inputs) in stream ``e``, each rewarded by
    ref with the next row as the observation after it; an episode ends (terminated) after each step
    in ``ends``. Returns the rewards."""
    doc = {"policy": "p", "observation_space": serialize_space(obs_space, to_string=False),
           "action_space": serialize_space(actions, to_string=False),
           "model_input": {"shape": list(rows.shape[1:]), "dtype": rows.dtype.str}}
    log = ExperienceLog(ExperienceLogSpec(path=folder, flush_s=0.01), "p", doc)
    log.open()
    rewards = []
    for t, row in enumerate(rows[:-1]):
        action = actions.sample().tolist()
        log.submit(Decisions(10 * t, "p", Asker(f"r{t}", "/predict", "e"), row[None],
                             [ActionSample(action, -1.0, None)], 0, "stable"))
        rewards.append(float(t) / 4)
        log.submit(Outcomes(10 * t + 5, "p", Asker(f"o{t}", "/train/experience"), [f"r{t}"], [rewards[-1]],
                            [t in ends], [False], rows[t + 1][None]))
    log.close()
    return rewards


def test_image_episodes_come_back_exact(tmp_path: Path) -> None:
    import minari

    image = gs.Box(0, 255, (6, 6, 1), np.uint8)
    rows = np.random.default_rng(0).integers(0, 256, (9, 6, 6, 1), dtype=np.uint8)
    rewards = write_episodes(tmp_path / "log", rows, image, gs.Discrete(3), ends=[3, 7])
    report = export_minari(tmp_path / "log", "served/image-v0")
    assert report == {"dataset_id": "served/image-v0", "episodes": 2, "steps": 8, "left_out_runs": 0}
    first, second = minari.load_dataset("served/image-v0").iterate_episodes()
    assert first.observations.dtype == np.uint8 and np.array_equal(first.observations, rows[:5])
    assert np.array_equal(second.observations, rows[4:9]) and second.terminations.tolist() == [0, 0, 0, 1]
    assert first.rewards.tolist() == rewards[:4] and first.terminations.tolist() == [0, 0, 0, 1]


def test_a_dict_space_is_unflattened_from_the_model_input(tmp_path: Path) -> None:
    import minari

    space = gs.Dict({"gear": gs.Discrete(3), "speed": gs.Box(-1, 1, (2,), np.float32)})
    space.seed(0)
    samples = [space.sample() for _ in range(5)]
    rows = np.stack([gs.flatten(space, s) for s in samples]).astype(np.float32)
    write_episodes(tmp_path / "log", rows, space, gs.MultiDiscrete([2, 3]), ends=[3])
    export_minari(tmp_path / "log", "served/dict-v0")
    (episode,) = minari.load_dataset("served/dict-v0").iterate_episodes()
    assert episode.observations["gear"].tolist() == [s["gear"] for s in samples]
    assert np.array_equal(episode.observations["speed"], np.stack([s["speed"] for s in samples]))
    assert episode.actions.shape == (4, 2) and episode.actions.dtype == np.int64


def test_nothing_to_export_and_an_unnamed_policy_are_refused(tmp_path: Path) -> None:
    rows = np.zeros((4, 2), dtype=np.float32)
    write_episodes(tmp_path / "log", rows, gs.Box(-1, 1, (2,)), gs.Discrete(2), ends=[])
    with pytest.raises(ValueError, match="no episode of policy 'p' has ended yet"):
        export_minari(tmp_path / "log", "served/none-v0")
    (tmp_path / "log" / "q.spaces.json").write_text(json.dumps({"policy": "q"}))
    with pytest.raises(ValueError, match=r"logs the policies \['p', 'q'\]: name one"):
        export_minari(tmp_path / "log", "served/none-v0")
    with pytest.raises(FileNotFoundError, match="no r.spaces.json"):
        export_minari(tmp_path / "log", "served/none-v0", policy="r")
