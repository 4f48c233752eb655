"""Start the bundled example server (``./schema.yaml`` and ``./models/``) for the demo, and find
the api key a server started from the local schema wants."""

from __future__ import annotations

import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Literal
from urllib.parse import urlsplit

import yaml

from policy_server.launch import REPO_ROOT, start_server, stop_server, wait_ready
from policy_server.settings import Settings

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


def schema_api_key(schema: Path) -> str:
    """``parameters.api_key`` of a schema file; "" when it has none, or the file is missing or not YAML
    (the server would not start from it either, so there is no key to know)."""
    try:
        doc = yaml.safe_load(schema.read_text())
    except (OSError, yaml.YAMLError):
        return ""
    parameters = doc.get("parameters") if isinstance(doc, dict) else None
    return str((parameters or {}).get("api_key") or "")


def example_api_key(schema: Path = EXAMPLE_SCHEMA) -> str:
    """The key the example server will want: ``POLICY_SERVER_API_KEY``, else the schema's."""
    return os.environ.get("POLICY_SERVER_API_KEY") or schema_api_key(schema)


def is_local(url: str) -> bool:
    """Whether ``url`` names this machine (``localhost``, ``127.0.0.0/8``, ``::1``)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def demo_api_key(url: str) -> str:
    """The key the demo sends until the user types another.

    The server's own settings decide (the environment and ``.env``, as ``uvicorn app:app`` started
    here reads them): ``POLICY_SERVER_API_KEY`` when set; else, for a server on this machine, the
    api key of the local schema (``SCHEMA_PATH``, default the ``schema.yaml`` beside
    ``frontend.py``); else "" (docker compose's demo talks to another container, whose schema it
    cannot read: the user types the key in the sidebar). Never from ``/schema``, which hides it.
    """
    settings = Settings()
    if settings.api_key is not None:
        return settings.api_key.get_secret_value()
    if not is_local(url):
        return ""
    schema = settings.schema_path
    if not schema.is_absolute() and not schema.is_file():
        schema = REPO_ROOT / schema
    return schema_api_key(schema)


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
