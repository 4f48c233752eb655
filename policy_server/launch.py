"""Start ``uvicorn app:app`` as a child process for a script, wait until it is ready, stop it.

The examples' scripts (``examples/cartpole/train.py``, ``examples/alphabetical/alphabetical.py``)
start a server of their own when none is given; this is that one piece, written once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from policy_server.net import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


def start_server(schema: Path, backend: str, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``uvicorn app:app`` from the repository root on free ports; returns it and its URL."""
    port = free_port()
    env = {
        **os.environ,
        "SCHEMA_PATH": str(schema),
        "POLICY_SERVER_BACKEND": backend,
        "POLICY_SERVER_RAY_METRICS_PORT": str(free_port()),
        "POLICY_SERVER_GATEWAY_METRICS_PORT": str(free_port()),
    }
    cmd = [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--no-access-log"]
    with log_path.open("wb") as log:
        # its own session: a Ctrl-C in the script reaches only the script, which then stops the server
        process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(url: str, process: subprocess.Popen[bytes] | None, log_path: Path | None, timeout_s: float) -> None:
    """Poll ``/health/ready`` until 200; fail with the server's log if the process exits first."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise RuntimeError(f"the server exited with status {process.returncode} while starting:\n{tail}")
        try:
            response = httpx.get(f"{url}/health/ready", timeout=5)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.5)
    where = f"; its log: {log_path}" if log_path else ""
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s ({last}){where}")


def stop_server(process: subprocess.Popen[bytes], grace_s: float = 60.0) -> None:
    """SIGINT (uvicorn's graceful path, which also shuts its Ray down), then SIGKILL to its group."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
