"""What an LLM replica holds, as plain objects: the policy engine and the value scorer.

``LLMEngine`` owns the loaded policy, its generator and the queue that batches compatible
requests into one generate call; ``ValueScorer`` owns a value model. A Serve deployment (or the
gateway's local backend) holds one of each; neither knows about Ray or HTTP.

Both load from a model folder's path, which every node that runs a replica must read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import torch

from policy_server.llm.batching import GenerationQueue
from policy_server.llm.generation import GenerationParams, Generator, Sample
from policy_server.llm.models import load_policy, load_value, score_messages
from policy_server.schema.llm import LLMPolicySpec, LLMValueSpec
from policy_server.weights import VersionedWeights


@dataclasses.dataclass(frozen=True)
class BatchReport:
    """One generate call, as the engine reports it (to metrics)."""

    prompts: int
    new_tokens: int
    """Completion tokens of every sample of every prompt."""
    seconds: float
    queued: int
    """Requests still waiting when the call ended."""
    version: int


BatchObserver = Callable[[BatchReport], None]


class LLMEngine(VersionedWeights):
    """A policy LM: batched generation behind a bounded queue, and its model version.

    ``set_weights`` loads new values for some of the model's parameters (an adapter's, or all of
    them) between two generate calls; weights that do not fit change nothing.
    """

    partial_updates = True  # a LoRA trainer sends its adapter alone
    version_in_errors = False

    def __init__(
        self, spec: LLMPolicySpec, folder: Path, adapter: Path | None, device: str,
        on_batch: BatchObserver | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.on_batch = on_batch
        self.lm = load_policy(
            folder, adapter, spec.dtype, device, step_token=spec.step_token, end_token=spec.end_token
        )
        self.generator = Generator(self.lm)
        limits = spec.limits
        self.queue = GenerationQueue(
            self._generate,
            max_queued=limits.max_queued,
            max_batch_prompts=limits.max_batch_prompts,
            batch_wait_ms=limits.batch_wait_ms,
        )

    def _generate(self, prompts: list[list[int]], params: GenerationParams) -> list[list[Sample]]:
        started = time.perf_counter()
        with self._lock:  # a batch never sees two versions of the weights
            samples = self.generator.generate(prompts, params)
            version = self.version
        if self.on_batch is not None:
            tokens = sum(len(s.completion_ids) for group in samples for s in group)
            seconds = time.perf_counter() - started
            self.on_batch(BatchReport(len(prompts), tokens, seconds, self.queue.stats().queued, version))
        return [[dataclasses.replace(s, model_version=version) for s in group] for group in samples]

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> tuple[list[Sample], int]:
        """``num_samples`` samples for one prompt, and the version of the weights that made them."""
        samples = await self.queue.submit(prompt_ids, params)
        return samples, samples[0].model_version

    def _named_weights(self) -> dict[str, torch.Tensor]:
        return dict(self.lm.model.named_parameters())

    def close(self) -> None:
        self.queue.close()


class ValueScorer(VersionedWeights):
    """A value model: conversations → scores in [-1, 1]; one forward at a time.

    ``set_weights`` loads new values for some of the value model's parameters between two
    scoring calls.
    """

    partial_updates = True
    version_in_errors = False

    def __init__(self, spec: LLMValueSpec, folder: Path, adapter: Path | None, device: str) -> None:
        super().__init__()
        self.spec = spec
        self.value = load_value(folder, adapter, spec.dtype, device, position=spec.position)

    def _named_weights(self) -> dict[str, torch.Tensor]:
        return dict(self.value.model.named_parameters())

    def score_sync(self, conversations: list[list[dict[str, str]]]) -> list[float]:
        with self._lock:
            return score_messages(self.value, conversations)

    async def score(self, conversations: list[list[dict[str, str]]]) -> tuple[list[float], int]:
        return await asyncio.to_thread(self.score_sync, conversations), self.version
