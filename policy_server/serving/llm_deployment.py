"""Ray Serve deployments of the LLM policy and value model: thin adapters around the engines.

Every replica loads its model (and tokenizer) from the spec's path, which every node that runs one
must read (a shared or network file system, or a copy at the same path on each node); no model
bytes travel through Serve.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import serve
from ray.serve import Application

from policy_server.llm.chunks import coalesced
from policy_server.llm.engine import ValueScorer
from policy_server.llm.grpo_runs import GRPORuns
from policy_server.llm.params import GenerationParams, Sample, SampleChunk
from policy_server.llm.state import TasksAndSessions
from policy_server.llm.tasks import TaskView
from policy_server.llm.weight_publish import ServeReplicas, TransferReceiver, WeightPublisher
from policy_server.llm.x1_trainer import X1Trainer
from policy_server.schema.llm import LLMPolicySpec, LLMValueSpec
from policy_server.serving.llm_metrics import GRPOMetrics, LLMServingMetrics
from policy_server.serving.llm_transport import TOKEN_BYTES, LLMStreamServer, engine_streams

if TYPE_CHECKING:
    from policy_server.llm.grpo_settings import GRPOSettings
    from policy_server.llm.x1_config import X1TrainingConfig
    from policy_server.serving.api import Conversation


def _limit_threads(cpus: float) -> None:
    """One torch thread per CPU the replica was given: more fight over the node's cores (measured
    10-15× slower generation on 2 shared cores)."""
    import torch

    torch.set_num_threads(max(1, int(cpus)))


class ReceivesWeights:
    """A deployment's side of ``WeightPublisher`` (its replicas' ``self.receiver``): what ``Peer``
    reports, ``set_weights``, and joining, receiving from and leaving a trainer's transfer group,
    each off the replica's event loop."""

    receiver: TransferReceiver

    def weight_transfer_peer(self) -> tuple[Any, ...]:
        return self.receiver.weight_transfer_peer()

    async def set_weights(self, weights: dict[str, Any], version: int) -> int:
        return await asyncio.to_thread(self.receiver.set_weights, weights, version)

    async def init_weight_transfer(self, init_info: dict[str, Any], offsets: dict[str, int], group: str) -> None:
        await asyncio.to_thread(self.receiver.init_weight_transfer, init_info, offsets, group)

    async def receive_weights(self, update_info: dict[str, Any], version: int, group: str) -> int:
        return await asyncio.to_thread(self.receiver.receive_weights, update_info, version, group)

    async def shutdown_weight_transfer(self, group: str) -> None:
        await asyncio.to_thread(self.receiver.shutdown_weight_transfer, group)


@serve.deployment
class LLMPolicyDeployment(ReceivesWeights):
    def __init__(self, spec: LLMPolicySpec, device: str) -> None:
        from policy_server.llm.engines import open_policy_engine

        _limit_threads(spec.resources.num_cpus)
        self.metrics = LLMServingMetrics(spec.model_id, serve.get_replica_context().app_name)
        self.engine = open_policy_engine(spec, spec.path, spec.adapter, device, on_batch=self.metrics.on_batch)
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.receiver = TransferReceiver(self.engine, spec.dtype, spec.path, replica_id, self.metrics.on_version)
        # the direct data path of streams (see llm_transport): its secret reaches gateways only through Serve
        self._token = secrets.token_hex(TOKEN_BYTES)
        streams, loop = engine_streams(self.engine)
        self._direct = LLMStreamServer(streams, self._token, ray.util.get_node_ip_address(), loop)

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> tuple[list[Sample], int]:
        return await self.engine.generate(prompt_ids, params)

    async def stream(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[SampleChunk]:
        # the fallback of the direct path (llm_transport). What queued up while Serve sent the previous
        # item goes as one item per sample (one Ray message per token costs more than the token);
        # Serve cancels: the engine stops
        async with aclosing(coalesced(self.engine.stream(prompt_ids, params))) as chunks:
            async for chunk in chunks:
                yield chunk

    def transport_endpoint(self) -> tuple[str, int, str]:
        """Host, port and token where this replica serves streams directly."""
        return (*self._direct.address, self._token)

    def version(self) -> int:
        return self.engine.version

    def __del__(self) -> None:
        """Serve calls it when it stops the replica: vLLM's engine core and workers stop with it
        (left alone, they outlived the replica until they noticed, one time killed only by SIGKILL)."""
        if hasattr(self, "engine"):
            self.engine.close()


@serve.deployment
class ValueDeployment(ReceivesWeights):
    def __init__(self, spec: LLMValueSpec, device: str) -> None:
        _limit_threads(spec.resources.num_cpus)
        self.scorer = ValueScorer(spec, spec.path, spec.adapter, device)
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.receiver = TransferReceiver(self.scorer, spec.dtype, spec.path, replica_id)  # set_weights only

    async def score(self, conversations: list[Conversation]) -> tuple[list[float], int]:
        from policy_server.serving.runtime.local import score_or_invalid

        return await score_or_invalid(self.scorer, conversations)

    def version(self) -> int:
        return self.scorer.version



@serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
class TasksAndSessionsDeployment:
    """The one holder of queued tasks and sessions, whichever gateway a request comes through;
    it generates through the policy deployment's handle."""

    def __init__(self, spec: LLMPolicySpec, policy_app: str) -> None:
        from transformers import AutoTokenizer

        self.policy = serve.get_deployment_handle(LLM_POLICY, policy_app)
        self.state = TasksAndSessions(
            AutoTokenizer.from_pretrained(str(spec.path), local_files_only=True), self._generate, spec.end_token,
            spec.limits.task_ttl_s, 4 * spec.limits.max_queued,
        )

    async def _generate(self, prompt_ids: list[int], params: GenerationParams) -> tuple[list[Sample], int]:
        from policy_server.serving.errors import remote

        # mapped here, so a task that fails keeps the domain error the policy replica raised
        return await remote("the LLM deployment", self.policy.generate.remote, prompt_ids, params)

    async def start_task(self, prompt_text: str, prompt_ids: list[int], params: GenerationParams, records: bool) -> str:
        return await self.state.start_task(prompt_text, prompt_ids, params, records)

    def task(self, task_id: str) -> TaskView:
        return self.state.task(task_id)

    def session_prompt(self, session_id: str, mode: str, text: str) -> tuple[list[int], str | None]:
        return self.state.session_prompt(session_id, mode, text)

    def session_add(
        self, session_id: str, mode: str, parent: str | None, prompt_text: str, samples: list[Sample], version: int
    ) -> None:
        self.state.session_add(session_id, mode, parent, prompt_text, samples, version)

    def session_nodes(self, session_id: str) -> list[dict[str, Any]]:
        return self.state.session_nodes(session_id)

    def reset_session(self, session_id: str) -> None:
        self.state.reset_session(session_id)


LLM_POLICY = "llm-policy"
LLM_VALUE = "llm-value"
LLM_TASKS = "llm-tasks"


def build_llm_deployment(spec: LLMPolicySpec | LLMValueSpec, gpus_available: bool) -> Application:
    """The Serve application of the LLM policy or value model, with the schema's resources; GPUs
    only where the cluster has them (``device: auto`` then picks the GPU)."""
    res = spec.resources
    num_gpus = res.num_gpus if gpus_available else 0.0
    device = "cpu" if num_gpus == 0 and spec.device == "auto" else spec.device
    if isinstance(spec, LLMPolicySpec):
        cls: Any = LLMPolicyDeployment
        name = LLM_POLICY
        ongoing = spec.limits.max_queued + spec.limits.max_batch_prompts  # never caps the queue
    else:
        cls, name, ongoing = ValueDeployment, LLM_VALUE, 64
    return cls.options(
        name=name,
        **res.serve_options(),  # a fixed num_replicas, or Serve's autoscaling_config
        max_ongoing_requests=max(ongoing, math.ceil(res.target)),  # a target above the cap is never reached
        ray_actor_options={"num_cpus": res.num_cpus, "num_gpus": num_gpus},
    ).bind(spec, device)


@serve.deployment(num_replicas=1, max_ongoing_requests=64)
class GRPODeployment:
    """The GRPO runs of the LLM policy, beside its serving deployment (each run its own model copy).
    A ``serve: true`` run samples through the policy's handle and publishes its weights into every
    replica through ``broadcast("set_weights")``."""

    def __init__(self, spec: LLMPolicySpec, root: str, device: str, policy_app: str) -> None:
        from policy_server.llm.grpo import Served

        _limit_threads(spec.training.num_cpus if spec.training else 1)
        policy = serve.get_deployment_handle(LLM_POLICY, policy_app)

        def generate(prompt_ids: list[int], params: GenerationParams) -> tuple[list[Sample], int]:
            return policy.generate.remote(prompt_ids, params).result(timeout_s=600)  # type: ignore[no-any-return]

        publisher = WeightPublisher(ServeReplicas(policy), ray.util.get_node_ip_address())
        served = Served(generate, publisher.publish, adapter=spec.adapter is not None)
        self.runs = GRPORuns(spec.path, spec.adapter, Path(root), spec.dtype, device, served=served)
        self.metrics = GRPOMetrics(spec.model_id, serve.get_replica_context().app_name)

    async def start(self, settings: GRPOSettings) -> dict[str, Any]:
        return await asyncio.to_thread(self.runs.start, settings)

    async def complete(self, run_id: str, prompt: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.runs.complete, run_id, prompt)

    async def rewards(self, run_id: str, group_id: str, rewards: list[float]) -> dict[str, Any]:
        answer = await asyncio.to_thread(self.runs.rewards, run_id, group_id, rewards)
        self.metrics.on_rewards(run_id, answer)
        return answer

    async def status(self, run_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.runs.status, run_id)

    async def stop(self, run_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.runs.stop, run_id)

    async def archive(self, run_id: str) -> bytes:
        return await asyncio.to_thread(self.runs.archive, run_id)

    async def list(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.runs.list)


LLM_GRPO = "llm-grpo"


@serve.deployment(num_replicas=1, max_ongoing_requests=16)
class X1TrainingDeployment:
    """x1's training of the policy or the value model, beside its serving deployment; new weights
    reach every serving replica through ``broadcast("set_weights")``."""

    def __init__(
        self, kind: str, spec: LLMPolicySpec | LLMValueSpec, serving_app: str, device: str
    ) -> None:
        assert spec.training is not None
        _limit_threads(spec.training.num_cpus)
        serving = serve.get_deployment_handle(LLM_POLICY if kind == "policy" else LLM_VALUE, serving_app)
        # as the served version + 1 (GRPO publishes too); the value model takes set_weights only
        publish = WeightPublisher(ServeReplicas(serving), ray.util.get_node_ip_address()).publish
        self.trainer = X1Trainer(kind, load_for(kind, spec, spec.path, spec.adapter, device), spec.training, publish)

    async def start(self, request: X1TrainingConfig) -> dict[str, str]:
        return await asyncio.to_thread(self.trainer.start, request)

    async def stop(self) -> dict[str, str]:
        return await asyncio.to_thread(self.trainer.stop)

    async def status(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.trainer.status)


def load_for(kind: str, spec: LLMPolicySpec | LLMValueSpec, folder: Path, adapter: Path | None, device: str) -> Any:
    """A loader of the trainer's own copy of the model (loaded on the first training request)."""
    from policy_server.llm.models import load_policy, load_value

    if kind == "policy":
        return lambda: load_policy(folder, adapter, spec.dtype, device)
    return lambda: load_value(folder, adapter, spec.dtype, device, position=getattr(spec, "position", None))


def x1_app_name(prefix: str, kind: str) -> str:
    return f"{prefix}-llm-x1-{kind}"
