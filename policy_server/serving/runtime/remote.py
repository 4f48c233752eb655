"""The typed services on Ray: each method one ``handle.<method>.remote`` (a Serve deployment) or
``actor.<method>.remote`` (the trainer actor) call, through ``serving.errors.remote``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ray.actor import ActorHandle
from ray.serve.handle import DeploymentHandle

from policy_server.serving.errors import mapped_stream, remote
from policy_server.serving.llm_transport import DirectLLMStreams

if TYPE_CHECKING:
    from policy_server.llm.grpo_settings import GRPOSettings
    from policy_server.llm.params import GenerationParams, Sample, SampleChunk
    from policy_server.llm.tasks import TaskView
    from policy_server.llm.x1_config import X1TrainingConfig
    from policy_server.serving.api import Conversation
    from policy_server.training.collect import Acted
    from policy_server.training.experience import ExperienceBatch

class ActorPolicyTrainer:
    """A ``TrainerActor``; our errors come back as themselves, others as ``serving.errors`` maps them."""

    what = "the trainer"

    def __init__(self, actor: ActorHandle) -> None:
        self.actor = actor

    async def register(self, client_id: str, info: dict[str, Any] | None) -> dict[str, Any]:
        return await remote(self.what, self.actor.register.remote, client_id, info)

    async def heartbeat(self, client_id: str) -> dict[str, Any]:
        return await remote(self.what, self.actor.heartbeat.remote, client_id)

    async def submit(self, batch: ExperienceBatch) -> dict[str, Any]:
        return await remote(self.what, self.actor.submit.remote, batch)

    async def collect(self, client_id: str, acted: Acted, reward: float, done: bool) -> dict[str, Any]:
        return await remote(self.what, self.actor.collect.remote, client_id, acted, reward, done)

    async def count_malformed(self, n: int, client_id: str | None) -> None:
        await remote(self.what, self.actor.count_malformed.remote, n, client_id)

    async def status(self) -> dict[str, Any]:
        return await remote(self.what, self.actor.status.remote)

    async def start(self) -> dict[str, Any]:
        return await remote(self.what, self.actor.start.remote)

    async def pause(self) -> dict[str, Any]:
        return await remote(self.what, self.actor.pause.remote)

    async def stop(self) -> dict[str, Any]:
        return await remote(self.what, self.actor.stop.remote)

    async def save(self) -> dict[str, Any]:
        return await remote(self.what, self.actor.save.remote)

    async def resume(self, name: str | None) -> dict[str, Any]:
        return await remote(self.what, self.actor.resume.remote, name)

    async def checkpoints(self) -> dict[str, Any]:
        return await remote(self.what, self.actor.checkpoints.remote)

    async def checkpoint_weights(self, name: str) -> dict[str, Any]:
        return await remote(self.what, self.actor.checkpoint_weights.remote, name)


class ServeLLMModel:
    """The LLM policy's deployment. With ``direct``, streams come straight from the replicas' TCP
    ports (``serving.llm_transport``; a Ray message per token costs more than the token), the
    streaming handle being the fallback; ``generate`` goes through the handle (its samples carry
    what chunks do not: prompt log-probs, beam scores)."""

    what = "the LLM deployment"

    def __init__(self, handle: DeploymentHandle, direct: bool = False) -> None:
        self.handle = handle
        self.direct = DirectLLMStreams(self._endpoints, self._through_handle) if direct else None

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> tuple[list[Sample], int]:
        return await remote(self.what, self.handle.generate.remote, prompt_ids, params)

    def stream(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[SampleChunk]:
        """The samples' chunks; closing this cancels the generation on the replica."""
        if self.direct is not None:
            return self.direct.stream(prompt_ids, params)
        return self._through_handle(prompt_ids, params)

    async def _endpoints(self) -> list[tuple[str, int, str]]:
        return await self.handle.broadcast("transport_endpoint").results_async()  # type: ignore[no-any-return]

    async def _through_handle(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[SampleChunk]:
        """The replica's ``stream`` generator through a streaming handle; closing this cancels it there."""
        chunks = self.handle.options(stream=True).stream.remote(prompt_ids, params)
        finished = False
        try:
            async for chunk in mapped_stream(self.what, chunks):
                yield chunk
            finished = True
        finally:
            if not finished:
                chunks.cancel()

    async def version(self) -> int:
        return await remote(self.what, self.handle.version.remote)

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()


class ServeValueModel:
    what = "the value model's deployment"

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def score(self, conversations: list[Conversation]) -> tuple[list[float], int]:
        return await remote(self.what, self.handle.score.remote, conversations)

    async def version(self) -> int:
        return await remote(self.what, self.handle.version.remote)


class ServeTasksAndSessions:
    what = "the LLM's tasks and sessions"

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def start_task(self, prompt_text: str, prompt_ids: list[int], params: GenerationParams, records: bool) -> str:
        return await remote(self.what, self.handle.start_task.remote, prompt_text, prompt_ids, params, records)

    async def task(self, task_id: str) -> TaskView:
        return await remote(self.what, self.handle.task.remote, task_id)

    async def session_prompt(self, session_id: str, mode: str, text: str) -> tuple[list[int], str | None]:
        return await remote(self.what, self.handle.session_prompt.remote, session_id, mode, text)

    async def session_add(
        self, session_id: str, mode: str, parent: str | None, prompt_text: str, samples: list[Sample], version: int
    ) -> None:
        await remote(self.what, self.handle.session_add.remote, session_id, mode, parent, prompt_text, samples, version)

    async def session_nodes(self, session_id: str) -> list[dict[str, Any]]:
        return await remote(self.what, self.handle.session_nodes.remote, session_id)

    async def reset_session(self, session_id: str) -> None:
        await remote(self.what, self.handle.reset_session.remote, session_id)


class ServeGRPORuns:
    what = "the GRPO deployment"

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def start(self, settings: GRPOSettings) -> dict[str, Any]:
        return await remote(self.what, self.handle.start.remote, settings)

    async def complete(self, run_id: str, prompt: str) -> dict[str, Any]:
        return await remote(self.what, self.handle.complete.remote, run_id, prompt)

    async def rewards(self, run_id: str, group_id: str, rewards: list[float]) -> dict[str, Any]:
        return await remote(self.what, self.handle.rewards.remote, run_id, group_id, rewards)

    async def status(self, run_id: str) -> dict[str, Any]:
        return await remote(self.what, self.handle.status.remote, run_id)

    async def stop(self, run_id: str) -> dict[str, Any]:
        return await remote(self.what, self.handle.stop.remote, run_id)

    async def archive(self, run_id: str) -> bytes:
        return await remote(self.what, self.handle.archive.remote, run_id)

    async def list(self) -> list[dict[str, Any]]:
        return await remote(self.what, self.handle.list.remote)


class ServeX1Training:
    what = "x1's training deployment"

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def start(self, request: X1TrainingConfig) -> dict[str, str]:
        return await remote(self.what, self.handle.start.remote, request)

    async def stop(self) -> dict[str, str]:
        return await remote(self.what, self.handle.stop.remote)

    async def status(self) -> dict[str, Any]:
        return await remote(self.what, self.handle.status.remote)
