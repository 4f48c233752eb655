"""The gateway's metrics port: a port that is taken fails start-up in one line; closing never races."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_server.errors import StartupError
from policy_server.gateway.metrics import GatewayMetrics
from policy_server.net import bound_socket


def test_a_taken_port_is_a_startup_error_that_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    taken = bound_socket()
    taken.listen()
    try:
        with pytest.raises(StartupError, match="PROMETHEUS_MULTIPROC_DIR .*POLICY_SERVER_GATEWAY_METRICS_PORT"):
            GatewayMetrics().serve(taken.getsockname()[1])
    finally:
        taken.close()


def test_a_worker_waiting_for_the_multiprocess_lock_closes_without_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn --workers: one worker serves, another waits for the folder's lock; the waiting one
    stops first (its close races its waiting thread) and then the serving one."""
    import threading

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    serving, waiting = GatewayMetrics(), GatewayMetrics()
    probe = bound_socket()
    port = probe.getsockname()[1]
    probe.close()
    serving.serve(port)
    waiting.serve(port)
    import time

    time.sleep(0.3)  # both threads reached the lock: one holds it, one waits
    waiting.close()
    time.sleep(0.3)
    serving.close()
    time.sleep(0.3)
    assert errors == []
