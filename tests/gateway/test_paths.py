"""``normalize_path`` and ``PathNormalizer``: trailing slashes and a stripped ``url_path`` reach the declared routes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from policy_server.gateway.paths import PathNormalizer, normalize_path

SLASH_ROUTES = frozenset({"/api/v1/", "/api/v1/llm/"})


@pytest.mark.parametrize(
    ("sent", "prefix", "routed"),
    [
        ("/predict/", "", "/predict"),
        ("/predict//", "", "/predict"),
        ("/predict", "", "/predict"),
        ("/", "", "/"),
        ("", "", "/"),
        ("/llm/forward/abc/", "", "/llm/forward/abc"),
        ("/predict", "/api/v1", "/api/v1/predict"),
        ("/predict/", "/api/v1", "/api/v1/predict"),
        ("/api/v1/predict/", "/api/v1", "/api/v1/predict"),
        ("/api/v1/predict", "/api/v1", "/api/v1/predict"),
        ("/api/v1", "/api/v1", "/api/v1/"),
        ("/", "/api/v1", "/api/v1/"),
        ("/llm", "/api/v1", "/api/v1/llm/"),
        ("/api/v1/llm/", "/api/v1", "/api/v1/llm/"),
        ("/api/v1x/predict", "/api/v1", "/api/v1/api/v1x/predict"),  # a prefix ends at a segment
    ],
)
def test_paths_map_onto_the_declared_routes(sent: str, prefix: str, routed: str) -> None:
    slash = SLASH_ROUTES if prefix else frozenset({"/"})
    assert normalize_path(sent, prefix, slash) == routed


def seen_scope(scope: dict[str, Any], prefix: str = "/api") -> tuple[dict[str, Any], dict[str, Any]]:
    """(the scope the app saw, the scope the server passed) for one request through the middleware."""
    seen: dict[str, Any] = {}

    async def app(inner: dict[str, Any], receive: Any, send: Any) -> None:
        seen.update(inner)

    asyncio.run(PathNormalizer(app, prefix, frozenset({"/api/"}))(scope, None, None))  # type: ignore[arg-type]
    return seen, scope


def test_the_middleware_keeps_root_path_and_leaves_the_servers_scope_alone() -> None:
    sent = {"type": "http", "path": "/ext/predict/", "root_path": "/ext", "raw_path": b"/ext/predict/"}
    seen, original = seen_scope(dict(sent))
    assert seen["path"] == "/ext/api/predict" and seen["root_path"] == "/ext"
    assert seen["raw_path"] == b"/ext/api/predict"
    assert original == sent  # uvicorn's access log shows what the client sent
    lifespan = {"type": "lifespan"}
    assert seen_scope(dict(lifespan))[0] == lifespan
