"""The composition root's cross-origin setting: Starlette's CORSMiddleware when origins are set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import API_KEY, LPOC_OBS, multi_policy_schema
from fastapi.testclient import TestClient

from policy_server.gateway.app import build_app
from policy_server.settings import Settings

ALLOWED, REFUSED = "https://app.example.com", "https://evil.example.org"
PREFLIGHT = {"access-control-request-method": "POST", "access-control-request-headers": "access-token, content-type"}


def client(model_dir: Path, folder: Path, **settings: Any) -> TestClient:
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(multi_policy_schema(model_dir), sort_keys=False))
    return TestClient(build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0, **settings)))


@pytest.fixture(scope="module")
def cors(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    return client(model_dir, tmp_path_factory.mktemp("cors"), cors_origins=[ALLOWED])


def test_a_preflight_from_an_allowed_origin_is_answered(cors: TestClient) -> None:
    answer = cors.options("/predict", headers={"origin": ALLOWED} | PREFLIGHT)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == ALLOWED
    allowed = [h.strip().lower() for h in answer.headers["access-control-allow-headers"].split(",")]
    assert {"access-token", "content-type", "x-policy-id"} <= set(allowed) and len(allowed) == len(set(allowed))
    assert "POST" in answer.headers["access-control-allow-methods"]


def test_a_preflight_from_another_origin_is_refused(cors: TestClient) -> None:
    answer = cors.options("/predict", headers={"origin": REFUSED} | PREFLIGHT)
    assert answer.status_code == 400 and "access-control-allow-origin" not in answer.headers
    error = answer.json()["error"]  # our one envelope, not Starlette's plain text
    assert error["code"] == "cors_refused" and error["status"] == 400
    assert REFUSED in error["message"] and "POLICY_SERVER_CORS_ORIGINS" in error["message"]


def test_a_refused_method_or_header_is_named_with_what_is_allowed(cors: TestClient) -> None:
    answer = cors.options("/predict", headers={"origin": ALLOWED, "access-control-request-method": "PUT",
                                               "access-control-request-headers": "access-token, x-foo"})
    message = answer.json()["error"]["message"]
    assert answer.status_code == 400 and "origin '" not in message
    assert "method 'PUT' is not one of GET, POST, DELETE" in message and "headers x-foo are not among" in message


def test_simple_requests_carry_the_header_only_for_an_allowed_origin(cors: TestClient) -> None:
    with cors:  # started: /predict answers
        allowed = cors.post("/predict", json=LPOC_OBS, headers={"origin": ALLOWED, "access-token": API_KEY})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED
        refused = cors.post("/predict", json=LPOC_OBS, headers={"origin": REFUSED, "access-token": API_KEY})
        assert refused.status_code == 200 and "access-control-allow-origin" not in refused.headers  # the browser hides it
        denied = cors.post("/predict", json=LPOC_OBS, headers={"origin": ALLOWED})  # a browser page reads the 401 too
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ALLOWED
        assert "www-authenticate" in denied.headers["access-control-expose-headers"]


def test_without_origins_no_cors_headers_are_sent(model_dir: Path, tmp_path: Path) -> None:
    plain = client(model_dir, tmp_path)
    preflight = plain.options("/predict", headers={"origin": ALLOWED} | PREFLIGHT)
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in plain.get("/health/live", headers={"origin": ALLOWED}).headers
