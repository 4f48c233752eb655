"""`uvicorn app:app` with RAY_ADDRESS joins an existing cluster (`ray start --head`) and serves;
several gateways (and `uvicorn --workers`) on one cluster share its apps and trainers."""

from __future__ import annotations

import collections
import json
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
import psutil
import pytest
import yaml
from conftest import API_KEY, LPOC_OBS, cart_fragment, multi_policy_schema, training_schema
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


def _node_ports() -> list[str]:
    """Free ports for a node's own listeners: several nodes share this host."""
    flags = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port", "--node-manager-port", "--object-manager-port")
    return [f"{flag}={free_port()}" for flag in flags]


def _ray_start(*args: str) -> subprocess.Popen:  # type: ignore[type-arg]
    """`ray start --block` with ``args`` in its own process group (``_stop`` ends the node)."""
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *args, *_node_ports()]
    return subprocess.Popen(cmd, env=CLUSTER_ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A real Ray head node in its own processes, on its own ports and temp dir, for the module's
    tests in their order (the hog test leaves an actor holding CPUs behind; the last test adds a
    second node)."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    head = _ray_start("--head", "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp_dir}",
                      f"--port={port}", f"--ray-client-server-port={free_port()}")
    address = f"127.0.0.1:{port}"
    try:
        check = [sys.executable, "-c", f"import ray; ray.init(address='{address}'); print(ray.cluster_resources()['CPU'])"]
        ready = lambda: subprocess.run(check, check=False, env=CLUSTER_ENV, capture_output=True, timeout=60).returncode == 0
        wait_until(_up(ready, "ray head", head), 120, 0.5, "timed out waiting for ray head")
        yield address
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _gateway(env: dict[str, str], port: int, *options: str, log: Path | None = None) -> subprocess.Popen:  # type: ignore[type-arg]
    """``uvicorn app:app`` on ``port`` in its own process group (``_stop`` ends the whole group),
    its log written to ``log``."""
    with open(log or os.devnull, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port), *options],
            cwd=ROOT, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
        )


def _wait_ready(url: str, gateway: subprocess.Popen) -> None:  # type: ignore[type-arg]
    ready = _up(lambda: httpx.get(f"{url}/health/ready").status_code == 200, "gateway", gateway)
    wait_until(ready, 180, 0.5, "timed out waiting for gateway")


def _on_cluster(address: str, code: str) -> str:
    """What ``code`` prints in a fresh driver on the cluster (``ray`` and ``serve`` imported)."""
    script = f"import ray; from ray import serve; ray.init(address='{address}'); {code}"
    run = subprocess.run([sys.executable, "-c", script], check=False, env=CLUSTER_ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


CART_OBS = {"cart_position": 0.0, "cart_velocity": 0.1, "pole_angle": -0.02, "pole_angular_velocity": 0.0}
PPO = {"rollout_samples": 32, "num_minibatches": 2, "update_epochs": 1}
LEASE_S = 4.0


def test_gateways_on_one_cluster_share_the_trainer_and_the_last_to_leave_removes_the_apps(
    ray_cluster: str, model_dir: Path, tmp_path: Path
) -> None:
    """Gateway A (`uvicorn --workers 2`: two gateway processes, one metrics port) and gateway B on
    one cluster: training through A moves the one trainer that B reports too; B's shutdown leaves
    the apps to A; a worker of A killed with SIGKILL stops counting after its lease, and the other
    worker's shutdown then removes the apps and the trainer."""
    schema = tmp_path / "schema.yaml"
    schema.write_text(yaml.safe_dump(training_schema(model_dir, tmp_path / "ckpt", ppo=PPO), sort_keys=False))
    (tmp_path / "prom").mkdir()
    env = CLUSTER_ENV | {
        "RAY_ADDRESS": ray_cluster,
        "SCHEMA_PATH": str(schema),
        "POLICY_SERVER_SERVE_APP_PREFIX": "shared",
        "POLICY_SERVER_GATEWAY_LEASE_S": str(LEASE_S),
        "POLICY_SERVER_GATEWAY_METRICS_PORT": "0",
    }
    metrics_port, port_a, port_b = free_port(), free_port(), free_port()
    a_env = env | {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"), "POLICY_SERVER_GATEWAY_METRICS_PORT": str(metrics_port)}
    a = _gateway(a_env, port_a, "--workers", "2", log=tmp_path / "a.log")
    b = _gateway(env, port_b, log=tmp_path / "b.log")
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    try:
        with httpx.Client(base_url=url_a, headers={"access-token": API_KEY}, timeout=60) as to_a, \
                httpx.Client(base_url=url_b, headers={"access-token": API_KEY}, timeout=60) as to_b:
            _wait_ready(url_a, a)
            _wait_ready(url_b, b)
            # the kernel spreads A's connections over its workers: each new client may reach either
            for version in (1, 2):
                fragment = cart_fragment(version - 1, steps=32, seed=version)
                answer = httpx.post(f"{url_a}/train/experience", json={"client_id": "a", "fragments": [fragment]},
                                    headers={"access-token": API_KEY}, timeout=60)
                assert answer.status_code == 200, answer.text
                published = lambda v=version: to_a.get("/version").json()["model_version"] >= v
                wait_until(published, 60, 0.1, "no update published")
            assert to_b.get("/train/status").json()["model_version"] == 2  # one trainer, whoever asks
            acted = to_b.post("/train/experience", json={"client_id": "b", "fragments": [cart_fragment(2, steps=8)]})
            assert acted.status_code == 200, acted.text  # acted by version 2: not "newer than the current"
            predicts = 6
            for _ in range(predicts):
                assert httpx.post(f"{url_a}/predict", json=CART_OBS, headers={"access-token": API_KEY}).status_code == 200
            # one port serves the sum of both workers' counts (each worker counts only its own)
            scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
            served = [line for line in scraped.splitlines()
                      if line.startswith("policy_server_requests_total{") and 'endpoint="/predict"' in line]
            assert sum(float(line.rsplit(" ", 1)[1]) for line in served) == predicts, served

            # the deployments run on the cluster, not in a gateway's process
            assert "shared-cart" in _on_cluster(ray_cluster, "print(sorted(serve.status().applications))")
            _stop(b)  # gracefully: A's apps and the trainer stay
            assert to_a.post("/predict", json=CART_OBS).status_code == 200
            assert to_a.get("/train/status").json()["model_version"] == 2

        supervisor = psutil.Process(a.pid)
        last, killed = [p for p in supervisor.children() if "spawn_main" in " ".join(p.cmdline())]
        supervisor.kill()  # first, or uvicorn replaces the killed worker by one that joins again
        killed.kill()  # SIGKILL: it never gives up its lease
        time.sleep(LEASE_S + 1)
        last.terminate()  # the last live gateway shuts down gracefully
        last.wait(timeout=60)
    finally:
        _stop(b)
        _stop(a)
    left = _on_cluster(ray_cluster, (
        "print(sorted(serve.status().applications)); "
        "from policy_server.serving.runtime.cluster_state import NAMESPACE; "
        "print([a['name'] for a in ray.util.list_named_actors(all_namespaces=True) if a['namespace'] == NAMESPACE])"
    ))
    logs = "".join(f"\n--- {name}:\n" + (tmp_path / name).read_text()[-3000:] for name in ("a.log", "b.log"))
    assert left.split("\n")[:2] == ["[]", "['policy-server-registry']"], left + logs


HOG = """
import ray
ray.init(address="{address}", namespace="test-hog")  # one namespace: get_if_exists finds it

@ray.remote
class Hog:
    def ping(self) -> int:
        return 1

ray.get(Hog.options(name="hog", lifetime="detached", num_cpus=1.5, get_if_exists=True).remote().ping.remote())
"""


def _hog(address: str) -> None:
    """Another job's actor holding 1.5 of the head's 2 CPUs (once per cluster)."""
    subprocess.run([sys.executable, "-c", HOG.format(address=address)], env=CLUSTER_ENV, check=True, timeout=120,
                   capture_output=True)


def test_start_up_on_a_cluster_without_free_cpus_fails_at_once_naming_each_ask(
    ray_cluster: str, model_dir: Path, tmp_path: Path
) -> None:
    """Issue 14's silent wait: another job holds 1.5 of the cluster's 2 CPUs and the schema asks
    for 1; the gateway exits non-zero within seconds, naming the field, its ask and what is free."""
    _hog(ray_cluster)
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


def test_replicas_spread_over_two_nodes_and_the_survivors_answer_when_a_node_dies(
    ray_cluster: str, model_dir: Path, tmp_path: Path
) -> None:
    """A second `ray start` node joins (1 CPU) while the hog holds 1.5 of the head's 2: three
    replicas of half a CPU fit only as one on the head and two on the new node. The gateway links to
    all three; SIGKILLing the second node's whole process group (raylet, workers) under load fails
    no request: the head's replica answers them all."""
    _hog(ray_cluster)
    worker = _ray_start(f"--address={ray_cluster}", "--num-cpus=1")
    try:
        nodes = "print(sum(n['Alive'] for n in ray.nodes()))"
        wait_until(_up(lambda: _on_cluster(ray_cluster, nodes).strip() == "2", "second node", worker),
                   120, 0.5, "the second node did not join")
        raw = multi_policy_schema(model_dir)
        raw["policies"] = {"lpoc": raw["policies"]["lpoc"] | {"resources": {"num_cpus": 0.5, "num_replicas": 3}}}
        schema = tmp_path / "schema.yaml"
        schema.write_text(yaml.safe_dump(raw, sort_keys=False))
        env = CLUSTER_ENV | {"RAY_ADDRESS": ray_cluster, "SCHEMA_PATH": str(schema), "POLICY_SERVER_GATEWAY_METRICS_PORT": "0",
                            "POLICY_SERVER_SERVE_APP_PREFIX": "spread"}
        port = free_port()
        gateway = _gateway(env, port, log=tmp_path / "gateway.log")
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(url, gateway)
            placed = _on_cluster(ray_cluster, (
                "import json; from ray._private.state import actors; "
                "print(json.dumps(sorted(a['Address']['NodeID'] for a in actors().values() "
                "if a['ActorClassName'] == 'ServeReplica:spread-lpoc:policy-lpoc' and a['State'] == 'ALIVE')))"))
            node_ids = json.loads(placed.strip().splitlines()[-1])
            assert len(node_ids) == 3 and len(set(node_ids)) == 2, placed  # one on the head, two on the new node
            statuses: list[int] = []
            with httpx.Client(base_url=url, headers={"access-token": API_KEY}, timeout=60) as client:
                for _ in range(20):
                    statuses.append(client.post("/policies/lpoc/predict", json=LPOC_OBS).status_code)
                _stop_now(worker)  # the node dies: its raylet and every process on it
                began = time.monotonic()
                while time.monotonic() - began < 5:  # requests through the node's death and after
                    statuses.append(client.post("/policies/lpoc/predict", json=LPOC_OBS).status_code)
            assert len(statuses) > 30 and set(statuses) == {200}, collections.Counter(statuses)
        finally:
            _stop(gateway)
    finally:
        _stop_now(worker)


def _stop_now(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """SIGKILL ``proc``'s whole process group (a node: its raylet and workers die at once)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
