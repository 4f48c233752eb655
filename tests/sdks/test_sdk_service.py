"""ClientSDKs on its own: the cache, a missing Java, a failing generator, the languages filter."""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import API_KEY, multi_policy_schema

from policy_server.errors import ClientsNotReady, InvalidRequest
from policy_server.gateway.app import build_app
from policy_server.sdks import ClientSDKs, cache_key, parse_languages
from policy_server.sdks.generators import tool_versions
from policy_server.sdks.java import drop_java_time, java_document, uses_time_formats
from policy_server.sdks.languages import LANGUAGES_PATTERN
from policy_server.settings import Settings


@pytest.fixture(scope="module")
def document(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("schema") / "schema.yaml"
    path.write_text(yaml.safe_dump(multi_policy_schema(model_dir), sort_keys=False))
    return build_app(Settings(schema_path=path, backend="local", gateway_metrics_port=0)).openapi()


def names(archive: bytes) -> set[str]:
    return set(zipfile.ZipFile(io.BytesIO(archive)).namelist())


def test_a_second_run_reuses_the_cache_and_regenerates_nothing(
    document: dict[str, Any], tmp_path: Path
) -> None:
    first = ClientSDKs(tmp_path, languages=["python"])
    assert first.generate(document).languages == {"python": "done"}
    assert first.folder is not None
    marker = first.folder / "python" / "setup.py"
    before = marker.stat().st_mtime_ns

    second = ClientSDKs(tmp_path, languages=["python"])
    second.start(document)  # everything cached: ready on return, no thread, no generator run
    assert second.progress().status == "ready"
    assert marker.stat().st_mtime_ns == before
    assert [p.name for p in tmp_path.iterdir()] == [first.folder.name]
    assert "python/setup.py" in names(second.bundle())


def test_the_cache_key_follows_the_document_and_the_generators(document: dict[str, Any]) -> None:
    versions = tool_versions()
    assert cache_key(document, versions) == cache_key(dict(reversed(list(document.items()))), versions)
    assert cache_key(document, versions) != cache_key(document | {"info": {"title": "x"}}, versions)
    assert cache_key(document, versions) != cache_key(document, versions | {"openapi-generator-cli": "0"})


def test_without_java_the_zip_says_what_to_install_and_still_has_python(
    document: dict[str, Any], tmp_path: Path
) -> None:
    sdks = ClientSDKs(tmp_path, java=str(tmp_path / "no-java-here"))
    progress = sdks.generate(document)
    assert progress.status == "ready"
    assert progress.languages == {"python": "done"} | {
        lang: "missing" for lang in ("java", "scala", "r", "typescript", "go")
    }
    archive = sdks.bundle()
    files = zipfile.ZipFile(io.BytesIO(archive))
    missing = files.read("MISSING.md").decode()
    assert (
        "need a Java runtime" in missing
        and "no-java-here not found" in missing
        and "apt-get install" in missing
    )
    assert "Missing: java, scala, r, typescript, go" in files.read("README.md").decode()
    assert any(name.startswith("python/policy_server_client/") for name in files.namelist())
    assert not any(name.startswith(("java/", "go/")) for name in files.namelist())


def test_a_failing_generator_is_recorded_and_the_others_are_kept(
    document: dict[str, Any], tmp_path: Path
) -> None:
    # A real java, except that the Go generator fails the way a crashing generator does.
    java = tmp_path / "java"
    java.write_text(
        f'#!/bin/sh\ncase "$*" in *"-g go "*) echo "Exception: go templates exploded" >&2; exit 3;; '
        f'esac\nexec {shutil.which("java")} "$@"\n'
    )
    java.chmod(java.stat().st_mode | stat.S_IXUSR)
    sdks = ClientSDKs(tmp_path / "cache", java=str(java), languages=["python", "typescript", "go"])
    progress = sdks.generate(document)
    assert progress.languages == {"python": "done", "typescript": "done", "go": "failed"}
    assert (
        progress.notes["go"].startswith("exit status 3") and "go templates exploded" in progress.notes["go"]
    )
    readme = zipfile.ZipFile(io.BytesIO(sdks.bundle())).read("README.md").decode()
    assert "Failed: go" in readme and "go templates exploded" in readme
    assert sdks.folder is not None and not (sdks.folder / "go").exists()  # failures are not cached
    assert not [p for p in sdks.folder.iterdir() if p.name.startswith(".go-")]  # nor left half-written


def test_a_generator_past_its_timeout_is_killed_and_recorded(
    document: dict[str, Any], tmp_path: Path
) -> None:
    sdks = ClientSDKs(tmp_path, timeout_s=0.05, languages=["python"])
    progress = sdks.generate(document)
    assert progress.languages == {"python": "failed"}
    assert "timeout" in progress.notes["python"]


def test_nothing_is_bundled_before_the_generation_has_ended(tmp_path: Path) -> None:
    with pytest.raises(ClientsNotReady, match=r"0/6 languages done"):
        ClientSDKs(tmp_path).bundle()
    assert ClientsNotReady.status == 503 and ClientsNotReady.retry_after_s


def test_the_languages_filter() -> None:
    assert parse_languages(None) == ["python", "java", "scala", "r", "typescript", "go"]
    assert parse_languages("Go, python") == ["python", "go"]
    assert parse_languages(("java",)) == ["java"]
    with pytest.raises(InvalidRequest, match="unknown language.*cobol.*choose from python") as caught:
        parse_languages("python,cobol")
    assert caught.value.fields[0].field == "query.languages"
    with pytest.raises(InvalidRequest, match="no language given"):
        parse_languages(",")


@pytest.mark.parametrize("value", ["python,go", "Go, python", " r ", "TypeScript", "python,,go", ",", "", "cobol",
                                   "python;go", "py thon"])
def test_the_documented_languages_pattern_is_what_the_filter_takes(value: str) -> None:
    """`GET /clients` documents LANGUAGES_PATTERN; the filter takes exactly what it matches."""
    try:
        parse_languages(value)
        taken = True
    except InvalidRequest:
        taken = False
    assert taken == bool(re.search(LANGUAGES_PATTERN, value))


def test_the_java_document_untypes_array_unions_only(document: dict[str, Any]) -> None:
    action = document["components"]["schemas"]["ActionResponse"]["properties"]["action"]
    assert "anyOf" in action
    fixed = java_document(document)
    assert "anyOf" not in fixed["components"]["schemas"]["ActionResponse"]["properties"]["action"]
    assert "description" in fixed["components"]["schemas"]["ActionResponse"]["properties"]["action"]
    assert "anyOf" in action  # the original is left alone
    nullable_number = {"anyOf": [{"type": "number"}, {"type": "null"}]}
    assert java_document({"x": nullable_number}) == {"x": nullable_number}
    assert not uses_time_formats(document) and uses_time_formats({"a": [{"format": "date-time"}]})


def test_drop_java_time_removes_the_module_and_its_registration(tmp_path: Path) -> None:
    source = tmp_path / "src/main/java/policyserver/client"
    source.mkdir(parents=True)
    (source / "RFC3339JavaTimeModule.java").write_text("class RFC3339JavaTimeModule {}\n")
    (source / "JSON.java").write_text(
        "import com.fasterxml.jackson.datatype.jsr310.JavaTimeModule;\nclass JSON {\n"
        "  Object m = builder()\n        .addModule(new JavaTimeModule())\n        .build();\n}\n"
    )
    drop_java_time(tmp_path)
    assert os.listdir(source) == ["JSON.java"]
    assert (
        source / "JSON.java"
    ).read_text() == "class JSON {\n  Object m = builder()\n        .build();\n}\n"


def test_the_api_key_is_in_no_generated_file(document: dict[str, Any], tmp_path: Path) -> None:
    sdks = ClientSDKs(tmp_path, languages=["python"])
    sdks.generate(document)
    archive = sdks.bundle()
    assert API_KEY.encode() not in archive
    for name in names(archive):
        assert API_KEY.encode() not in zipfile.ZipFile(io.BytesIO(archive)).read(name)
