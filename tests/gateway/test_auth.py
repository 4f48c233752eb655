"""The api keys through the gateway (backend ``local``, no Ray): per-policy and server-wide keys,
several at once, a keys file rotated under a running app, and 401 with ``WWW-Authenticate``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import API_KEY, BOX_OBS, LPOC_OBS, multi_policy_schema
from fastapi.testclient import TestClient
from support import wait_until

from policy_server.errors import SettingsError
from policy_server.gateway.app import build_app
from policy_server.settings import Settings

APIKEY_CHALLENGE = 'APIKey realm="policy-server", header="access-token"'


def build(schema: dict[str, Any], folder: Path, **settings: Any) -> TestClient:
    path = folder / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return TestClient(build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0, **settings)))


def keyed_schema(model_dir: Path) -> dict[str, Any]:
    """The four policies; the server-wide keys API_KEY and `second-server-key`, lpoc's own `lpoc-key`."""
    schema = multi_policy_schema(model_dir, api_keys=["second-server-key"])
    schema["policies"]["lpoc"]["api_keys"] = ["lpoc-key"]
    return schema


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(yaml.safe_dump({"server": ["rotating-1"], "policies": {"box": ["box-key"]}}))
    return path


@pytest.fixture(scope="module")
def client(model_dir: Path, keys_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with build(keyed_schema(model_dir), tmp_path_factory.mktemp("keyed"), api_keys_file=keys_file) as c:
        yield c


def status(client: TestClient, path: str, key: str | None, body: Any = LPOC_OBS) -> int:
    headers = {"access-token": key} if key is not None else {}
    return client.post(path, json=body, headers=headers).status_code


@pytest.mark.parametrize("key", [API_KEY, "second-server-key", "rotating-1"])
def test_every_server_wide_key_opens_every_policy(client: TestClient, key: str) -> None:
    assert status(client, "/predict", key) == 200
    assert status(client, "/policies/box/predict", key, BOX_OBS) == 200


def test_a_policy_key_opens_only_that_policy(client: TestClient) -> None:
    assert status(client, "/predict", "lpoc-key") == 200  # lpoc is the default: its plain paths too
    assert status(client, "/policies/lpoc/predict", "lpoc-key") == 200
    refused = client.post("/policies/box/predict", json=BOX_OBS, headers={"access-token": "lpoc-key"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    assert "policies/box" in refused.json()["error"]["message"] and "lpoc-key" not in refused.text
    assert status(client, "/policies/box/predict", "box-key", BOX_OBS) == 200  # from the keys file
    assert status(client, "/predict", "box-key") == 403
    assert client.get("/clients/status", headers={"access-token": "box-key"}).status_code == 200  # any key


def test_a_missing_key_is_401_with_a_challenge(client: TestClient) -> None:
    for path in ("/predict", "/policies/box/predict/batch", "/train/status"):
        answer = client.post(path, json={})
        assert answer.status_code == 401, path
        assert answer.headers["www-authenticate"] == APIKEY_CHALLENGE
        assert answer.json()["error"]["code"] == "unauthorized"


def test_keys_rotate_through_the_file_without_a_restart(
    client: TestClient, keys_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    original = keys_file.read_text()
    try:
        keys_file.write_text(yaml.safe_dump({"server": ["rotating-2", "rotating-3"]}))  # 1 out, 2 and 3 in
        wait_until(lambda: status(client, "/predict", "rotating-2") == 200, timeout=1.0, message="new key refused")
        assert status(client, "/predict", "rotating-1") == 403
        assert status(client, "/predict", "rotating-3") == 200 and status(client, "/predict", API_KEY) == 200
        with caplog.at_level(logging.ERROR, logger="policy_server.gateway.keys"):
            keys_file.write_text("server: [rotating-4\n")  # broken: the last good keys stay
            wait_until(lambda: status(client, "/predict", "rotating-2") == 200 and caplog.records,
                       timeout=1.0, message="no error logged")
            assert status(client, "/predict", "rotating-4") == 403
        assert "rotating" not in caplog.text
    finally:
        keys_file.write_text(original)
        wait_until(lambda: status(client, "/predict", "rotating-1") == 200, timeout=1.0)


def test_without_any_key_configured_the_routes_are_open(model_dir: Path, tmp_path: Path) -> None:
    schema = multi_policy_schema(model_dir)
    del schema["parameters"]["api_key"]
    with build(schema, tmp_path) as c:
        assert status(c, "/predict", None) == 200


def test_a_keys_file_naming_an_unknown_policy_is_refused_at_start(model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("policies: {cartpole: [secret-key]}\n")
    with pytest.raises(SettingsError, match=r"POLICY_SERVER_API_KEYS_FILE: .*policies.cartpole: the schema has no such") as caught:
        build(multi_policy_schema(model_dir), tmp_path, api_keys_file=path)
    assert "secret-key" not in caught.value.message


def test_llm_routes_take_the_llm_sections_keys_and_openai_clients_get_bearer_challenges(
    model_dir: Path, llm_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The app unstarted: auth answers before a route's service would (503 while it starts)."""
    schema = keyed_schema(model_dir)
    schema["llm"] = {"policy": {"path": str(llm_dirs["policy"]), "engine": "transformers", "served_name": "tiny"},
                     "api_keys": ["llm-key"]}
    client = build(schema, tmp_path)
    bearer = {"authorization": "Bearer llm-key"}
    assert client.get("/v1/models", headers=bearer).status_code not in (401, 403)
    assert client.post("/llm/direct_forward", json={"input_string": "hi"}, headers={"access-token": "llm-key"}
                       ).status_code not in (401, 403)
    missing = client.get("/v1/models")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == 'Bearer realm="policy-server"'
    assert missing.json()["error"]["type"] == "authentication_error"  # OpenAI's shape on /v1
    wrong = client.get("/v1/models", headers={"authorization": "Bearer lpoc-key"})  # another scope's key
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == 'Bearer realm="policy-server", error="invalid_token"'
    assert status(client, "/predict", "llm-key") == 403
    assert status(client, "/llm/direct_forward", "lpoc-key", {"input_string": "hi"}) == 403
    assert "llm-key" not in client.get("/schema").text

