"""The README's run command, as a user types it: `uvicorn app:app` with Ray started inside."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import free_port

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
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.5)
        answer = httpx.post(f"{url}/predict", json=BODY, headers={"access-token": "1234567asdfgh"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["action_name"] in {"up", "right", "down", "left"}
        assert httpx.get(f"{url}/docs").status_code == 200
        assert httpx.get(f"{url}/redoc").status_code == 200
        ours = httpx.get(f"http://127.0.0.1:{gateway_metrics}/metrics").text
        assert 'policy_server_requests_total{endpoint="/predict",policy="default",status="200"} 1.0' in ours
        deadline = time.monotonic() + 90
        while "ray_serve_" not in (ray := httpx.get(f"http://127.0.0.1:{ray_metrics}/metrics", timeout=10).text):
            assert time.monotonic() < deadline, "Serve's metrics never appeared on Ray's export port"
            time.sleep(2)
        # SIGTERM to the server process alone, as docker stop and Kubernetes send it
        os.kill(proc.pid, signal.SIGTERM)
        # uvicorn re-raises the signal once its graceful shutdown is done: -SIGTERM, not a crash
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()[-3000:]
        assert "Application shutdown complete" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
