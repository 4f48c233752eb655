"""The client's HTTP layer: one session that retries what is worth retrying, and the server's
error envelope ``{"error": {code, message, status, fields}}`` read in one place.

Imports only httpx, so the streamlit demo (``policy_server.frontend.gateway_api``) reads the
envelope with the same function.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import httpx

RETRY_STATUSES = (429, 503)
"""Answers that mean "not now": retried with backoff (``Retry-After`` honoured)."""


class ErrorEnvelope(NamedTuple):
    """The server's error envelope: HTTP status, machine-readable code, message, field errors."""

    status: int
    code: str
    message: str
    fields: list[dict[str, str]]


def error_envelope(response: httpx.Response) -> ErrorEnvelope:
    """The envelope of an error answer. An answer that is not the envelope (a proxy's page, say)
    gets code ``http_error`` and the start of its text (or the reason phrase) as its message."""
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
        return ErrorEnvelope(response.status_code, code, message, list(error.get("fields") or []))
    except (ValueError, KeyError, TypeError, AttributeError):
        text = response.text.strip()[:500] or response.reason_phrase
        return ErrorEnvelope(response.status_code, "http_error", text, [])


class PolicyClientError(Exception):
    """The server refused a request (its error envelope), or could not be reached.

    ``status`` is the HTTP status, or None when no answer came (``code`` "connection_error");
    ``code``, ``message`` and ``fields`` are the server's envelope.
    """

    def __init__(
        self, status: int | None, code: str, message: str, fields: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(f"{status or 'no answer'} {code}: {message}")
        self.status, self.code, self.message, self.fields = status, code, message, fields or []

    @classmethod
    def from_response(cls, response: httpx.Response) -> PolicyClientError:
        return cls(*error_envelope(response))


class HttpSession:
    """An httpx client to one server that retries connection errors, 429 and 503.

    Retry ``k`` waits about ``min(backoff_cap_s, backoff_base_s * 2**k)`` (equal jitter, seeded
    by ``seed``), or the server's ``Retry-After`` if that is longer; ``on_retry`` is called
    before each wait. Not thread-safe.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout: float,
        max_retries: int,
        backoff_base_s: float,
        backoff_cap_s: float,
        seed: int | None = None,
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        self.max_retries, self.backoff_base_s, self.backoff_cap_s = max_retries, backoff_base_s, backoff_cap_s
        self._on_retry = on_retry
        self._jitter = random.Random(seed)
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"access-token": api_key} if api_key else {},
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def backoff_s(self, attempt: int) -> float:
        """The exponential delay of retry ``attempt`` (0-based), capped."""
        return min(self.backoff_cap_s, self.backoff_base_s * 2**attempt)

    def request(
        self, method: str, path: str, json: Any = None, headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        """Send one request (a ``json`` body, or ``content`` bytes with their ``Content-Type`` in
        ``headers``), retrying connection errors, 429 and 503; raise on any other error.

        A 304 is returned, not raised. Raises PolicyClientError after the last retry. A request
        whose answer was lost (a read timeout) is sent again, so the server may get an experience
        post twice.
        """
        for attempt in range(self.max_retries + 1):
            last_try = attempt == self.max_retries
            try:
                response = self._http.request(method, path, json=json, headers=headers, content=content)
            except httpx.TransportError as exc:
                if last_try:
                    raise PolicyClientError(None, "connection_error", f"{method} {path}: {exc!r}") from exc
                self._sleep_before_retry(attempt, None)
                continue
            if response.status_code < 400:
                return response
            if response.status_code not in RETRY_STATUSES or last_try:
                raise PolicyClientError.from_response(response)
            self._sleep_before_retry(attempt, _retry_after(response))
        raise AssertionError("unreachable")

    def _sleep_before_retry(self, attempt: int, retry_after: float | None) -> None:
        """Equal jitter: half the exponential delay, plus up to as much again at random."""
        delay = self.backoff_s(attempt)
        if self._on_retry is not None:
            self._on_retry()
        time.sleep(max(retry_after or 0.0, delay / 2 + self._jitter.uniform(0, delay / 2)))


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None
