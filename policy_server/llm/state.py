"""``TasksAndSessions``: what must outlive one request and be the same for every gateway: x1's queued
``/forward`` tasks and the token-tracking sessions.

A plain object. On Ray Serve one replica of a small deployment holds it (so any gateway can
fetch any task and continue any session); with the local backend the gateway holds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from policy_server.errors import ModelError, NotFound, PolicyServerError, summary
from policy_server.llm.params import GenerationParams, Sample
from policy_server.llm.records import SessionStore, record_from_sample
from policy_server.llm.tasks import TaskStore, TaskView

log = logging.getLogger(__name__)

Generate = Callable[[list[int], GenerationParams], Awaitable[tuple[list[Sample], int]]]


class TasksAndSessions:
    def __init__(self, tokenizer: Any, generate: Generate, end_token: str, task_ttl_s: float, max_tasks: int) -> None:
        self.tokenizer, self.generate, self.end_token = tokenizer, generate, end_token
        self.tasks = TaskStore(ttl_s=task_ttl_s, max_tasks=max_tasks)
        self.sessions = {mode: SessionStore(mode) for mode in ("linear", "tree")}
        self._running: set[asyncio.Task[None]] = set()

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    # --- tasks ---------------------------------------------------------------------------------

    async def start_task(self, prompt_text: str, prompt_ids: list[int], params: GenerationParams, records: bool) -> str:
        """Queue the generation of x1's `/forward`; returns the task id at once."""
        task_id = self.tasks.create({"prompt": prompt_text})
        task = asyncio.create_task(self._run(task_id, prompt_text, prompt_ids, params, records))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task_id

    async def _run(self, task_id: str, text: str, prompt: list[int], params: GenerationParams, records: bool) -> None:
        try:
            samples, version = await self.generate(prompt, params)
        except PolicyServerError as exc:  # kept whole: the fetch answers its class, code and status
            self._finish(task_id, error=exc)
            return
        except Exception as exc:
            log.exception("task %s failed", task_id)
            self._finish(task_id, error=ModelError(f"the model raised {type(exc).__name__}: {summary(exc)}"))
            return
        self._finish(task_id, result={
            "result": [self.tokenizer.decode(s.completion_ids, skip_special_tokens=True) for s in samples],
            "prompt": [text] * len(samples),
            "stop_string_found": [s.stop_string or "" for s in samples],
            "is_final_step": [s.stop_string == self.end_token for s in samples],
            "model_version": version,
            "records": [record_from_sample(s, version).to_dict() for s in samples] if records else None,
        })

    def _finish(self, task_id: str, result: dict[str, Any] | None = None, error: PolicyServerError | None = None) -> None:
        try:
            if error is not None:
                self.tasks.fail(task_id, error)
            else:
                self.tasks.complete(task_id, result)
        except NotFound:
            log.info("task %s expired before it finished", task_id)

    def task(self, task_id: str) -> TaskView:
        """The task's state and result (or error); a finished task is forgotten by this very call
        (fetched once, atomically: a second fetch, however soon, is ``NotFound``)."""
        return self.tasks.take(task_id)

    # --- sessions ------------------------------------------------------------------------------

    def session_prompt(self, session_id: str, mode: str, text: str) -> tuple[list[int], str | None]:
        """The prompt's ids, continuing the session's longest node that the text extends."""
        prefix = self.sessions[mode].prefix_for(
            session_id, text, lambda t: self._encode(t, True), lambda t: self._encode(t, False)
        )
        return list(prefix.prompt_ids), prefix.parent_node_id

    def session_add(
        self, session_id: str, mode: str, parent: str | None, prompt_text: str, samples: list[Sample], version: int
    ) -> None:
        for sample in samples:
            text = prompt_text + self.tokenizer.decode(sample.completion_ids, skip_special_tokens=False)
            self.sessions[mode].add(session_id, parent, record_from_sample(sample, version), text)

    def session_nodes(self, session_id: str) -> list[dict[str, Any]]:
        for store in self.sessions.values():
            try:
                return store.nodes(session_id)
            except NotFound:
                continue
        raise NotFound(f"no session {session_id!r} (never used, reset or expired)")

    def reset_session(self, session_id: str) -> None:
        self.session_nodes(session_id)  # 404 when unknown
        for store in self.sessions.values():
            try:
                store.delete(session_id)
            except NotFound:
                continue

    def close(self) -> None:
        for task in list(self._running):
            task.cancel()
