"""Start-up under uvicorn: a signal cancels it, and a refusal is logged as one line."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import pytest

from policy_server.errors import SchemaError
from policy_server.gateway.startup import OneLineRefusal, cancel_on_signal
from policy_server.serving.runtime.serve import ServeRuntime
from policy_server.settings import Settings


def test_a_signal_during_start_up_cancels_the_start_and_still_reaches_uvicorns_handler() -> None:
    runtime = ServeRuntime(Settings())
    received: list[int] = []

    def uvicorns(sig: int, frame: FrameType | None) -> None:
        received.append(sig)

    before = signal.signal(signal.SIGINT, uvicorns)
    try:
        with cancel_on_signal(runtime):
            signal.raise_signal(signal.SIGINT)
        assert runtime.cancelled.is_set()
        assert received == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is uvicorns  # put back once start-up is over
    finally:
        signal.signal(signal.SIGINT, before)


def record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, msg, (), None)


def test_a_refused_start_up_is_logged_as_its_reason_once() -> None:
    refusal = OneLineRefusal()
    traceback = "Traceback (most recent call last):\n  File ...\npolicy_server.errors.SchemaError: ..."
    assert refusal.filter(record(traceback)) and record(traceback).getMessage() == traceback  # nothing refused
    refusal.refuse(SchemaError("the schema asks Ray for 5 CPUs and the cluster has 2: ..."))
    rewritten = record(traceback)
    assert refusal.filter(rewritten)
    assert rewritten.getMessage() == "policy-server: the schema asks Ray for 5 CPUs and the cluster has 2: ..."
    later = record(traceback)
    refusal.filter(later)
    assert later.getMessage() == traceback  # only the record of that start-up


def test_steps_start_together_and_the_first_failure_cancels_the_others_waits() -> None:
    import asyncio

    from policy_server.errors import StartupError
    from policy_server.gateway.startup import start_together
    from policy_server.serving.runtime.local import LocalRuntime

    runtime = ServeRuntime(Settings())
    ended: list[str] = []

    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise StartupError("the policy's app failed")

    async def waits() -> None:  # a deployment wait that stops once start-up is cancelled
        while not runtime.cancelled.is_set():
            await asyncio.sleep(0.01)
        ended.append("waited")

    with pytest.raises(StartupError, match="the policy's app failed"):
        asyncio.run(asyncio.wait_for(start_together(runtime, waits(), fails()), 10))
    assert ended == ["waited"] and runtime.cancelled.is_set()

    one_at_a_time = LocalRuntime.__new__(LocalRuntime)  # its steps run in turn; none is left un-awaited
    later = waits()
    with pytest.raises(StartupError):
        asyncio.run(start_together(one_at_a_time, fails(), later))
    assert later.cr_frame is None  # closed, not pending
