"""``ServeRuntime`` on the session's Ray: start-up never waits without end."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from ray import serve
from support import wait_until

from policy_server.errors import StartupError
from policy_server.schema.config import ResourceSpec
from policy_server.schema.llm import LLMResources
from policy_server.serving.runtime.serve import ServeRuntime, direct_transport, last_line
from policy_server.settings import Settings


@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=0.5)  # deleted at once
class SlowToStart:
    """A replica whose constructor takes longer than any test waits (a model that loads for minutes)."""

    def __init__(self) -> None:
        time.sleep(600)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class FailsToStart:
    """A replica whose constructor refuses its configuration (as an engine refuses a bad setting)."""

    def __init__(self) -> None:
        raise ValueError("cpu_threads_bind '5' names cores [5] that this machine lacks")


@serve.deployment(ray_actor_options={"num_cpus": 64}, graceful_shutdown_timeout_s=0.5)
class TooBig:
    """A replica that asks for more CPUs than the session's Ray has (8)."""


def slow_runtime(**settings: Any) -> ServeRuntime:
    return ServeRuntime(Settings(serve_app_prefix="slow-start", **settings))


def start_in_thread(runtime: ServeRuntime, app: Any, name: str) -> tuple[threading.Thread, list[BaseException]]:
    """``runtime._run(app, name)`` in a thread (not yet started) and the list it puts what it raised in."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            runtime._run(app, name)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            failures.append(exc)

    return threading.Thread(target=run), failures


def test_an_app_that_does_not_start_in_time_fails_start_up_naming_it(ray_session: int) -> None:
    runtime = slow_runtime(start_timeout_s=3)
    began = time.monotonic()
    try:
        with pytest.raises(StartupError, match=r"Serve app slow-start-a did not start within 3 s \(POLICY_SERVER_START_TIMEOUT_S\)"):
            runtime._run(SlowToStart.bind(), "slow-start-a")
        assert time.monotonic() - began < 30
    finally:
        runtime._stop()
    assert "slow-start-a" not in serve.status().applications  # stop() deleted what had started


def test_a_cancelled_start_stops_waiting_at_once(ray_session: int) -> None:
    """What Ctrl-C does during start-up (the gateway's signal handler calls ``cancel_start``)."""
    runtime = slow_runtime()  # the default timeout: 900 s
    waiting, failures = start_in_thread(runtime, SlowToStart.bind(), "slow-start-b")
    waiting.start()
    try:
        time.sleep(2)
        runtime.cancel_start()
        waiting.join(timeout=10)
        assert not waiting.is_alive(), "the start did not stop when cancelled"
        assert len(failures) == 1 and isinstance(failures[0], StartupError)
        assert "start-up cancelled while Serve app slow-start-b was starting" in str(failures[0])
    finally:
        waiting.join(timeout=30)
        runtime._stop()


def test_an_app_whose_replicas_raise_fails_start_up_with_their_exception(ray_session: int) -> None:
    runtime = slow_runtime()
    try:
        with pytest.raises(StartupError) as failed:
            runtime._run(FailsToStart.bind(), "slow-start-c")
        assert str(failed.value).startswith("Serve app slow-start-c failed to start: ")
        assert str(failed.value).endswith(
            "; FailsToStart: ValueError: cpu_threads_bind '5' names cores [5] that this machine lacks")
    finally:
        runtime._stop()


def test_last_line_is_the_exception_of_a_traceback() -> None:
    assert last_line("Traceback (most recent call last):\n  File x\nValueError: bad\n\n") == "ValueError: bad"
    assert last_line("") == ""


def test_an_autoscaled_deployment_takes_every_request_through_the_serve_handle() -> None:
    """Serve's autoscaler counts the requests its handles route; the direct path would hide the load."""
    direct, through_handle = Settings(direct_transport=True), Settings(direct_transport=False)
    assert direct_transport(direct, ResourceSpec(num_replicas=2)) is True
    assert direct_transport(through_handle, ResourceSpec(num_replicas=2)) is False
    assert direct_transport(direct, ResourceSpec(num_replicas="auto", max_replicas=2)) is False
    assert direct_transport(direct, LLMResources(num_replicas="auto", max_replicas=2)) is False


def test_a_replica_no_node_places_fails_start_up_after_the_grace_naming_its_ask(ray_session: int) -> None:
    runtime = slow_runtime(placement_grace_s=2)
    runtime.asks["slow-start-d"] = {"CPU": 64.0, "GPU": 0.0}  # what _start notes from the schema
    began = time.monotonic()
    try:
        with pytest.raises(StartupError) as failed:
            runtime._run(TooBig.bind(), "slow-start-d")
        assert time.monotonic() - began < 15
    finally:
        runtime._stop()
    message = str(failed.value)
    assert message.startswith("deployment TooBig of Serve app slow-start-d cannot be placed: it asks for 64 CPU; "
                              "the cluster has free: ")
    assert " of 8 CPU, " in message and "POLICY_SERVER_WAIT_FOR_RESOURCES=true" in message


def test_with_wait_for_resources_it_keeps_waiting_and_says_so(ray_session: int, caplog: pytest.LogCaptureFixture) -> None:
    runtime = slow_runtime(placement_grace_s=1, wait_for_resources=True)
    waiting, failures = start_in_thread(runtime, TooBig.bind(), "slow-start-e")
    with caplog.at_level("WARNING", logger="policy_server.serving.runtime.serve"):
        waiting.start()
        try:
            wait_until(lambda: "still waiting for them" in caplog.text, 30, 0.2, "start-up did not say it waits")
            assert waiting.is_alive()
            runtime.cancel_start()
            waiting.join(timeout=10)
        finally:
            runtime.cancel_start()
            waiting.join(timeout=30)
            runtime._stop()
    assert "deployment TooBig of Serve app slow-start-e cannot be placed; the cluster has free: " in caplog.text
    assert len(failures) == 1 and "start-up cancelled" in str(failures[0])
