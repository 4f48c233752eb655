"""A real-size (> 1 GB) float32 checkpoint served by `uvicorn app:app` on Ray Serve (the default
backend): replicas load it from its path, so start-up no longer stops with Ray's KVStoreError
("Sent message larger than max") as it did when model folders travelled to `serve.run` as bytes.

Prints start-up seconds and the peak RSS of the gateway and of each Serve replica (the README's
numbers); asserts only sanity bounds on them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from conftest import API_KEY, build_tiny_model
from support import wait_ready

from policy_server.net import free_port

ROOT = Path(__file__).resolve().parents[2]
GB = 1 << 30
START_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def big_model(llm_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The examples' ~1.2 GB float32 Llama (``build_tiny_model.build_real_size``), saved as safetensors."""
    return build_tiny_model().build_real_size(tmp_path_factory.mktemp("real-size") / "policy", llm_dirs["policy"])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def peak_rss(process: psutil.Process) -> int:
    """The process's peak resident set size in bytes (Linux's VmHWM)."""
    status = Path(f"/proc/{process.pid}/status").read_text()
    kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kb) * 1024


def replicas(gateway: psutil.Process) -> dict[str, int]:
    """Peak RSS of each Serve replica the gateway's Ray runs, by its process title, its own
    processes included (vLLM's engine core, which holds the weights, is a child of the replica)."""
    found = {}
    for child in gateway.children(recursive=True):
        try:
            title = " ".join(child.cmdline())
            if "ServeReplica" in title:
                found[title.split()[0]] = peak_rss(child) + sum(peak_rss(p) for p in child.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError):
            continue
    return found


@pytest.fixture
def served(big_model: Path, tmp_path: Path) -> Iterator[tuple[str, psutil.Process, float]]:
    """`uvicorn app:app` (backend serve) on a schema of the big model alone, on the default engine
    (vLLM; one engine per test session: the transformers engine's replica loads its folder by the
    same path); yields the URL, the gateway process and its start-up seconds."""
    schema = tmp_path / "schema.yaml"
    policy = {"path": str(big_model), "served_name": "big"}
    schema.write_text(yaml.safe_dump({"parameters": {"api_key": API_KEY}, "llm": {"policy": policy}}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLICY_SERVER_", "RAY_ADDRESS", "SCHEMA_PATH"))}
    env |= {"SCHEMA_PATH": str(schema), "POLICY_SERVER_GATEWAY_METRICS_PORT": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    log = tmp_path / "server.log"
    started = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port)],
            cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=sink,
        )
    url = f"http://127.0.0.1:{port}"

    try:
        wait_ready(proc, url, log, START_TIMEOUT_S)
        yield url, psutil.Process(proc.pid), time.monotonic() - started
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "KVStoreError" not in log.read_text()


def test_a_real_size_checkpoint_serves_through_uvicorn(big_model: Path, served: tuple[str, psutil.Process, float]) -> None:
    url, gateway, startup_s = served
    size = folder_bytes(big_model)
    assert size > GB
    completion = httpx.post(
        f"{url}/v1/completions", headers={"authorization": f"Bearer {API_KEY}"}, timeout=120,
        json={"model": "big", "prompt": "What is 2 + 3?", "max_tokens": 4, "temperature": 1.0, "seed": 0},
    )
    assert completion.status_code == 200, completion.text
    choice = completion.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and completion.json()["usage"]["completion_tokens"] > 0
    forward = httpx.post(
        f"{url}/llm/direct_forward", headers={"access-token": API_KEY}, timeout=120,
        json={"input_string": "What is 2 + 3?", "max_input_length": 32, "max_output_length": 36, "num_samples": 2, "seed": 0},
    )
    assert forward.status_code == 200, forward.text
    answer = forward.json()
    assert len(answer["result"]) == 2 and answer["model_version"] == 0

    gateway_peak, replica_peaks = peak_rss(gateway), replicas(gateway)
    print(f"\ncheckpoint {size / GB:.2f} GiB; start-up {startup_s:.1f} s; gateway peak RSS {gateway_peak / GB:.2f} GiB; "
          + "; ".join(f"{name} peak RSS {rss / GB:.2f} GiB" for name, rss in sorted(replica_peaks.items())))
    assert gateway_peak < size  # the gateway loads the tokenizer, not the weights
    policy_replicas = [rss for name, rss in replica_peaks.items() if "llm-policy" in name]
    assert len(policy_replicas) == 1 and size <= policy_replicas[0] < 4 * size
