"""The ``access-token`` api key: header, query parameter or cookie (as the Pathmind server took it).

Prefer the header: a query parameter is part of the URL, which proxies and access logs write down
(our own logs mask it: ``gateway.redact``).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Security
from fastapi.security import APIKeyCookie, APIKeyHeader, APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from policy_server.errors import Forbidden, Unauthorized

KEY_NAME = "access-token"
_header = APIKeyHeader(name=KEY_NAME, auto_error=False)
_query = APIKeyQuery(name=KEY_NAME, auto_error=False)
_cookie = APIKeyCookie(name=KEY_NAME, auto_error=False)
_bearer = HTTPBearer(auto_error=False)


Auth = Callable[..., Awaitable[None]]
"""A FastAPI dependency that refuses a request without the right key (403/401) and returns nothing."""


def _matches(given: list[str], secret: bytes) -> bool:
    # compare_digest on every candidate: no early exit that would leak timing
    return any([hmac.compare_digest(k.encode(), secret) for k in given])


def api_key_checker(expected: SecretStr | None) -> Auth:
    """A dependency that lets a request through when any of its keys matches (or none is set)."""
    secret = expected.get_secret_value().encode() if expected else None

    async def check(
        header: str | None = Security(_header),
        query: str | None = Security(_query),
        cookie: str | None = Security(_cookie),
    ) -> None:
        if secret is None:
            return
        given = [k for k in (header, query, cookie) if k]
        if not _matches(given, secret):
            what = "wrong" if given else "missing"
            raise Forbidden(
                f"{what} api key: send it as the `{KEY_NAME}` header, query parameter or cookie"
            )

    return check


def bearer_checker(expected: SecretStr | None) -> Auth:
    """For the OpenAI-compatible routes: ``Authorization: Bearer <key>`` as OpenAI clients send
    it (401 when missing or wrong, as OpenAI answers), or the ``access-token`` header."""
    secret = expected.get_secret_value().encode() if expected else None

    async def check(
        bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
        header: str | None = Security(_header),
    ) -> None:
        if secret is None:
            return
        given = [k for k in (bearer.credentials if bearer else None, header) if k]
        if not _matches(given, secret):
            raise Unauthorized(f"{'wrong' if given else 'missing'} api key: send `Authorization: Bearer <key>`")

    return check
