"""What an LLM replica holds, as plain objects: the policy engine and the value scorer.

``LLMEngine`` owns the loaded policy, its generator and the queue that batches compatible
requests into one generate call (requests with different seeds included), and streams a request's
tokens as they are decoded; ``ValueScorer`` owns a value model. A Serve deployment (or the
gateway's local backend) holds one of each; neither knows about Ray or HTTP.

Both load from a model folder's path, which every node that runs a replica must read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from policy_server.errors import Conflict, InvalidRequest
from policy_server.llm.batching import GenerationQueue
from policy_server.llm.generation import Generator
from policy_server.llm.models import load_policy, load_value, score_messages
from policy_server.llm.params import GenerationParams, Sample, SampleChunk
from policy_server.schema.llm import LLMPolicySpec, LLMValueSpec
from policy_server.weights import VersionedWeights, Weights


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


class _ChunkSink:
    """A streaming request's chunks, handed from the generation thread to the caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.chunks: asyncio.Queue[SampleChunk | BaseException | None] = asyncio.Queue()
        self.cancelled = False
        self.version = 0
        """The weights' version while its batch runs (set by the engine before the decode)."""

    def push(self, chunk: SampleChunk) -> None:
        self._put(dataclasses.replace(chunk, model_version=self.version))

    def finish(self, future: Future[list[Sample]]) -> None:
        """The request's future is done: end the stream, with its error if it failed."""
        error = None if future.cancelled() else future.exception()
        self._put(error)

    def _put(self, item: SampleChunk | BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.chunks.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody reads on
            self.cancelled = True


@dataclasses.dataclass(frozen=True)
class _Job:
    """One request as the queue carries it: its params, and its sink when it streams."""

    params: GenerationParams
    sink: _ChunkSink | None = None

    @property
    def num_samples(self) -> int:
        return self.params.num_samples

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens

    def batch_key(self) -> tuple[object, ...]:
        return self.params.batch_key()


def check_newer(version: int, served: int) -> None:
    """``Conflict`` unless ``version`` is above the ``served`` one: a policy's served versions never
    go backwards, whoever publishes (GRPO runs and x1 training both do, each reading the served
    version first: ``publish_next``)."""
    if version <= served:
        raise Conflict(f"version {version} is not newer than the served version {served}: "
                       "publish as the served version + 1")


def publish_next(engine: Any, weights: dict[str, Any]) -> int:
    """Load ``weights`` into a policy engine of this process (``LLMEngine``, ``VLLMEngine``) as its
    served version + 1; returns that version. ``Conflict`` if another publish got there first."""
    version: int = engine.set_weights(weights, engine.version + 1)
    return version


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
        self._publishing = threading.Lock()
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

    def _generate(self, prompts: list[list[int]], jobs: list[_Job]) -> list[list[Sample]]:
        started = time.perf_counter()
        with self._lock:  # a batch never sees two versions of the weights
            version = self.version
            for job in jobs:
                if job.sink is not None:
                    job.sink.version = version
            samples = self.generator.generate(
                prompts,
                jobs[0].params,
                seeds=[job.params.seed for job in jobs],
                sinks=[job.sink for job in jobs],
            )
        if self.on_batch is not None:
            tokens = sum(len(s.completion_ids) for group in samples for s in group)
            seconds = time.perf_counter() - started
            self.on_batch(BatchReport(len(prompts), tokens, seconds, self.queue.stats().queued, version))
        return [[dataclasses.replace(s, model_version=version) for s in group] for group in samples]

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> tuple[list[Sample], int]:
        """``num_samples`` samples for one prompt, and the version of the weights that made them.

        Raises ``InvalidRequest`` for what this engine cannot do (``structured``; a ``logit_bias``
        token outside the vocabulary), ``QueueFull`` when the queue is full.
        """
        self._check_supported(params)
        samples = await self.queue.submit(prompt_ids, _Job(params))
        return samples, samples[0].model_version

    async def stream(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[SampleChunk]:
        """The samples ``generate`` would give, as chunks: one per sampled token as each decoding
        step makes it (the beam strategies: one per sample at the end of the search).

        The request queues with the others (``QueueFull`` raises at the first ``__anext__``);
        closing the iterator (a client that disconnected) withdraws it if it has not started, or
        stops its rows at the next step while the rest of its batch goes on.
        """
        self._check_supported(params)
        sink = _ChunkSink(asyncio.get_running_loop())
        future = self.queue.submit_future(prompt_ids, _Job(params, sink))
        future.add_done_callback(sink.finish)
        try:
            while (item := await sink.chunks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            sink.cancelled = True
            future.cancel()

    def _check_supported(self, params: GenerationParams) -> None:
        if params.structured is not None:
            raise InvalidRequest.at(
                "structured",
                "the transformers engine cannot do structured outputs; "
                "serve this policy with llm.policy.engine: vllm",
            )
        if params.adapter is not None:  # the schema refuses llm.policy.adapters for this engine
            raise InvalidRequest.at("adapter", "the transformers engine serves no adapters besides the policy's own")
        vocab = self.generator.vocab_size
        outside = sorted({token for token, _ in params.logit_bias if token >= vocab})
        if outside:
            raise InvalidRequest.at(
                "logit_bias", f"token ids {outside} are outside the model's vocabulary of {vocab} tokens"
            )

    def set_weights(self, weights: Weights, version: int) -> int:
        """``VersionedWeights.set_weights``; ``Conflict``, changing nothing, unless ``version`` is
        above the served one (``check_newer``)."""
        with self._publishing:  # the check and the load as one step
            check_newer(version, self.version)
            return super().set_weights(weights, version)

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
