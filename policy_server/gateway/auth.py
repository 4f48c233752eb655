"""The api key checks of the routes: ``access-token`` (header, query parameter or cookie, as the
Pathmind server took it) and, on the OpenAI-compatible routes, ``Authorization: Bearer``.

Prefer the header: a query parameter is part of the URL, which proxies and access logs write down
(our own logs mask it: ``gateway.redact``).

What is answered (RFC 9110 §11.6.1 and §15.5.4):

- no key: 401 with ``WWW-Authenticate`` naming how to send one (``APIKey ... header="access-token"``,
  or ``Bearer realm="policy-server"`` on the OpenAI routes);
- a key that opens nothing here (wrong, or another policy's): 403 on the ``access-token`` routes,
  as the Pathmind server answered; 401 with ``Bearer ... error="invalid_token"`` on the OpenAI
  routes, as OpenAI answers (RFC 6750 §3.1).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from fastapi import Security
from fastapi.security import APIKeyCookie, APIKeyHeader, APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from policy_server.errors import Forbidden, SettingsError, Unauthorized
from policy_server.gateway.keys import LLM_SCOPE, KeySet, KeysFile, KeysFileError, parse_keys, policy_scope
from policy_server.schema.config import ServerSchema
from policy_server.settings import Settings

KEY_NAME = "access-token"
REALM = "policy-server"
API_KEY_CHALLENGE = f'APIKey realm="{REALM}", header="{KEY_NAME}"'
BEARER_CHALLENGE = f'Bearer realm="{REALM}"'
_header = APIKeyHeader(name=KEY_NAME, auto_error=False)
_query = APIKeyQuery(name=KEY_NAME, auto_error=False)
_cookie = APIKeyCookie(name=KEY_NAME, auto_error=False)
_bearer = HTTPBearer(auto_error=False)


Auth = Callable[..., Awaitable[None]]
"""A FastAPI dependency that refuses a request without the right key (401/403) and returns nothing."""


class ApiKeys:
    """The keys the server takes: fixed ones (schema, environment) and a keys file's current ones.

    ``required`` is decided once, at start-up: when any key is configured (or a keys file is
    given), every protected route needs one, even if a rotation later empties the file; when none
    is, the routes are open.
    """

    def __init__(self, fixed: KeySet, file: KeysFile | None = None) -> None:
        self.fixed, self.file = fixed, file
        self.required = bool(fixed) or file is not None
        self._from_file, self._all = KeySet(), fixed

    def current(self) -> KeySet:
        """Every key valid now (re-reads the keys file when it changed)."""
        if self.file is not None and (keys := self.file.current()) is not self._from_file:
            self._from_file, self._all = keys, self.fixed | keys
        return self._all


def api_keys(settings: Settings, schema: ServerSchema) -> ApiKeys:
    """The keys of ``schema`` and ``settings``: ``POLICY_SERVER_API_KEY`` replaces the schema's
    server-wide keys; policies' and the llm section's own keys stay; the keys file adds its own.

    Raises SettingsError when ``POLICY_SERVER_API_KEYS_FILE`` cannot be read or is invalid.
    """
    def plain(keys: Iterable[SecretStr]) -> list[str]:
        return [k.get_secret_value() for k in keys]

    scoped = {policy_scope(name): plain(keys) for name, keys in schema.policy_keys.items()}
    server = [settings.api_key] if settings.api_key is not None else schema.api_keys
    fixed = KeySet.of(plain(server), scoped | {LLM_SCOPE: plain(schema.llm_keys)})
    if settings.api_keys_file is None:
        return ApiKeys(fixed)

    def parse(text: str) -> KeySet:
        return parse_keys(text, schema.policies, schema.llm is not None)

    try:
        return ApiKeys(fixed, KeysFile(settings.api_keys_file, parse))
    except KeysFileError as exc:
        raise SettingsError(f"POLICY_SERVER_API_KEYS_FILE: {settings.api_keys_file}: {exc}") from None


def api_key_checker(keys: ApiKeys, scope: str | None) -> Auth:
    """A dependency that lets a request through when one of its ``access-token`` keys opens
    ``scope`` (``keys.policy_scope(name)``, ``keys.LLM_SCOPE``, or None for any valid key), or
    when no key is required. Raises Unauthorized (401) without a key, Forbidden (403) with a
    key that does not open ``scope``."""
    what = "this route" if scope is None else f"`{scope}`"

    async def check(
        header: str | None = Security(_header),
        query: str | None = Security(_query),
        cookie: str | None = Security(_cookie),
    ) -> None:
        if not keys.required:
            return
        given = [k for k in (header, query, cookie) if k]
        if not given:
            raise Unauthorized(
                f"missing api key: send it as the `{KEY_NAME}` header, query parameter or cookie", API_KEY_CHALLENGE
            )
        if not keys.current().admits(given, scope):
            raise Forbidden(f"wrong api key for {what}: send a server-wide key or one of its own as the "
                            f"`{KEY_NAME}` header, query parameter or cookie")

    return check


def bearer_checker(keys: ApiKeys, scope: str | None) -> Auth:
    """For the OpenAI-compatible routes: ``Authorization: Bearer <key>`` as OpenAI clients send
    it, or the ``access-token`` header. Raises Unauthorized (401, as OpenAI answers) when the key
    is missing or does not open ``scope``."""

    async def check(
        bearer: HTTPAuthorizationCredentials | None = Security(_bearer),
        header: str | None = Security(_header),
    ) -> None:
        if not keys.required:
            return
        given = [k for k in (bearer.credentials if bearer else None, header) if k]
        if not given:
            raise Unauthorized("missing api key: send `Authorization: Bearer <key>`", BEARER_CHALLENGE)
        if not keys.current().admits(given, scope):
            raise Unauthorized("wrong api key: send `Authorization: Bearer <key>` with a key of this server",
                               f'{BEARER_CHALLENGE}, error="invalid_token"')

    return check
