"""``examples/cartpole/train.py`` trains a fresh policy through a real Ray Serve server.

The server comes from the test fixtures (one Ray per session); the script joins it with
``--server``, runs two rollout client processes, and stops at a modest target so that the test
takes well under a minute of training on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from conftest import running_server

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "cartpole" / "train.py"
API_KEY = "cartpole-train-key"
TARGET = 150.0


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cartpole_train", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cartpole_train"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(ray_session: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh CartPole policy with the script's PPO training section, on Ray Serve."""
    train = load_script()
    workdir = tmp_path_factory.mktemp("cartpole-train")
    schema = train.write_fresh_policy(train.Args(api_key=API_KEY, workdir=str(workdir)), workdir)
    settings = Settings(schema_path=schema, gateway_metrics_port=0, serve_app_prefix="it-cartpole-train")
    with running_server(build_app(settings)) as url:
        yield url


def test_train_py_raises_the_return_through_the_server(server: str, tmp_path: Path) -> None:
    auth = {"access-token": API_KEY}
    before = httpx.get(f"{server}/train/status", headers=auth).json()
    assert before["state"] == "running" and before["model_version"] == 0 and before["episodes"] == 0

    out = tmp_path / "summary.json"
    cmd = [sys.executable, str(SCRIPT), "--server", server, "--api-key", API_KEY, "--clients", "2",
           "--target-return", str(TARGET), "--max-steps", "200000", "--no-keep-serving", "--json", str(out)]
    result = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary: dict[str, Any] = json.loads(out.read_text())
    assert summary["solved"] and summary["mean_return"] >= TARGET, summary
    after = httpx.get(f"{server}/train/status", headers=auth).json()
    # a random policy's episodes last about 20 steps: the return clearly rose
    assert min(after["recent_returns"]) > 0 and after["mean_return"] >= 0.8 * TARGET, after["recent_returns"]
    assert after["model_version"] >= summary["model_version"] >= 10
    assert set(after["clients"]) == {"cartpole-0", "cartpole-1"}
    assert after["state"] == "stopped" and after["last_checkpoint"] == "final"
    assert summary["samples_rejected"]["malformed"] == 0

    # the server keeps serving the trained policy, at the trained version
    answer = httpx.post(f"{server}/predict_raw", json={"obs": [0.0, 0.0, 0.02, 0.0]}, headers=auth).json()
    assert answer["model_version"] == after["model_version"]
