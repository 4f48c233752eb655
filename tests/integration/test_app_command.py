"""The README's run command, as a user types it: `uvicorn app:app` with Ray started inside."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import yaml
from conftest import API_KEY, LPOC_OBS, multi_policy_schema
from support import wait_ready, wait_until
from uvicorn.config import LOGGING_CONFIG

from policy_server.net import free_port

ROOT = Path(__file__).resolve().parents[2]
BODY = {
    "id": 0, "coordinates_0": 3, "coordinates_1": 3,
    "has_up_neighbour": True, "is_up_free": True, "has_right_neighbour": True, "is_right_free": True,
    "has_down_neighbour": True, "is_down_free": False, "has_left_neighbour": True, "is_left_free": True,
}


def test_uvicorn_app_serves_the_bundled_example_with_metrics_and_stops_cleanly(tmp_path: Path) -> None:
    port, ray_metrics, gateway_metrics = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLICY_SERVER_", "RAY_ADDRESS", "SCHEMA_PATH"))}
    env |= {
        "POLICY_SERVER_RAY_METRICS_PORT": str(ray_metrics),
        "POLICY_SERVER_GATEWAY_METRICS_PORT": str(gateway_metrics),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port)],
            cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=sink,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log)
        answer = httpx.post(f"{url}/predict", json=BODY, headers={"access-token": "1234567asdfgh"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["action_name"] in {"up", "right", "down", "left"}
        assert httpx.get(f"{url}/docs").status_code == 200
        assert httpx.get(f"{url}/redoc").status_code == 200
        ours = httpx.get(f"http://127.0.0.1:{gateway_metrics}/metrics").text
        assert 'policy_server_requests_total{endpoint="/predict",policy="default",status="200"} 1.0' in ours
        wait_until(lambda: "ray_serve_" in httpx.get(f"http://127.0.0.1:{ray_metrics}/metrics", timeout=10).text,
                   90, 2, "Serve's metrics never appeared on Ray's export port")
        # SIGTERM to the server process alone, as docker stop and Kubernetes send it
        os.kill(proc.pid, signal.SIGTERM)
        # uvicorn re-raises the signal once its graceful shutdown is done: -SIGTERM, not a crash
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()[-3000:]
        assert "Application shutdown complete" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_no_log_line_holds_the_api_key_with_workers_and_a_log_config(model_dir: Path, tmp_path: Path) -> None:
    """`uvicorn app:app --workers 2 --log-config ...` (uvicorn configures logging in every worker
    before it imports the app): keys sent as query parameter, cookie, header or bearer token, right
    or wrong, on answers 200, 403, 404 and 500, never reach stdout or stderr."""
    schema = tmp_path / "schema.yaml"
    schema.write_text(yaml.safe_dump(multi_policy_schema(model_dir), sort_keys=False))
    log_config = tmp_path / "logging.json"
    log_config.write_text(json.dumps(LOGGING_CONFIG))
    wrong = "wrong-key-987"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLICY_SERVER_", "RAY_ADDRESS", "SCHEMA_PATH"))}
    env |= {"SCHEMA_PATH": str(schema), "POLICY_SERVER_BACKEND": "local", "POLICY_SERVER_GATEWAY_METRICS_PORT": "0"}
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port), "--workers", "2",
             "--log-config", str(log_config)],
            cwd=ROOT, env=env, start_new_session=True, stdout=stdout, stderr=stderr,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, err)
        sent = [
            httpx.post(f"{url}/predict?access-token={API_KEY}", json=LPOC_OBS),
            httpx.post(f"{url}/predict/?access%2Dtoken={API_KEY}&x=1", json=LPOC_OBS),
            httpx.post(f"{url}/predict_raw?access-token={wrong}", json={"obs": [0.0] * 11}),
            httpx.post(f"{url}/policies/faulty/predict?access-token={API_KEY}", json={"a": 5000.0, "b": 0.0}),
            httpx.get(f"{url}/nope?access-token={API_KEY}"),
            httpx.post(f"{url}/predict", json=LPOC_OBS, headers={"access-token": API_KEY}),
            httpx.post(f"{url}/predict", json=LPOC_OBS, headers={"authorization": f"Bearer {API_KEY}",
                                                                  "cookie": f"access-token={API_KEY}"}),
        ]
        assert [r.status_code for r in sent] == [200, 200, 403, 500, 404, 200, 200], [r.text for r in sent]
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    logs = out.read_text() + err.read_text()
    assert logs.count('"POST /predict') >= 4, logs[-3000:]  # the access log was written...
    assert "/predict?access-token=*** HTTP/1.1" in logs and "/nope?access-token=***" in logs
    assert "policies/faulty/predict" in logs  # ...and so was the model error
    assert API_KEY not in logs and wrong not in logs, logs[-3000:]


def test_a_start_up_failure_exits_at_once_and_leaves_nothing_running(tmp_path: Path) -> None:
    """The gateway's metrics port is taken: `uvicorn app:app` says so and exits non-zero, before
    starting Ray (it used to start Ray first, then fail and hang with Ray still up)."""
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLICY_SERVER_", "RAY_ADDRESS", "SCHEMA_PATH"))}
    env |= {"POLICY_SERVER_GATEWAY_METRICS_PORT": str(taken.getsockname()[1]), "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "uvicorn", "app:app", "--port", str(free_port())],
            check=False, cwd=ROOT, env=env, capture_output=True, timeout=120,
        )
    finally:
        taken.close()
    log = done.stderr.decode(errors="replace")
    assert done.returncode != 0
    assert "Address already in use" in log and "Application startup failed" in log
    assert "Started a local Ray instance" not in log


def test_a_schema_that_cannot_be_served_is_refused_with_its_reason_and_no_traceback(tmp_path: Path) -> None:
    """`uvicorn app:app` and `generate.py check` on a schema the server refuses: the reason on one
    line of stderr, exit status 1, no traceback."""
    (tmp_path / "schema.yaml").write_text("observations:\n  2001-01-01:\n    type: int\n")
    reason = "policy-server: invalid schema: observations: the name 2001-01-01 is read by YAML as a date"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLICY_SERVER_", "RAY_ADDRESS"))}
    commands = [
        [sys.executable, "-m", "uvicorn", "app:app", "--port", str(free_port())],
        [sys.executable, "generate.py", "check", str(tmp_path / "schema.yaml")],
    ]
    for command in commands:
        done = subprocess.run(
            command, check=False, cwd=ROOT, env=env | {"SCHEMA_PATH": str(tmp_path / "schema.yaml")},
            capture_output=True,
            text=True, timeout=120,
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith(reason) and "Traceback" not in done.stderr, done.stderr


def test_a_schema_asking_more_than_the_cluster_has_is_refused_in_one_line(
    ray_session: int, model_dir: Path, tmp_path: Path
) -> None:
    """Ray Serve would wait without end for a replica no node can place (the fresh user's LLM example
    with a `training:` section hung on 2 cores): `uvicorn app:app` refuses it at once instead,
    naming the field, and leaves the cluster it joined as it was: nothing deployed, its Serve still
    running (a gateway that joined a cluster used to shut the cluster's Serve down when it stopped)."""
    import ray
    from ray import serve

    raw = yaml.safe_load((ROOT / "examples/lpoc/schema.yaml").read_text())
    raw["parameters"] |= {"model": str(model_dir / "lpoc.pt"), "resources": {"num_cpus": 4096}}
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLICY_SERVER_", "RAY_ADDRESS", "SCHEMA_PATH"))}
    env |= {"SCHEMA_PATH": str(tmp_path / "schema.yaml"), "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
            "POLICY_SERVER_GATEWAY_METRICS_PORT": "0", "POLICY_SERVER_SERVE_APP_PREFIX": "refused"}
    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app:app", "--port", str(free_port())],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    refusal = [line for line in done.stderr.splitlines() if "policy-server:" in line]
    assert len(refusal) == 1, done.stderr
    assert "policy-server: the schema asks Ray for 4096 CPUs and the cluster has 8: " in refusal[0]
    assert "parameters.resources.num_cpus: 4096 (policy default's replicas)" in refusal[0]
    assert not [name for name in serve.status().applications if name.startswith("refused")]


def test_an_llm_folder_vllm_refuses_is_refused_on_one_line_without_vllms_import_noise(
    llm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """`uvicorn app:app` and `generate.py check` on an `engine: vllm` folder that vLLM cannot serve
    (an architecture it does not implement): the reason alone on stderr, one line (vLLM's import
    logs "Triton is installed, but doesn't include CPU backend" on a CPU machine: silenced)."""
    folder = Path(shutil.copytree(llm_dirs["policy"], tmp_path / "policy"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"architectures": ["NoSuchForCausalLM"]}))
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump({"llm": {"policy": {"path": str(folder), "engine": "vllm"}}}))
    reason = (f"policy-server: llm.policy.path: {folder}: vLLM implements none of its "
              "architectures ['NoSuchForCausalLM'] (or set `engine: transformers`)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLICY_SERVER_", "RAY_ADDRESS"))}
    commands = [
        [sys.executable, "-m", "uvicorn", "app:app", "--port", str(free_port())],
        [sys.executable, "generate.py", "check", str(tmp_path / "schema.yaml")],
    ]
    for command in commands:
        done = subprocess.run(command, check=False, cwd=ROOT, env=env | {"SCHEMA_PATH": str(tmp_path / "schema.yaml")},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, done.stderr
        assert done.stderr.splitlines() == [reason], done.stderr
