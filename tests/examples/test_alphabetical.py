"""examples/alphabetical: the client's reward, and a short GRPO run against an in-process server."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from conftest import API_KEY
from fastapi.testclient import TestClient

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "alphabetical" / "alphabetical.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("alphabetical", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["alphabetical"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


alphabetical = load_script()
score = alphabetical.score
LETTERS = ["d", "b", "a", "c"]


def test_the_exact_answer_scores_one() -> None:
    assert score("a b c d", LETTERS) == 1.0
    assert score("  a b c d\n", LETTERS) == 1.0


@pytest.mark.parametrize("answer", ["a c b d", "a b c", "a b c d e f", "abcd", "a a b c d", "d c b a"])
def test_a_wrong_answer_scores_below_the_exact_one(answer: str) -> None:
    assert 0.0 <= score(answer, LETTERS) <= alphabetical.PARTIAL_MAX < 1.0


def test_partial_credit_follows_order_coverage_and_length() -> None:
    assert score("a b c", LETTERS) == pytest.approx(0.8 * 1 * 3 / 4)
    assert score("a c b d", LETTERS) == pytest.approx(0.8 * 2 / 3)
    assert score("a b c d", LETTERS) > score("a c b d", LETTERS) > score("d c b a", LETTERS) == 0.0
    assert score("a b c d x y", LETTERS) == pytest.approx(0.8 - 0.02 * 4)


@pytest.mark.parametrize("answer", ["", "zzz", "The answer is unknown.", "d", "d c b a"])
def test_garbage_scores_about_zero(answer: str) -> None:
    assert score(answer, LETTERS) <= 0.05


def test_a_short_run_completes_and_advances_the_model_version(llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    schema = {"parameters": {"api_key": API_KEY},
              "llm": {"policy": {"path": str(llm_dirs["policy"]), "engine": "transformers",
                                 "training": {"save_dir": str(tmp_path / "runs")}}}}
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    settings = Settings(schema_path=tmp_path / "schema.yaml", backend="local", gateway_metrics_port=0)
    args = alphabetical.Args(cycles=4, group_size=4, max_completion_length=8, block=2, json=str(tmp_path / "c.json"))
    with TestClient(build_app(settings), headers={"access-token": API_KEY}) as client:
        curve = alphabetical.run(args, client)
        run_id, cycle = curve.model_version
        assert cycle == 4 and len(curve.rewards) == 4 and len(curve.blocks) == 2
        assert all(0.0 <= r <= 1.0 for r in curve.rewards)
        status = client.get(f"/llm/grpo/runs/{run_id}").json()
        assert status["state"] == "finished" and status["model_version"] == [run_id, 4]
    assert yaml.safe_load((tmp_path / "c.json").read_text())["blocks"] == curve.blocks
