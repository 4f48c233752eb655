"""``LocalRuntime``: every service in the gateway's own process (development, tests, the bench's
floor). Blocking domain methods run in worker threads; errors come out as ``serving.errors`` maps them."""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from policy_server.errors import InvalidRequest
from policy_server.serving.errors import local, local_async, mapped_stream
from policy_server.serving.runtime.base import Runtime, X1Kind

if TYPE_CHECKING:
    from pathlib import Path

    from policy_server.llm.engine import LLMEngine, ValueScorer
    from policy_server.llm.grpo_runs import GRPORuns
    from policy_server.llm.grpo_settings import GRPOSettings
    from policy_server.llm.params import GenerationParams, Sample, SampleChunk
    from policy_server.llm.state import TasksAndSessions
    from policy_server.llm.tasks import TaskView
    from policy_server.llm.weight_publish import WeightPublisher
    from policy_server.llm.x1_config import X1TrainingConfig
    from policy_server.llm.x1_trainer import X1Trainer
    from policy_server.policies.multiplex import Signature
    from policy_server.policies.spaces import ActionSpace
    from policy_server.policies.torch_policy import PolicyOutput, TorchPolicy
    from policy_server.schema.config import PolicySpec, ServerSchema
    from policy_server.schema.llm import LLMPolicySpec, LLMValueSpec
    from policy_server.serving.api import Conversation, Weights
    from policy_server.training.collect import Acted
    from policy_server.training.experience import ExperienceBatch
    from policy_server.training.trainer import Trainer


class LocalPolicyModel:
    def __init__(self, policy: TorchPolicy) -> None:
        self.policy = policy

    async def forward(self, obs: np.ndarray) -> PolicyOutput:
        return await local(self.policy.forward, obs)

    async def ready(self) -> bool:
        return True

    async def set_weights(self, weights: Weights, version: int) -> None:
        self.policy.set_weights(weights, version)

    async def version(self) -> int:
        return self.policy.version

    async def snapshot(self) -> tuple[Weights, int]:
        return self.policy.snapshot()


class LocalMultiplexedModel:
    """The policies of a ``policies_dir`` in this process, in an LRU of ``size`` ids. Our own few
    lines: Serve's ``@serve.multiplexed`` LRU runs only inside a Serve replica."""

    def __init__(self, folder: Path, signature: Signature, size: int) -> None:
        self.folder, self.signature, self.size = folder, signature, size
        self.models: OrderedDict[str, TorchPolicy] = OrderedDict()
        self.loads = self.evictions = 0
        self._lock = threading.Lock()

    async def forward(self, obs: np.ndarray, policy_id: str) -> PolicyOutput:
        return await local(self._forward, obs, policy_id)

    def _forward(self, obs: np.ndarray, policy_id: str) -> PolicyOutput:
        from policy_server.policies.multiplex import load_policy

        with self._lock:
            policy = self.models.get(policy_id)
            if policy is not None:
                self.models.move_to_end(policy_id)
        if policy is None:
            policy = load_policy(self.folder, policy_id, self.signature)
            with self._lock:
                self.models[policy_id] = policy
                self.loads += 1
                while len(self.models) > self.size:
                    self.models.popitem(last=False)
                    self.evictions += 1
        return policy.forward(obs)

    async def ready(self) -> bool:
        return True

    async def replica_stats(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"pid": os.getpid(), "loaded": sorted(self.models), "loads": self.loads, "evictions": self.evictions}]


class LocalPolicyTrainer:
    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    async def register(self, client_id: str, info: dict[str, Any] | None) -> dict[str, Any]:
        return await local(self.trainer.register, client_id, info)

    async def heartbeat(self, client_id: str) -> dict[str, Any]:
        return await local(self.trainer.heartbeat, client_id)

    async def submit(self, batch: ExperienceBatch) -> dict[str, Any]:
        return await local(self.trainer.submit, batch)

    async def collect(self, client_id: str, acted: Acted, reward: float, done: bool) -> dict[str, Any]:
        return await local(self.trainer.collect, client_id, acted, reward, done)

    async def count_malformed(self, n: int, client_id: str | None) -> None:
        await local(self.trainer.count_malformed, n, client_id)

    async def status(self) -> dict[str, Any]:
        return await local(self.trainer.status)

    async def start(self) -> dict[str, Any]:
        return await local(self.trainer.start)

    async def pause(self) -> dict[str, Any]:
        return await local(self.trainer.pause)

    async def stop(self) -> dict[str, Any]:
        return await local(self.trainer.stop)

    async def save(self) -> dict[str, Any]:
        return await local(self.trainer.save)

    async def resume(self, name: str | None) -> dict[str, Any]:
        return await local(self.trainer.resume, name)

    async def checkpoints(self) -> dict[str, Any]:
        return await local(self.trainer.checkpoints)

    async def checkpoint_weights(self, name: str) -> dict[str, Any]:
        return await local(self.trainer.checkpoint_weights, name)


class LocalLLMModel:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> tuple[list[Sample], int]:
        return await local_async(self.engine.generate, prompt_ids, params)

    def stream(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[SampleChunk]:
        return mapped_stream("the LLM engine", self.engine.stream(prompt_ids, params))

    async def version(self) -> int:
        return self.engine.version


class LocalValueModel:
    def __init__(self, scorer: ValueScorer) -> None:
        self.scorer = scorer

    async def score(self, conversations: list[Conversation]) -> tuple[list[float], int]:
        return await score_or_invalid(self.scorer, conversations)

    async def version(self) -> int:
        return self.scorer.version


async def score_or_invalid(scorer: ValueScorer, conversations: list[Conversation]) -> tuple[list[float], int]:
    """The scores; a conversation the model's chat template refuses (ValueError) is the request's fault."""
    try:
        return await scorer.score(conversations)
    except ValueError as exc:
        raise InvalidRequest.at("body.messages", str(exc)) from exc


class LocalTasksAndSessions:
    def __init__(self, state: TasksAndSessions) -> None:
        self.state = state

    async def start_task(self, prompt_text: str, prompt_ids: list[int], params: GenerationParams, records: bool) -> str:
        return await local_async(self.state.start_task, prompt_text, prompt_ids, params, records)

    async def task(self, task_id: str) -> TaskView:
        return self.state.task(task_id)

    async def session_prompt(self, session_id: str, mode: str, text: str) -> tuple[list[int], str | None]:
        return self.state.session_prompt(session_id, mode, text)

    async def session_add(
        self, session_id: str, mode: str, parent: str | None, prompt_text: str, samples: list[Sample], version: int
    ) -> None:
        self.state.session_add(session_id, mode, parent, prompt_text, samples, version)

    async def session_nodes(self, session_id: str) -> list[dict[str, Any]]:
        return self.state.session_nodes(session_id)

    async def reset_session(self, session_id: str) -> None:
        self.state.reset_session(session_id)


class LocalGRPORuns:
    def __init__(self, runs: GRPORuns) -> None:
        self.runs = runs

    async def start(self, settings: GRPOSettings) -> dict[str, Any]:
        return await local(self.runs.start, settings)

    async def complete(self, run_id: str, prompt: str) -> dict[str, Any]:
        return await local(self.runs.complete, run_id, prompt)

    async def rewards(self, run_id: str, group_id: str, rewards: list[float]) -> dict[str, Any]:
        return await local(self.runs.rewards, run_id, group_id, rewards)

    async def status(self, run_id: str) -> dict[str, Any]:
        return await local(self.runs.status, run_id)

    async def stop(self, run_id: str) -> dict[str, Any]:
        return await local(self.runs.stop, run_id)

    async def archive(self, run_id: str) -> bytes:
        return await local(self.runs.archive, run_id)

    async def list(self) -> list[dict[str, Any]]:
        return await local(self.runs.list)


class LocalX1Training:
    def __init__(self, trainer: X1Trainer) -> None:
        self.trainer = trainer

    async def start(self, request: X1TrainingConfig) -> dict[str, str]:
        return await local(self.trainer.start, request)

    async def stop(self) -> dict[str, str]:
        return await local(self.trainer.stop)

    async def status(self) -> dict[str, Any]:
        return await local(self.trainer.status)


class LocalRuntime(Runtime):
    """Serves each model in this process; a trainer publishes straight to the model it trains.

    ``loaded``: policies already loaded (``build_app`` loads each to check it against the schema),
    served as they are instead of read from their files a second time.
    """

    def __init__(self, loaded: dict[str, TorchPolicy] | None = None) -> None:
        self._loaded = dict(loaded or {})
        self._policies: dict[str, TorchPolicy] = {}
        self._engine: LLMEngine | None = None
        self._scorer: ValueScorer | None = None
        self._publisher: WeightPublisher | None = None
        self._closers: list[Callable[[], None]] = []

    # the models load in this process, and two transformers ``from_pretrained`` in two threads
    # break each other (its meta-device initialisation is process-wide): one at a time
    starts_concurrently = False

    async def start(self, schema: ServerSchema) -> None:
        return None

    async def policy_model(self, spec: PolicySpec) -> LocalPolicyModel:
        from policy_server.policies.recurrent import state_layout
        from policy_server.policies.torch_policy import TorchPolicy

        policy = self._loaded.pop(spec.name, None)
        layout = state_layout(spec.recurrent)
        self._policies[spec.name] = policy or await local(TorchPolicy.from_file, spec.model, "cpu", layout)
        return LocalPolicyModel(self._policies[spec.name])

    async def multiplexed_model(self, spec: PolicySpec) -> LocalMultiplexedModel:
        from policy_server.policies.multiplex import Signature
        from policy_server.policies.served import resolve_policy

        assert spec.policies_dir is not None
        self._loaded.pop(spec.name, None)
        served, reference = await local(resolve_policy, spec)
        signature = Signature.of(reference, served.obs_dim, served.obs_shape, served.obs_dtype.name)
        return LocalMultiplexedModel(spec.policies_dir, signature, spec.resources.max_models_per_replica)

    async def candidate_model(self, spec: PolicySpec) -> LocalPolicyModel:
        from policy_server.policies.torch_policy import TorchPolicy

        assert spec.canary is not None
        return LocalPolicyModel(await local(TorchPolicy.from_file, spec.canary.model))

    async def policy_trainer(self, spec: PolicySpec, space: ActionSpace, obs_dim: int) -> LocalPolicyTrainer:
        from policy_server.policies.torch_policy import load_module, model_format
        from policy_server.training.trainer import build_trainer

        assert spec.training is not None
        module = load_module(spec.model.read_bytes(), model_format(spec.model))  # its own copy
        publish = self._policies[spec.name].set_weights
        trainer = build_trainer(spec.name, spec.training, module, space, obs_dim, publish, recurrent=spec.recurrent)
        trainer.open()
        self._closers.append(trainer.close)
        return LocalPolicyTrainer(trainer)

    async def llm_model(self, spec: LLMPolicySpec) -> LocalLLMModel:
        from policy_server.llm.engines import open_policy_engine
        from policy_server.llm.weight_publish import LocalReplicas, TransferReceiver, WeightPublisher

        self._engine = await local(open_policy_engine, spec, spec.path, spec.adapter, spec.device)
        self._closers.append(self._engine.close)
        # GRPO runs and x1 training publish through one publisher (one transfer group at a time)
        receiver = TransferReceiver(self._engine, spec.dtype, spec.path, replica_id="local")
        self._publisher = WeightPublisher(LocalReplicas(receiver), host="127.0.0.1")
        self._closers.append(self._publisher.close)
        return LocalLLMModel(self._engine)

    async def tasks_and_sessions(self, spec: LLMPolicySpec, tokenizer: Any) -> LocalTasksAndSessions:
        from policy_server.llm.state import TasksAndSessions

        assert self._engine is not None, "llm_model first"
        limits = spec.limits
        state = TasksAndSessions(tokenizer, self._engine.generate, spec.end_token, limits.task_ttl_s, 4 * limits.max_queued)
        self._closers.append(state.close)
        return LocalTasksAndSessions(state)

    async def value_model(self, spec: LLMValueSpec) -> LocalValueModel:
        from policy_server.llm.engine import ValueScorer

        self._scorer = await local(ValueScorer, spec, spec.path, spec.adapter, spec.device)
        return LocalValueModel(self._scorer)

    async def grpo_runs(self, spec: LLMPolicySpec) -> LocalGRPORuns:
        from policy_server.llm.grpo import Served
        from policy_server.llm.grpo_runs import GRPORuns

        assert spec.training is not None
        assert self._engine is not None, "the policy before its GRPO runs"
        assert self._publisher is not None
        served = Served.in_process(self._engine, adapter=spec.adapter is not None, publish=self._publisher.publish)
        return LocalGRPORuns(GRPORuns(spec.path, spec.adapter, spec.training.save_dir / "grpo", served=served))

    async def x1_training(self, kind: X1Kind, spec: LLMPolicySpec | LLMValueSpec) -> LocalX1Training:
        from policy_server.llm.engine import publish_next
        from policy_server.llm.x1_trainer import X1Trainer
        from policy_server.serving.llm_deployment import load_for

        assert spec.training is not None
        assert self._publisher is not None and (kind == "policy" or self._scorer is not None), "the model first"
        publish = self._publisher.publish if kind == "policy" else functools.partial(publish_next, self._scorer)
        load = load_for(kind, spec, spec.path, spec.adapter, spec.device)
        return LocalX1Training(X1Trainer(kind, load, spec.training, publish))

    async def stop(self) -> None:
        for close in reversed(self._closers):
            await local(close)
        self._closers.clear()
