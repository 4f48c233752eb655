"""The OpenAPI document of the bundled example, against a reviewed snapshot.

A change to the API (paths, models, fields, docs) shows up here as a diff. After a deliberate
change, refresh it with ``UPDATE_SNAPSHOTS=1 python -m pytest tests/gateway/test_openapi_snapshot.py``
and review the snapshot's diff like code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastapi.testclient import TestClient

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = Path(__file__).parent / "snapshots" / "openapi.json"


def test_openapi_matches_the_snapshot() -> None:
    settings = Settings(schema_path=ROOT / "schema.yaml", backend="local", gateway_metrics_port=0)
    with TestClient(build_app(settings)) as client:
        document = client.get("/openapi.json").json()
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(text)
    assert SNAPSHOT.read_text() == text, "the API changed: review, then refresh the snapshot (see docstring)"
