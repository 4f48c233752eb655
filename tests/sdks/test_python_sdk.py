"""The generated Python SDK installs in a fresh virtual environment (offline) and talks to a
running server: real answers with the api key, a 403 without the right one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from conftest import API_KEY, LPOC_OBS, multi_policy_schema, running_server
from packaging import version

from policy_server.gateway.app import build_app
from policy_server.sdks import ClientSDKs
from policy_server.settings import Settings

SCRIPT = """
import json, sys
import policy_server_client
from policy_server_client import AuthenticatedClient
from policy_server_client.api.lpoc import distribution, predict, predict_raw
from policy_server_client.models import LpocObservation, LpocRawObservation

url, key, obs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = AuthenticatedClient(base_url=url, token=key, prefix="", auth_header_name="access-token")
action = predict.sync(client=client, body=LpocObservation.from_dict(obs))
dist = distribution.sync(client=client, body=LpocObservation.from_dict(obs))
raw = predict_raw.sync(client=client, body=LpocRawObservation(obs=[0.5] * 11))
wrong = AuthenticatedClient(base_url=url, token="wrong-key", prefix="", auth_header_name="access-token")
denied = predict.sync_detailed(client=wrong, body=LpocObservation.from_dict(obs))
print(json.dumps({
    "module": policy_server_client.__file__,
    "action": action.to_dict(),
    "distribution": dist.to_dict(),
    "raw": raw.to_dict(),
    "denied": [denied.status_code, denied.parsed.error.code],
}))
"""


@pytest.fixture(scope="module")
def server_and_sdk(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("python_sdk")
    (root / "schema.yaml").write_text(yaml.safe_dump(multi_policy_schema(model_dir)))
    app = build_app(
        Settings(schema_path=root / "schema.yaml", backend="local", gateway_metrics_port=0, seed=0)
    )
    sdks = ClientSDKs(root / "cache", languages=["python"])
    assert sdks.generate(app.openapi()).languages == {"python": "done"}, sdks.progress().notes
    with running_server(app) as url:
        yield url, sdks.export(root / "clients")


def pip(python: Path | str, *args: str, cwd: Path) -> None:
    """``python -m pip args``, offline and blind to this machine's pip configuration and cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("PIP_")}
    done = subprocess.run(
        [str(python), "-m", "pip", *args, "--isolated", "--no-index", "--no-cache-dir", "--no-deps",
         "--disable-pip-version-check", "-q"],
        check=False, capture_output=True, text=True, timeout=300, env=env, cwd=cwd,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def build_wheel(project: Path, out: Path) -> Path:
    """The SDK's wheel, built by this environment's setuptools (no build isolation: nothing to
    download). A new venv has only ensurepip's setuptools 65 and no ``wheel`` package, which
    cannot build it ("invalid command 'bdist_wheel'"); setuptools >= 70.1 builds wheels itself."""
    have = version.Version(metadata.version("setuptools"))
    assert have >= version.Version("70.1"), f"setuptools {have} cannot build wheels without `wheel`: pip install -r requirements.txt"
    pip(sys.executable, "wheel", "--no-build-isolation", "--wheel-dir", str(out), str(project), cwd=out)
    [wheel] = out.glob("policy_server_client-*.whl")
    return wheel


def venv_python(root: Path) -> Path:
    """A fresh venv, as ``python -m venv`` makes it (its own pip and old setuptools, no ``wheel``),
    that sees this machine's packages (httpx, attrs, dateutil) but not the repo."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(root)], check=True, timeout=300)
    return root / "bin" / "python"


def test_the_python_sdk_installs_offline_and_calls_a_running_server(
    server_and_sdk: tuple[str, Path], tmp_path: Path
) -> None:
    url, clients = server_and_sdk
    (tmp_path / "dist").mkdir()
    wheel = build_wheel(clients / "python", tmp_path / "dist")
    python = venv_python(tmp_path / "venv")
    pip(python, "install", str(wheel), cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run(
        [str(python), "-c", SCRIPT, url, API_KEY, json.dumps(LPOC_OBS)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)

    assert Path(answer["module"]).is_relative_to(tmp_path / "venv")
    action = answer["action"]
    assert (
        action["action"] in range(4)
        and action["action_name"] == ["up", "right", "down", "left"][action["action"]]
    )
    assert 0 < action["probability"] <= 1 and math.isclose(
        math.log(action["probability"]), action["log_prob"], rel_tol=1e-4, abs_tol=1e-6
    )
    probabilities = answer["distribution"]["probabilities"]
    assert set(probabilities) == {"up", "right", "down", "left"}
    assert math.isclose(sum(probabilities.values()), 1.0, rel_tol=1e-5)
    assert answer["raw"]["action"] in range(4)
    assert answer["denied"] == [403, "forbidden"]
