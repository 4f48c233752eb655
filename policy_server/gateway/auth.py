"""The ``access-token`` api key: header, query parameter or cookie (as the Pathmind server took it)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Security
from fastapi.security import APIKeyCookie, APIKeyHeader, APIKeyQuery
from pydantic import SecretStr

from policy_server.errors import Forbidden

KEY_NAME = "access-token"
_header = APIKeyHeader(name=KEY_NAME, auto_error=False)
_query = APIKeyQuery(name=KEY_NAME, auto_error=False)
_cookie = APIKeyCookie(name=KEY_NAME, auto_error=False)


def api_key_checker(expected: SecretStr | None) -> Callable[..., Awaitable[None]]:
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
        # compare_digest on every candidate: no early exit that would leak timing
        matches = [hmac.compare_digest(k.encode(), secret) for k in given]
        if not any(matches):
            what = "wrong" if given else "missing"
            raise Forbidden(
                f"{what} api key: send it as the `{KEY_NAME}` header, query parameter or cookie"
            )

    return check
