"""The runtime plug point: chosen once from the settings, typed services, no method names as strings."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from support import wait_until_async

import policy_server
from policy_server.errors import ModelError, QueueFull
from policy_server.gateway.llm.router import task_failure
from policy_server.llm.params import GenerationParams, Sample
from policy_server.llm.state import Generate, TasksAndSessions
from policy_server.llm.tasks import TaskView
from policy_server.serving.runtime import make_runtime
from policy_server.serving.runtime.local import LocalRuntime, LocalTasksAndSessions
from policy_server.settings import Settings

PACKAGE = Path(policy_server.__file__).parent


def test_no_remote_method_is_called_by_its_name_as_a_string() -> None:
    """Anywhere but the Python client, which never reaches Ray (tests/test_layers.py) and calls
    Gymnasium's ``VectorEnv.call("action_masks")``, a method of each sub-environment, by its name."""
    calls = re.compile(r"""\b(call|call_state)\(\s*["']|options\(method_name=""")
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{n}"
        for path in sorted(PACKAGE.rglob("*.py")) if "client" not in path.relative_to(PACKAGE).parts[:1]
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if calls.search(line)
    ]
    assert found == []


def _failing(error: Exception) -> Generate:
    async def generate(prompt_ids: list[int], params: GenerationParams) -> tuple[list[Sample], int]:
        raise error

    return generate


async def _failed_task(error: Exception) -> Exception:
    tasks = LocalTasksAndSessions(TasksAndSessions(None, _failing(error), "</s>", 60.0, 8))
    task_id = await tasks.start_task("2+2?", [1, 2], GenerationParams(num_samples=1, max_new_tokens=4), False)

    async def finished() -> TaskView | None:
        view = await tasks.task(task_id)
        return view if view.state != "pending" else None

    view = await wait_until_async(finished, 1.0, 0.01, "the task never finished")
    return task_failure(task_id, view.error)


def test_a_queued_task_that_fails_keeps_its_error_class_code_and_status() -> None:
    failure = asyncio.run(_failed_task(QueueFull("the generation queue is full", retry_after_s=7)))
    assert type(failure) is QueueFull and (failure.status, failure.code, failure.retry_after_s) == (429, "queue_full", 7)
    assert failure.message.startswith("task ") and failure.message.endswith("failed: the generation queue is full")


def test_a_queued_task_whose_model_raised_is_a_model_error() -> None:
    failure = asyncio.run(_failed_task(RuntimeError("CUDA out of memory")))
    assert type(failure) is ModelError and failure.status == 500
    assert "RuntimeError: CUDA out of memory" in failure.message


@pytest.mark.parametrize("kind", ["serve", "local"])
def test_settings_pick_the_runtime_once(kind: str) -> None:
    runtime = make_runtime(Settings(backend=kind))  # type: ignore[arg-type]
    assert type(runtime).__name__ == {"serve": "ServeRuntime", "local": "LocalRuntime"}[kind]
    assert isinstance(runtime, LocalRuntime) == (kind == "local")
