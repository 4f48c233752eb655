"""``GET /clients``: client SDKs generated from this server's OpenAPI document, as one zip.

Generation starts on the first request (or at start-up with ``clients_prebuild``) and runs in a
background thread; until it has ended the answer is a 503 ``clients_not_ready`` with Retry-After.
"""

# No `from __future__ import annotations`: FastAPI must see the models as real types.

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Query, Response

from policy_server.gateway.auth import Auth
from policy_server.gateway.openapi import AUTH_ERRORS, error_docs
from policy_server.gateway.sdks.wire import ClientsStatus
from policy_server.sdks import LANGUAGES, ClientSDKs, parse_languages
from policy_server.sdks.bundle import ZIP_NAME
from policy_server.sdks.languages import LANGUAGES_PATTERN

CLIENTS_ERRORS = error_docs(
    {
        **AUTH_ERRORS,
        422: "Unknown language in `languages`.",
        500: "`client_generation_failed`: the generation itself broke.",
        503: "`clients_not_ready`: the SDKs are being generated; retry after `Retry-After` seconds.",
    }
)
ZIP_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A zip with one folder per language, README.md (what was generated, what is "
        "missing and why) and openapi.json.",
        "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
    }
}




def clients_router(sdks: ClientSDKs, openapi: Callable[[], dict[str, Any]], auth: Auth) -> APIRouter:
    """The SDK download and its progress, behind the api key."""
    router = APIRouter(tags=["clients"], dependencies=[Depends(auth)], responses=CLIENTS_ERRORS)

    @router.get("/clients", response_class=Response, responses=ZIP_DOC)
    async def get_clients(
        languages: str | None = Query(
            None,
            description=f"Comma-separated subset of {', '.join(LANGUAGES)}; default: all.",
            examples=["python,go"],
            json_schema_extra={"pattern": LANGUAGES_PATTERN},  # checked by parse_languages, which names the unknown
        ),
    ) -> Response:
        """Client SDKs for this server (Python; Java, Scala, R, TypeScript and Go when the server
        has a Java runtime), generated once from its OpenAPI document and cached."""
        chosen = parse_languages(languages)
        await asyncio.to_thread(sdks.start, openapi())  # writes the documents it reads
        archive = await asyncio.to_thread(sdks.bundle, chosen)
        disposition = f'attachment; filename="{ZIP_NAME}"'
        return Response(archive, media_type="application/zip", headers={"Content-Disposition": disposition})

    @router.get("/clients/status", response_model=ClientsStatus)
    async def clients_status() -> dict[str, Any]:
        """How far the SDK generation is (it does not start it)."""
        return sdks.progress().as_dict()

    return router
