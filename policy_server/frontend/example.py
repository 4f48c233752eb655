"""Start the bundled example server (``./schema.yaml`` and ``./models/``) for the demo."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Literal

import yaml

from policy_server.launch import REPO_ROOT, start_server, stop_server, wait_ready

EXAMPLE_SCHEMA = REPO_ROOT / "schema.yaml"


@dataclass
class ExampleServer:
    """``uvicorn app:app`` serving the bundled example, a child process of the demo."""

    process: Popen[bytes]
    url: str
    api_key: str
    log_path: Path

    def stop(self) -> None:
        stop_server(self.process, grace_s=20)

    @property
    def running(self) -> bool:
        return self.process.poll() is None


def example_api_key(schema: Path = EXAMPLE_SCHEMA) -> str:
    """The key the example server will want: ``POLICY_SERVER_API_KEY``, else the schema's."""
    if os.environ.get("POLICY_SERVER_API_KEY"):
        return os.environ["POLICY_SERVER_API_KEY"]
    doc = yaml.safe_load(schema.read_text()) or {}
    return str((doc.get("parameters") or {}).get("api_key") or "")


def start_example(backend: Literal["local", "serve"] = "local", timeout_s: float = 120.0,
                  schema: Path = EXAMPLE_SCHEMA) -> ExampleServer:
    """Start it on a free port and wait until ``/health/ready``; ``local`` runs the model in the
    server process (no Ray start, ready in a few seconds), ``serve`` on Ray Serve."""
    log_path = Path(tempfile.mkstemp(prefix="policy-server-demo-", suffix=".log")[1])
    process, url = start_server(schema, backend, log_path)
    try:
        wait_ready(url, process, log_path, timeout_s)
    except BaseException:
        stop_server(process, grace_s=10)
        raise
    return ExampleServer(process, url, example_api_key(schema), log_path)
