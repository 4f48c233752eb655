"""`uvicorn app:app` with RAY_ADDRESS joins an existing cluster (`ray start --head`) and serves."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import API_KEY, LPOC_OBS, multi_policy_schema
from support import wait_until

from policy_server.net import free_port

ROOT = Path(__file__).resolve().parents[2]
# A throw-away test cluster: no usage stats, and no token auth (a real cluster keeps its own setting);
# stopped at once on SIGTERM: `ray start --block` otherwise drains the node for up to 30 s first
# (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, for Kubernetes pods), the test's teardown waiting it out.
CLUSTER_ENV = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def _up(predicate: Callable[[], bool], what: str, proc: subprocess.Popen) -> Callable[[], bool]:  # type: ignore[type-arg]
    """``predicate`` as a ``wait_until`` check: an HTTP error is "not yet", an exited ``proc`` fails at once."""
    def check() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        try:
            return predicate()
        except httpx.HTTPError:
            return False

    return check


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture()
def ray_cluster() -> Iterator[str]:
    """A real Ray head node in its own processes, on its own ports and temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    ports = {
        "--port": port,
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--ray-client-server-port": free_port(),
    }
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus=2",
           "--include-dashboard=false", f"--temp-dir={temp_dir}"]
    cmd += [f"{flag}={value}" for flag, value in ports.items()]
    head = subprocess.Popen(cmd, env=CLUSTER_ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        check = [sys.executable, "-c", f"import ray; ray.init(address='{address}'); print(ray.cluster_resources()['CPU'])"]
        ready = lambda: subprocess.run(check, env=CLUSTER_ENV, capture_output=True, timeout=60).returncode == 0
        wait_until(_up(ready, "ray head", head), 120, 0.5, "timed out waiting for ray head")
        yield address
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_app_joins_an_existing_ray_cluster(ray_cluster: str, model_dir: Path, tmp_path: Path) -> None:
    schema = tmp_path / "schema.yaml"
    schema.write_text(yaml.safe_dump(multi_policy_schema(model_dir), sort_keys=False))
    port = free_port()
    env = CLUSTER_ENV | {
        "RAY_ADDRESS": ray_cluster,
        "SCHEMA_PATH": str(schema),
        "POLICY_SERVER_GATEWAY_METRICS_PORT": "0",
        "POLICY_SERVER_SERVE_APP_PREFIX": "cluster-test",
    }
    gateway = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port)],
        cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        ready = _up(lambda: httpx.get(f"{url}/health/ready").status_code == 200, "gateway", gateway)
        wait_until(ready, 180, 0.5, "timed out waiting for gateway")
        r = httpx.post(f"{url}/predict", json=LPOC_OBS, headers={"access-token": API_KEY})
        assert r.status_code == 200, r.text
        assert r.json()["action_name"] in {"up", "right", "down", "left"}
        # the deployments run on the cluster, not in the gateway's process
        check = (
            "import ray; from ray import serve; ray.init(address='%s'); "
            "print(sorted(serve.status().applications))" % ray_cluster
        )
        apps = subprocess.run([sys.executable, "-c", check], env=CLUSTER_ENV, capture_output=True, text=True, timeout=120)
        assert "cluster-test-lpoc" in apps.stdout, apps.stderr[-2000:]
    finally:
        _stop(gateway)


HOG = """
import ray
ray.init(address="{address}")

@ray.remote
class Hog:
    def ping(self) -> int:
        return 1

ray.get(Hog.options(name="hog", lifetime="detached", num_cpus=1.5).remote().ping.remote())
"""


def test_start_up_on_a_cluster_without_free_cpus_fails_at_once_naming_each_ask(
    ray_cluster: str, model_dir: Path, tmp_path: Path
) -> None:
    """Issue 14's silent wait: another job holds 1.5 of the cluster's 2 CPUs and the schema asks
    for 1; the gateway exits non-zero within seconds, naming the field, its ask and what is free."""
    subprocess.run([sys.executable, "-c", HOG.format(address=ray_cluster)], env=CLUSTER_ENV, check=True, timeout=120,
                   capture_output=True)
    raw = multi_policy_schema(model_dir)
    raw["policies"] = {"lpoc": raw["policies"]["lpoc"] | {"resources": {"num_cpus": 1}}}
    schema = tmp_path / "schema.yaml"
    schema.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = CLUSTER_ENV | {"RAY_ADDRESS": ray_cluster, "SCHEMA_PATH": str(schema), "POLICY_SERVER_GATEWAY_METRICS_PORT": "0"}
    began = time.monotonic()
    gateway = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app:app", "--port", str(free_port())],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    took = time.monotonic() - began
    assert gateway.returncode != 0
    assert took < 60
    assert ("policy-server: the schema asks Ray for 1 CPUs and the cluster has 0.5 free: "
            "policies.lpoc.resources.num_cpus: 1 (policy lpoc's replicas)") in gateway.stderr, gateway.stderr[-3000:]
