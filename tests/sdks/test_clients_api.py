"""GET /clients on a running server: 503 while generating, then the zip of every language's SDK."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import API_KEY, LPOC_OBS, multi_policy_schema, running_server
from fastapi.testclient import TestClient

from policy_server.gateway.app import build_app
from policy_server.sdks.languages import LANGUAGES_PATTERN
from policy_server.settings import Settings

AUTH = {"access-token": API_KEY}
PREFIX = "/api/v1"
LANGUAGE_FOLDERS = ["python", "java", "scala", "r", "typescript", "go"]


@pytest.fixture(scope="module")
def settings(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("clients_api")
    (root / "schema.yaml").write_text(yaml.safe_dump(multi_policy_schema(model_dir, url_path="api/v1")))
    return Settings(
        schema_path=root / "schema.yaml",
        backend="local",
        gateway_metrics_port=0,
        clients_cache_dir=root / "cache",
    )


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[str]:
    with running_server(build_app(settings)) as url:
        yield url + PREFIX


@pytest.fixture(scope="module")
def answers(server: str) -> dict[str, Any]:
    """The first GET /clients (it starts the generation), the status right after, the final zip."""
    first = httpx.get(f"{server}/clients", headers=AUTH, timeout=30)
    during = httpx.get(f"{server}/clients/status", headers=AUTH).json()
    deadline, served_meanwhile = time.monotonic() + 300, []
    while httpx.get(f"{server}/clients/status", headers=AUTH).json()["status"] == "running":
        assert time.monotonic() < deadline, "the SDKs were not generated within 300 s"
        predicted = httpx.post(f"{server}/predict", json=LPOC_OBS, headers=AUTH, timeout=30)
        still_running = httpx.get(f"{server}/clients/status", headers=AUTH).json()["status"] == "running"
        served_meanwhile.append((predicted.status_code, still_running))
        time.sleep(0.2)
    final = httpx.get(f"{server}/clients", headers=AUTH, timeout=30)
    return {"first": first, "during": during, "final": final, "served_meanwhile": served_meanwhile}


def unzip(response: httpx.Response) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(response.content))


def test_the_first_request_starts_the_generation_and_answers_503(answers: dict[str, Any]) -> None:
    first = answers["first"]
    assert first.status_code == 503
    assert first.headers["retry-after"] == "5"
    error = first.json()["error"]
    assert error["code"] == "clients_not_ready" and "languages done" in error["message"]
    assert answers["during"]["status"] == "running"
    assert set(answers["during"]["languages"]) == set(LANGUAGE_FOLDERS)


def test_serving_goes_on_while_the_sdks_are_generated(answers: dict[str, Any]) -> None:
    served = answers["served_meanwhile"]
    assert served and all(status == 200 for status, _ in served)
    assert any(still_running for _, still_running in served), "no /predict answered during the generation"


def test_when_ready_the_zip_has_one_folder_per_language_and_a_readme(
    server: str, answers: dict[str, Any]
) -> None:
    final = answers["final"]
    assert final.status_code == 200, final.text
    assert final.headers["content-type"] == "application/zip"
    assert final.headers["content-disposition"] == 'attachment; filename="policy-server-clients.zip"'
    archive = unzip(final)
    top = {name.split("/")[0] for name in archive.namelist()}
    assert top == set(LANGUAGE_FOLDERS) | {"README.md", "openapi.json"}
    assert "python/policy_server_client/api/lpoc/predict.py" in archive.namelist()
    assert not [name for name in archive.namelist() if "/.ruff_cache/" in name]
    readme = archive.read("README.md").decode()
    assert all(f"- `{lang}/`" in readme for lang in LANGUAGE_FOLDERS) and "Missing" not in readme
    status = httpx.get(f"{server}/clients/status", headers=AUTH).json()
    assert status == {
        "status": "ready",
        "languages": dict.fromkeys(LANGUAGE_FOLDERS, "done"),
        "notes": {},
        "error": None,
    }


def test_the_zip_holds_no_api_key(answers: dict[str, Any]) -> None:
    archive = unzip(answers["final"])
    leaking = [name for name in archive.namelist() if API_KEY.encode() in archive.read(name)]
    assert leaking == []


def test_the_languages_filter_picks_folders(server: str, answers: dict[str, Any]) -> None:
    picked = httpx.get(f"{server}/clients", params={"languages": "go,python"}, headers=AUTH)
    assert picked.status_code == 200
    top = {name.split("/")[0] for name in unzip(picked).namelist()}
    assert top == {"python", "go", "README.md", "openapi.json"}


def test_an_unknown_language_is_a_422(server: str) -> None:
    answer = httpx.get(f"{server}/clients", params={"languages": "python,cobol"}, headers=AUTH)
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "invalid_request" and "cobol" in error["message"]
    assert error["fields"][0]["field"] == "query.languages"


def test_the_api_key_is_required(server: str) -> None:
    for headers, status, code in (({}, 401, "unauthorized"), ({"access-token": "wrong"}, 403, "forbidden")):
        for path in ("/clients", "/clients/status"):
            answer = httpx.get(f"{server}{path}", headers=headers)
            assert answer.status_code == status and answer.json()["error"]["code"] == code


def test_the_route_is_documented(server: str) -> None:
    document = httpx.get(f"{server}/openapi.json").json()
    operation = document["paths"][f"{PREFIX}/clients"]["get"]
    assert "application/zip" in operation["responses"]["200"]["content"]
    assert {"403", "422", "503"} <= set(operation["responses"])
    assert operation["parameters"][0]["name"] == "languages"
    assert operation["parameters"][0]["schema"]["pattern"] == LANGUAGES_PATTERN


def test_a_restarted_server_prebuilds_from_the_cache(settings: Settings, answers: dict[str, Any]) -> None:
    """Same schema, same cache: with clients_prebuild the start-up finds every SDK cached."""
    assert answers["final"].status_code == 200
    with TestClient(build_app(settings.model_copy(update={"clients_prebuild": True}))) as client:
        assert client.get(f"{PREFIX}/clients/status", headers=AUTH).json()["status"] == "ready"
        answer = client.get(f"{PREFIX}/clients", params={"languages": "python"}, headers=AUTH)
    assert answer.status_code == 200
    assert {name.split("/")[0] for name in unzip(answer).namelist()} == {
        "python",
        "README.md",
        "openapi.json",
    }
