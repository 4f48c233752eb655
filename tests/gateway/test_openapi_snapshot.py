"""The OpenAPI document of the bundled example, against a reviewed snapshot.

A change to the API (paths, models, fields, docs) shows up here as a diff. After a deliberate
change, refresh it with ``UPDATE_SNAPSHOTS=1 python -m pytest tests/gateway/test_openapi_snapshot.py``
and review the snapshot's diff like code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from conftest import make_client, training_schema
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


def test_operation_ids_are_unique_and_named_after_method_and_path(
    model_dir: Path, llm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    schema = training_schema(model_dir, tmp_path / "ckpt")
    schema["parameters"]["url_path"] = "api/v1"
    schema["llm"] = {"policy": {"path": str(llm_dirs["policy"]), "engine": "transformers"},
                     "value": {"path": str(llm_dirs["value"])}}
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    document = build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0)).openapi()
    ids = {(method, route): op["operationId"] for route, ops in document["paths"].items() for method, op in ops.items()}
    assert len(set(ids.values())) == len(ids) > 60
    assert ids["post", "/api/v1/predict"] == "predict"
    assert ids["post", "/api/v1/policies/cart/predict/batch"] == "policies_cart_predict_batch"
    assert ids["get", "/api/v1/train/status"] == "get_train_status"
    assert ids["delete", "/api/v1/llm/sessions/{session_id}"] == "delete_llm_sessions_by_session_id"
    assert ids["post", "/api/v1/v1/chat/completions"] == "v1_chat_completions"


def test_every_route_documents_a_typed_answer(model_dir: Path, llm_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Policies with training, the LLM policy with GRPO and x1 training, the value model: each
    operation's success answer is a JSON schema with properties (a model), or a file."""
    schema = training_schema(model_dir, tmp_path / "ckpt") | {"llm": {
        "policy": {"path": str(llm_dirs["policy"]), "engine": "transformers", "training": {"save_dir": str(tmp_path / "llm")}},
        "value": {"path": str(llm_dirs["value"]), "training": {"save_dir": str(tmp_path / "value")}},
    }}
    document = make_client(tmp_path, schema).app.openapi()
    untyped = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                content = answer.get("content", {})
                typed = _is_typed(content.get("application/json", {}).get("schema"), document)
                if status.startswith("2") and "application/json" in content and not typed:
                    untyped.append(f"{method.upper()} {path} {status}")
    assert any(p.endswith("/grpo/runs/{run_id}/rewards") for p in document["paths"])
    # the served schema.yaml is the user's own document, free-form by design
    assert untyped == ["GET /schema 200"], untyped


def _is_typed(schema: dict[str, Any] | None, document: dict[str, Any]) -> bool:
    """A $ref to a component with properties, or an inline object/array of such."""
    if not schema:
        return False
    if "$ref" in schema:
        return _is_typed(document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]], document)
    if "anyOf" in schema:
        return all(_is_typed(s, document) for s in schema["anyOf"] if s.get("type") != "null")
    return bool(schema.get("properties")) or schema.get("type") == "array" and _is_typed(schema["items"], document)
