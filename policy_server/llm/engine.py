"""What an LLM replica holds, as plain objects: the policy engine and the value scorer.

``LLMEngine`` owns the loaded policy, its generator and the queue that batches compatible
requests into one generate call; ``ValueScorer`` owns a value model. A Serve deployment (or the
gateway's local backend) holds one of each; neither knows about Ray or HTTP.

Model folders travel as bytes (``policy_server.llm.folders``), so a replica on another node
needs no shared file system.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from policy_server.llm.batching import GenerationQueue
from policy_server.llm.folders import Folder, unpack_model
from policy_server.llm.generation import GenerationParams, Generator, Sample
from policy_server.llm.models import load_policy, load_value, score_messages
from policy_server.schema.llm import LLMPolicySpec, LLMValueSpec

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


def _copy_into(module: Any, weights: dict[str, Any]) -> None:
    """Copy ``weights`` into ``module``'s parameters of those names; check all before changing any.

    Raises ValueError, changing nothing, for unknown names, wrong shapes, or values that are NaN
    or infinite in the parameter's dtype (a float32 1e5 is infinite in float16).
    """
    import torch

    from policy_server.training.guard import nonfinite

    params = dict(module.named_parameters())
    unknown = sorted(set(weights) - set(params))
    wrong = [n for n, v in weights.items() if n in params and tuple(params[n].shape) != tuple(v.shape)]
    if unknown or wrong:
        raise ValueError(f"weights do not fit the model: unknown {unknown[:5]}, wrong shapes {wrong[:5]}")
    bad = nonfinite((n, torch.as_tensor(v).to(params[n].dtype)) for n, v in weights.items())
    if bad:
        raise ValueError(f"refused weights: {bad[:5]} hold NaN or infinite values; the served weights stay")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(torch.as_tensor(value, dtype=params[name].dtype, device=params[name].device))


class LLMEngine:
    """A policy LM: batched generation behind a bounded queue, and its model version."""

    def __init__(
        self, spec: LLMPolicySpec, folder: Path, adapter: Path | None, device: str,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.spec = spec
        self.on_batch = on_batch
        self.lm = load_policy(
            folder, adapter, spec.dtype, device, step_token=spec.step_token, end_token=spec.end_token
        )
        self.generator = Generator(self.lm)
        self._weights_lock = threading.Lock()  # a batch never sees two versions of the weights
        limits = spec.limits
        self.queue = GenerationQueue(
            self._generate,
            max_queued=limits.max_queued,
            max_batch_prompts=limits.max_batch_prompts,
            batch_wait_ms=limits.batch_wait_ms,
        )
        self.version = 0

    @classmethod
    def from_files(
        cls, spec: LLMPolicySpec, model: Folder, adapter: Folder | None, device: str,
        on_batch: BatchObserver | None = None,
    ) -> LLMEngine:
        folder, lora = unpack_model(model, adapter, "policy-server-llm-")
        return cls(spec, folder, lora, device, on_batch)

    def _generate(self, prompts: list[list[int]], params: GenerationParams) -> list[list[Sample]]:
        started = time.perf_counter()
        with self._weights_lock:
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

    def set_weights(self, weights: dict[str, Any], version: int) -> int:
        """Load new values for some of the model's parameters (an adapter's, or all of them) and
        move to ``version``, between two generate calls. Unknown names or shapes change nothing."""
        with self._weights_lock:
            _copy_into(self.lm.model, weights)
            self.version = version
        return version

    def close(self) -> None:
        self.queue.close()


class ValueScorer:
    """A value model: conversations → scores in [-1, 1]; one forward at a time."""

    def __init__(self, spec: LLMValueSpec, folder: Path, adapter: Path | None, device: str) -> None:
        self.spec = spec
        self.value = load_value(folder, adapter, spec.dtype, device, position=spec.position)
        self.version = 0
        self._lock = threading.Lock()

    @classmethod
    def from_files(cls, spec: LLMValueSpec, model: Folder, adapter: Folder | None, device: str) -> ValueScorer:
        folder, lora = unpack_model(model, adapter, "policy-server-value-")
        return cls(spec, folder, lora, device)

    def set_weights(self, weights: dict[str, Any], version: int) -> int:
        """New values for some of the value model's parameters, between two scoring calls."""
        with self._lock:
            _copy_into(self.value.model, weights)
            self.version = version
        return version

    def score_sync(self, conversations: list[list[dict[str, str]]]) -> list[float]:
        with self._lock:
            return score_messages(self.value, conversations)

    async def score(self, conversations: list[list[dict[str, str]]]) -> tuple[list[float], int]:
        return await asyncio.to_thread(self.score_sync, conversations), self.version
