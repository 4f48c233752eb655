"""The typed interfaces of the services a runtime hands the gateway.

Each is what one remote thing does, as real async methods: the gateway holds these types and
calls them; ``runtime.local`` implements them on objects in the gateway's process,
``runtime.serve`` on Ray Serve deployments and a Ray actor. Every method raises only
``PolicyServerError`` (``serving.errors`` maps the rest), so the gateway needs no Ray.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from policy_server.llm.grpo_settings import GRPOSettings
    from policy_server.llm.params import GenerationParams, Sample, SampleChunk
    from policy_server.llm.tasks import TaskView
    from policy_server.llm.x1_config import (
        X1TrainingConfig,  # the types only: no torch or transformers import for the interfaces
    )
    from policy_server.policies.torch_policy import PolicyOutput
    from policy_server.training.collect import Acted
    from policy_server.training.experience import ExperienceBatch

Weights = dict[str, np.ndarray]
Conversation = list[dict[str, str]]


class PolicyModel(Protocol):
    """A torch policy's forward pass and weights (every replica of its deployment)."""

    async def forward(self, obs: np.ndarray) -> PolicyOutput:
        """float32 ``(B, obs_dim)`` → the model's heads and the version that made them."""

    async def ready(self) -> bool:
        """Whether a replica answers now (never raises)."""

    async def set_weights(self, weights: Weights, version: int) -> None:
        """Publish new weights to every replica; requests in flight finish on the old ones."""

    async def version(self) -> int:
        """The model version served (of one replica)."""

    async def snapshot(self) -> tuple[Weights, int]:
        """The served weights and their version, read together (from one replica)."""


class MultiplexedModel(Protocol):
    """Many policies of one architecture (``policies_dir``), each replica holding an LRU of them."""

    async def forward(self, obs: np.ndarray, policy_id: str) -> PolicyOutput:
        """float32 ``(B, obs_dim)`` → the heads of ``policy_id``'s model (loaded on demand).
        Raises NotFound (no such id's file) or ModelError (its file does not load or fit)."""

    async def ready(self) -> bool:
        """Whether a replica answers now (never raises)."""

    async def replica_stats(self) -> list[dict[str, Any]]:
        """Per replica: its process id, the ids it holds loaded, its loads and evictions so far."""


class PolicyTrainer(Protocol):
    """The RL trainer of one policy (``training.trainer.Trainer``): clients, experience, control."""

    async def register(self, client_id: str, info: dict[str, Any] | None) -> dict[str, Any]: ...

    async def heartbeat(self, client_id: str) -> dict[str, Any]: ...

    async def submit(self, batch: ExperienceBatch) -> dict[str, Any]: ...

    async def collect(self, client_id: str, acted: Acted, reward: float, done: bool) -> dict[str, Any]: ...

    async def count_malformed(self, n: int, client_id: str | None) -> None: ...

    async def status(self) -> dict[str, Any]: ...

    async def start(self) -> dict[str, Any]: ...

    async def pause(self) -> dict[str, Any]: ...

    async def stop(self) -> dict[str, Any]: ...

    async def save(self) -> dict[str, Any]: ...

    async def resume(self, name: str | None) -> dict[str, Any]: ...

    async def checkpoints(self) -> dict[str, Any]: ...

    async def checkpoint_weights(self, name: str) -> dict[str, Any]:
        """A checkpoint's actor ``weights`` and ``model_version``, the trainer left as it is."""


class LLMModel(Protocol):
    """The LLM policy's generation: the plug point of the LLM engine (``llm.engine.LLMEngine``,
    our batched loop on transformers, or ``llm.vllm_engine.VLLMEngine``; ``llm.policy.engine``)."""

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> tuple[list[Sample], int]:
        """``params.num_samples`` samples for one prompt, and the model version that made them."""

    def stream(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[SampleChunk]:
        """The same samples as ``generate``, chunk by chunk as tokens are made; closing the
        iterator (a client that disconnected) cancels the generation."""

    async def version(self) -> int: ...


class ValueModel(Protocol):
    """The LLM value model (``llm.engine.ValueScorer``)."""

    async def score(self, conversations: list[Conversation]) -> tuple[list[float], int]:
        """One score in [-1, 1] per conversation, and the model version."""

    async def version(self) -> int: ...


class TasksAndSessionsAPI(Protocol):
    """x1's queued ``/forward`` tasks and token-tracking sessions (``llm.state.TasksAndSessions``)."""

    async def start_task(self, prompt_text: str, prompt_ids: list[int], params: GenerationParams, records: bool) -> str: ...

    async def task(self, task_id: str) -> TaskView:
        """The task, handed out once when finished; a failed one's ``error`` is the error itself."""

    async def session_prompt(self, session_id: str, mode: str, text: str) -> tuple[list[int], str | None]: ...

    async def session_add(
        self, session_id: str, mode: str, parent: str | None, prompt_text: str, samples: list[Sample], version: int
    ) -> None: ...

    async def session_nodes(self, session_id: str) -> list[dict[str, Any]]: ...

    async def reset_session(self, session_id: str) -> None: ...


class GRPORunsAPI(Protocol):
    """The GRPO runs of the LLM policy (``llm.grpo_runs.GRPORuns``)."""

    async def start(self, settings: GRPOSettings) -> dict[str, Any]: ...

    async def complete(self, run_id: str, prompt: str) -> dict[str, Any]: ...

    async def rewards(self, run_id: str, group_id: str, rewards: list[float]) -> dict[str, Any]: ...

    async def status(self, run_id: str) -> dict[str, Any]: ...

    async def stop(self, run_id: str) -> dict[str, Any]: ...

    async def archive(self, run_id: str) -> bytes:
        """The run's model (or adapter) and tokenizer as .tar.gz bytes."""

    async def list(self) -> list[dict[str, Any]]: ...


class X1Training(Protocol):
    """x1's training of the LLM policy or the value model (``llm.x1_trainer.X1Trainer``)."""

    async def start(self, request: X1TrainingConfig) -> dict[str, str]: ...

    async def stop(self) -> dict[str, str]: ...

    async def status(self) -> dict[str, Any]: ...
