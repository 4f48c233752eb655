"""What makes openapi-generator's Java SDK compile, offline, with the Jackson jars Debian packages.

Two pure steps around the generator (library ``native``: java.net.http and Jackson 2):

* ``java_document``: openapi-generator's Java templates turn an ``anyOf`` with an array member
  (our ``action``: an int, a list of ints or a list of floats) into code that does not compile
  (``List<Integer>.class``; openapi-generator issue #12911). Such a union becomes an untyped
  value (``Object``: Jackson reads an Integer or a List), with its description kept.
* ``use_http_1_1``: the JDK's HttpClient speaks HTTP/2 by default, which over ``http://``
  means an ``Upgrade: h2c`` on every request; uvicorn with httptools ignores the upgrade but
  also drops the request body (uvicorn issue #2722), so every POST would arrive empty. The
  generated client's default builder asks for HTTP/1.1.
* ``drop_java_time``: the generated client always registers Jackson's java.time module
  (jackson-datatype-jsr310), which Debian does not package. The API has no date or time fields,
  so the module is unused: its two classes and the lines registering it are removed.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from policy_server.errors import ClientGenerationFailed

JAVA_OPTIONS = {
    "library": "native",
    "openApiNullable": "false",
    "annotationLibrary": "none",
    "hideGenerationTimestamp": "true",
    "groupId": "policyserver",
    "artifactId": "policy-server-client",
    "invokerPackage": "policyserver.client",
    "apiPackage": "policyserver.client.api",
    "modelPackage": "policyserver.client.model",
}
JAVA_CLASSPATH_JARS = (
    "jackson-databind.jar",
    "jackson-core.jar",
    "jackson-annotations.jar",
    "jsr305.jar",  # javax.annotation.Nullable
    "geronimo-annotation-1.3-spec.jar",  # javax.annotation.Generated (left the JDK in Java 11)
)
"""Jars (under /usr/share/java, from Debian packages) the generated main sources compile against."""
JAVA_PATCHES = ("untyped-array-unions", "http-1.1", "no-java-time")
"""What we change in the generated Java SDK (part of the cache key: a new patch, new SDKs)."""
_DEFAULT_BUILDER = "return HttpClient.newBuilder();"

_TIME_FORMATS = {"date", "date-time", "time"}
_JAVA_TIME_LINE = re.compile(r"jsr310|new JavaTimeModule\(\)|new RFC3339JavaTimeModule\(\)")


def java_document(document: dict[str, Any]) -> dict[str, Any]:
    """A copy of the OpenAPI document with every array-bearing ``anyOf``/``oneOf`` made untyped."""
    doc = copy.deepcopy(document)
    _untype_array_unions(doc)
    return doc


def _untype_array_unions(node: Any) -> None:
    if isinstance(node, list):
        for item in node:
            _untype_array_unions(item)
        return
    if not isinstance(node, dict):
        return
    for key in ("anyOf", "oneOf"):
        members = node.get(key)
        if isinstance(members, list):
            typed = [m for m in members if not (isinstance(m, dict) and m.get("type") == "null")]
            if len(typed) > 1 and any(isinstance(m, dict) and m.get("type") == "array" for m in typed):
                del node[key]
    for value in node.values():
        _untype_array_unions(value)


def uses_time_formats(document: Any) -> bool:
    """Whether any schema of the document is a date or time string (then java.time stays)."""
    if isinstance(document, dict):
        if document.get("format") in _TIME_FORMATS:
            return True
        return any(uses_time_formats(v) for v in document.values())
    if isinstance(document, list):
        return any(uses_time_formats(v) for v in document)
    return False


def drop_java_time(sdk: Path) -> None:
    """Remove the jackson-datatype-jsr310 classes and their registration from a generated SDK."""
    for path in sdk.rglob("src/main/java/**/*.java"):
        if path.name in ("RFC3339InstantDeserializer.java", "RFC3339JavaTimeModule.java"):
            path.unlink()
        elif path.name in ("ApiClient.java", "JSON.java"):
            lines = path.read_text().splitlines(keepends=True)
            path.write_text("".join(line for line in lines if not _JAVA_TIME_LINE.search(line)))


def use_http_1_1(sdk: Path) -> None:
    """Make the generated ApiClient's default HttpClient speak HTTP/1.1 (no h2c upgrade)."""
    for path in sdk.rglob("src/main/java/**/ApiClient.java"):
        text = path.read_text()
        if _DEFAULT_BUILDER not in text:
            raise ClientGenerationFailed(f"{path.name}: no `{_DEFAULT_BUILDER}` to patch (openapi-generator changed)")
        path.write_text(text.replace(_DEFAULT_BUILDER, "return HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1);"))
