"""The OpenAI router's server-sent events: an error after the first chunk is an ``error`` event
followed by ``[DONE]``, never a dropped connection (no Ray, no HTTP)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from policy_server.errors import BackendUnavailable
from policy_server.gateway.openai.router import _events


async def failing(error: Exception, closed: list[bool]) -> AsyncIterator[dict[str, Any]]:
    try:
        yield {"n": 2}
        raise error
    finally:
        closed.append(True)


def events(error: Exception) -> tuple[list[Any], list[bool]]:
    closed: list[bool] = []

    async def collect() -> list[str]:
        return [e async for e in _events({"n": 1}, failing(error, closed))]

    out = asyncio.run(collect())
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in out)
    bodies = [e[len("data: "):].strip() for e in out]
    return [body if body == "[DONE]" else json.loads(body) for body in bodies], closed


def test_a_policy_error_midstream_is_its_openai_error_event_then_done() -> None:
    out, closed = events(BackendUnavailable("the policy's replicas are gone"))
    assert out[:2] == [{"n": 1}, {"n": 2}] and out[3] == "[DONE]"
    assert out[2]["error"]["code"] == BackendUnavailable.code
    assert out[2]["error"]["type"] == "server_error"
    assert closed == [True]


def test_an_unexpected_error_midstream_is_a_500_event_naming_no_detail(caplog: pytest.LogCaptureFixture) -> None:
    out, closed = events(RuntimeError("secret detail"))
    assert out[2] == {"error": {"message": "internal error (RuntimeError); see the server log",
                                "type": "server_error", "param": None, "code": "internal_error"}}
    assert out[3] == "[DONE]" and closed == [True]
    assert "secret detail" in caplog.text  # logged with its traceback, never sent
