"""How the gateway's start-up behaves under uvicorn: Ctrl-C stops it, and a refusal reads as one line.

uvicorn runs the app's lifespan start-up to its end before it looks at a signal (its handler only
marks the server to exit), and logs a failed start-up as the whole traceback that Starlette
formatted. Neither library offers a hook for either, hence these two small pieces.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from policy_server.errors import PolicyServerError
from policy_server.serving.runtime import Runtime

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def cancel_on_signal(runtime: Runtime) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM also cancel ``runtime``'s start (then reach the handlers
    that were there: uvicorn's). Only the main thread can set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def cancel(sig: int, frame: FrameType | None) -> None:
        runtime.cancel_start()
        handler = previous[sig]
        if callable(handler):
            handler(sig, frame)

    for sig in STOP_SIGNALS:
        signal.signal(sig, cancel)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def start_together(runtime: Runtime, *steps: Awaitable[Any]) -> None:
    """Await start-up steps that do not depend on each other at once, so their waits overlap.

    When one fails, the others' waits are cancelled (``runtime.cancel_start``); all are let end (a
    deployment half started is then one ``Runtime.stop`` deletes), and the first failure is raised.
    A runtime that cannot start things at once (``starts_concurrently`` false) awaits them in turn.
    """
    if not runtime.starts_concurrently:
        pending = list(steps)
        try:
            while pending:
                await pending.pop(0)
        finally:  # after a failure the steps not begun are closed, never left un-awaited
            for awaitable in pending:
                getattr(awaitable, "close", lambda: None)()
        return
    failures: list[BaseException] = []

    async def step(awaitable: Awaitable[Any]) -> None:
        try:
            await awaitable
        except BaseException as exc:  # noqa: BLE001 - the first is raised below, after every step ended
            failures.append(exc)
            runtime.cancel_start()

    await asyncio.gather(*(step(s) for s in steps))
    if failures:
        raise failures[0]


class OneLineRefusal(logging.Filter):
    """Logs a start-up that failed on a ``PolicyServerError`` (the schema asks for more than the
    cluster has, a deployment did not start) as ``policy-server: <reason>``, not as a traceback.

    The lifespan calls ``refuse`` with the error; the filter then rewrites the next record that
    carries a traceback: uvicorn's report of ``lifespan.startup.failed``, logged after the lifespan
    has already ended (so the filter stays installed).
    """

    def __init__(self) -> None:
        super().__init__()
        self.refused: PolicyServerError | None = None

    def refuse(self, error: PolicyServerError) -> None:
        self.refused = error

    def filter(self, record: logging.LogRecord) -> bool:
        if self.refused is not None and isinstance(record.msg, str) and record.msg.startswith("Traceback"):
            record.msg, record.args = f"policy-server: {self.refused.message}", ()
            self.refused = None
        return True


REFUSAL = OneLineRefusal()


def install_one_line_refusal() -> OneLineRefusal:
    """Put ``REFUSAL`` on uvicorn's error logger (once per process)."""
    logger = logging.getLogger("uvicorn.error")
    if REFUSAL not in logger.filters:
        logger.addFilter(REFUSAL)
    return REFUSAL


def restore_python_signal_handlers() -> None:
    """ray.init puts its own SIGTERM handler in front of uvicorn's, which then aborts the process
    mid-shutdown and leaves Ray's processes behind; give the signals back to Python's handlers."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.getsignal(sig))
