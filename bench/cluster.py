"""Gateways on one Ray cluster: requests/s of one gateway against two, and a replica's death.

    python bench/cluster.py [--seconds 15] [--connections 64]

On a ``ray start --head`` cluster of this machine, the examples/lpoc policy with two replicas:

1. **One gateway against two.** wrk drives ``connections`` clients at gateway A alone, then the
   same number split over gateways A and B (two ``uvicorn app:app`` with ``RAY_ADDRESS``), which
   share the Serve deployment. Reported: requests/s of each, and two over one.
2. **A replica's death.** Under load through gateway A, one replica's process gets SIGKILL.
   Reported: seconds until Serve runs its replacement, failed requests, and the newcomer's share
   of the batches the replicas answered (each counts its own) over the ``seconds`` after that: 0.5
   is an even share. Once for our direct transport (links balanced by replica, `serving/link_pool.py`), once
   for the baseline, every batch through Ray Serve's handle and router
   (``POLICY_SERVER_DIRECT_TRANSPORT=false``).

Needs wrk (``apt-get install -y wrk``). Prints a table; ``--out`` writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml

from bench.loadgen import WrkResult, find_wrk, run_wrk
from bench.servers import RunningServer, ServerSpec, running_server
from policy_server.net import free_port

PREFIX = "bench-cluster"
OBS = {"id": 1, "coordinates_0": 2, "coordinates_1": 3, "has_up_neighbour": True, "is_up_free": True,
       "has_right_neighbour": False, "is_right_free": True, "has_down_neighbour": True, "is_down_free": False,
       "has_left_neighbour": False, "is_left_free": True}
CLUSTER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
REPLICA_CLASS = f"ServeReplica:{PREFIX}-default:policy-default"


@contextmanager
def ray_head(tmp: Path) -> Iterator[str]:
    """``ray start --head --block`` on free ports; yields its address, stops it after."""
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    flags = ["--port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port", "--node-manager-port", "--object-manager-port", "--ray-client-server-port"]
    ports = [port] + [free_port() for _ in flags[1:]]
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--include-dashboard=false",
           f"--temp-dir={temp_dir}"] + [f"{f}={p}" for f, p in zip(flags, ports)]
    head = subprocess.Popen(cmd, env={**os.environ, **CLUSTER_ENV}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        import ray

        deadline = time.monotonic() + 120
        while True:
            try:
                ray.init(address=address, log_to_driver=False)
                break
            except Exception:  # the head is still starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield address
    finally:
        import ray

        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def write_schema(tmp: Path) -> Path:
    schema = yaml.safe_load((ROOT / "examples" / "lpoc" / "schema.yaml").read_text())
    schema["parameters"]["model"] = str(ROOT / "examples" / "lpoc" / schema["parameters"]["model"])
    schema["parameters"]["resources"] = {"num_cpus": 0.1, "num_replicas": 2}
    path = tmp / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return path


def gateway(name: str, schema: Path, address: str, direct: bool) -> ServerSpec:
    return ServerSpec(name, "app:app", ready_path="/health/ready", env={
        **CLUSTER_ENV, "RAY_ADDRESS": address, "SCHEMA_PATH": str(schema), "POLICY_SERVER_SERVE_APP_PREFIX": PREFIX,
        "POLICY_SERVER_GATEWAY_METRICS_PORT": "0", "POLICY_SERVER_DIRECT_TRANSPORT": str(direct).lower(),
    })


def key(schema: Path) -> dict[str, str]:
    return {"access-token": str(yaml.safe_load(schema.read_text())["parameters"]["api_key"])}


def wrk_at(wrk: str, servers: list[RunningServer], headers: dict[str, str], connections: int,
           seconds: float) -> list[WrkResult]:
    """wrk at every server at once, ``connections`` split evenly between them."""
    results: list[WrkResult | None] = [None] * len(servers)

    def one(i: int) -> None:
        results[i] = run_wrk(wrk, servers[i].base_url + "/predict", OBS, headers, connections // len(servers), seconds)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


def replicas() -> dict[str, int]:
    """Live replicas of the benchmark's deployment: actor id -> pid (Ray's GCS; no dashboard needed)."""
    from ray._private.state import actors

    return {i: a["Pid"] for i, a in actors().items() if a["ActorClassName"] == REPLICA_CLASS and a["State"] == "ALIVE"}


def batches_by_pid() -> dict[int, int]:
    """Batches each replica answered so far (``PolicyDeployment.replica_stats`` of every replica)."""
    from ray import serve

    handle = serve.get_deployment_handle("policy-default", f"{PREFIX}-default")
    return {s["pid"]: s["batches"] for s in handle.broadcast("replica_stats").results(timeout_s=30)}


def failover(wrk: str, server: RunningServer, headers: dict[str, str], connections: int, seconds: float) -> dict[str, Any]:
    """Kill one replica under load; time its replacement and measure the newcomer's share of work."""
    deadline = time.monotonic() + 60
    while len(replicas()) != 2:
        if time.monotonic() > deadline:
            raise RuntimeError(f"expected 2 replicas, found {replicas()}")
        time.sleep(0.5)
    before = replicas()
    victim, victim_pid = next(iter(before.items()))
    survivor_pid = next(pid for i, pid in before.items() if i != victim)
    load_s = seconds * 3 + 30
    result: list[WrkResult] = []
    load = threading.Thread(target=lambda: result.extend(wrk_at(wrk, [server], headers, connections, load_s)))
    load.start()
    time.sleep(3)
    os.kill(victim_pid, signal.SIGKILL)
    killed = time.monotonic()
    while True:
        now = replicas()
        if len(now) == 2 and victim not in now:
            break
        if time.monotonic() - killed > 120:
            raise RuntimeError(f"no replacement within 120 s: {now}")
        time.sleep(0.1)
    replaced_s = time.monotonic() - killed
    newcomer_pid = next(pid for pid in now.values() if pid != survivor_pid)
    time.sleep(2)  # Serve's routers and the gateway's re-listing (every 5 s) pick the newcomer up
    start = batches_by_pid()
    time.sleep(seconds)
    end = batches_by_pid()
    done = {pid: end[pid] - start.get(pid, 0) for pid in (survivor_pid, newcomer_pid)}
    load.join()
    return {"replaced_s": replaced_s, "failed": result[0].failed, "requests": result[0].requests,
            "newcomer_share": done[newcomer_pid] / max(1, sum(done.values()))}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per wrk run and per CPU-share window")
    parser.add_argument("--connections", type=int, default=64, help="wrk clients in all")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers here as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = find_wrk()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp_name, ray_head(Path(tmp_name)) as address:
        tmp = Path(tmp_name)
        schema = write_schema(tmp)
        headers = key(schema)
        for direct in (True, False):
            design = "ours (direct, balanced)" if direct else "Ray Serve handle (baseline)"
            with ExitStack() as stack:
                a = stack.enter_context(running_server(gateway("gateway-a", schema, address, direct), ROOT, tmp / "logs"))
                one = wrk_at(wrk, [a], headers, args.connections, args.seconds)
                b = stack.enter_context(running_server(gateway("gateway-b", schema, address, direct), ROOT, tmp / "logs"))
                two = wrk_at(wrk, [a, b], headers, args.connections, args.seconds)
                results[design] = {
                    "one_gateway_rps": one[0].requests_per_s,
                    "two_gateways_rps": sum(r.requests_per_s for r in two),
                    "failed": sum(r.failed for r in one + two),
                    "failover": failover(wrk, a, headers, args.connections, args.seconds),
                }
            print(f"{design}: {json.dumps(results[design])}", file=sys.stderr)
    print(table(results, args))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"examples/lpoc, 2 replicas, {args.connections} wrk clients, {args.seconds:g} s per run, {os.cpu_count()} cores",
             "", ("| design | 1 gateway req/s | 2 gateways req/s | 2 / 1 | replica killed: replaced after | "
                  "failed requests | newcomer's share of work |"), "|---|---:|---:|---:|---:|---:|---:|"]
    for design, r in results.items():
        f = r["failover"]
        lines.append(f"| {design} | {r['one_gateway_rps']:,.0f} | {r['two_gateways_rps']:,.0f} | "
                     f"{r['two_gateways_rps'] / r['one_gateway_rps']:.2f}× | {f['replaced_s']:.1f} s | "
                     f"{f['failed'] + r['failed']} of {f['requests']:,}+ | {f['newcomer_share']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
