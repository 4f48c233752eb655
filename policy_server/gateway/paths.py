"""Request paths as Pathmind's clients and ingress sent them, mapped onto our routes before routing.

Pathmind's routes were declared with a trailing slash (``/predict/``) and its clients post there;
its Kubernetes ingress stripped the schema's ``url_path`` before forwarding. Our routes are
declared once (the OpenAPI document lists each once), under ``/<url_path>``, without a trailing
slash except the status routes (``/``, ``/llm/``). ``PathNormalizer`` maps every spelling onto
them before routing, with no redirect (a client may not follow a 307, and following one sends
the body twice):

    /predict/                 → /predict
    /predict                  → /<url_path>/predict    (a proxy stripped the prefix)
    /<url_path>/predict/      → /<url_path>/predict
    /<url_path>  /  ""        → /<url_path>/           (a route declared with its slash)

Behind a proxy that strips the prefix, the documentation still works: ``/docs`` points Swagger UI
at ``/<url_path>/openapi.json`` and the OpenAPI paths carry ``/<url_path>``, so the browser and
"Try it out" go through the same public prefix, and a client that reaches the server directly is
answered on both spellings. A proxy that publishes the server under some other prefix tells it
with uvicorn's ``--root-path`` (ASGI ``root_path``), which this keeps.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, routing
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send


def normalize_path(route_path: str, prefix: str = "", slash_routes: frozenset[str] = frozenset({"/"})) -> str:
    """The declared route path that ``route_path`` (the path below ``root_path``) stands for.

    ``prefix`` is ``""`` or ``"/<url_path>"``; ``slash_routes`` are the declared paths that end
    with ``/``. With ``prefix="/api"`` and ``slash_routes={"/api/"}``: ``"/predict/"`` →
    ``"/api/predict"``, ``"/api/predict"`` → itself, ``"/api"`` → ``"/api/"``.
    """
    path = route_path.rstrip("/")
    if prefix and path != prefix and not path.startswith(prefix + "/"):
        path = prefix + path
    return path + "/" if path + "/" in slash_routes else path


def slash_routes(app: FastAPI) -> frozenset[str]:
    """The paths of ``app``'s routes that are declared with a trailing slash."""
    return frozenset(p for p in _route_paths(app) if p.endswith("/"))


def _route_paths(app: FastAPI) -> Iterable[str]:
    return [p for r in flat_routes(app) if isinstance(p := getattr(r, "path", None), str)]


def flat_routes(app: Starlette) -> list[Any]:
    """``app``'s routes, each as routing sees it: its full ``path``, ``methods`` and ``matches``
    (FastAPI 0.16x keeps included routers nested; its route contexts stand for the routes)."""
    contexts = getattr(routing, "iter_route_contexts", None)
    return list(contexts(app.routes)) if contexts is not None else list(app.routes)


class PathNormalizer:
    """Pure ASGI middleware: rewrites ``scope["path"]`` with ``normalize_path`` before routing.

    The scope is copied, not changed in place, so uvicorn's access log still shows the path the
    client sent.
    """

    def __init__(self, app: ASGIApp, prefix: str, slash_routes: frozenset[str]) -> None:
        self.app, self.prefix, self.slash_routes = app, prefix, slash_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        root_path: str = scope.get("root_path", "")
        path: str = scope["path"]
        # ASGI (and uvicorn >= 0.26) put root_path in front of path; routing sees what follows it
        below = path[len(root_path):] if root_path and path.startswith(root_path) else path
        wanted = normalize_path(below, self.prefix, self.slash_routes)
        if wanted != below:
            scope = dict(scope)
            scope["path"] = path[: len(path) - len(below)] + wanted
            scope["raw_path"] = quote(scope["path"]).encode("ascii")
        await self.app(scope, receive, send)
