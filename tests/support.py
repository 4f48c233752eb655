"""Helpers the tests share that are not fixtures (those live in conftest.py): ``from support import ...``."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx

T = TypeVar("T")
Message = str | Callable[[], str]


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
               message: Message = "condition not met") -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy; return that.

    Fails the test (AssertionError) after ``timeout`` seconds with ``message``, or with what
    ``message()`` returns then (a log's tail, the last status). ``predicate`` may itself raise
    to fail at once (a server process that exited, say).
    """
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() >= deadline:
            raise AssertionError(f"{_text(message)} (waited {timeout:g} s)")
        time.sleep(interval)
    return result


async def wait_until_async(predicate: Callable[[], T | Awaitable[T]], timeout: float = 30.0,
                           interval: float = 0.001, message: Message = "condition not met") -> T:
    """``wait_until`` inside an event loop: sleeps with ``asyncio.sleep`` so other tasks run;
    ``predicate`` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise AssertionError(f"{_text(message)} (waited {timeout:g} s)")
        await asyncio.sleep(interval)


def _text(message: Message) -> str:
    return message() if callable(message) else message


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 180.0) -> None:
    """Poll ``url``/health/ready until it answers 200; fail with the log's end if the server exits
    or is not ready after ``timeout`` seconds."""
    def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(f"{url}/health/ready").status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout, 0.5, lambda: "not ready; log: " + log.read_text()[-3000:])
