"""A trainer publishes into the replicas of a real Serve deployment through ``ServeReplicas`` and
``ReceivesWeights`` (the methods the LLM deployments have): over Gloo, each replica at its own rank,
one group for every publish (``tests/llm/test_weight_publish.py`` changes the replica set). The
replicas' receiving side is our worker-side engine without vLLM (``support.GlooReplicaEngine``): two vLLM
engines do not fit this machine; ``tests/llm/test_vllm_engine.py`` runs the same path into vLLM."""

from __future__ import annotations

from typing import Any

import support
import torch
from ray import cloudpickle, serve
from support import GlooReplicaEngine

from policy_server.llm.weight_publish import ServeReplicas, TransferReceiver, WeightPublisher
from policy_server.serving.llm_deployment import ReceivesWeights

cloudpickle.register_pickle_by_value(support)  # Ray's workers cannot import the tests' helpers
APP = "weight-publish"
SHAPES = {"model.embed_tokens.weight": (16, 8), "model.layers.0.mlp.weight": (8, 8), "model.norm.weight": (8,)}


@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=0.5)
class Replica(ReceivesWeights):
    def __init__(self) -> None:
        from policy_server.llm import checkpoint

        checkpoint.weight_shapes = lambda folder: dict(SHAPES)  # this replica's checkpoint
        self.engine = GlooReplicaEngine()
        self.receiver = TransferReceiver(self.engine, "float32", None, serve.get_replica_context().replica_id.unique_id)

    def served(self) -> tuple[int, list[int], dict[str, list[Any]]]:
        """The version, the ranks this replica joined at, and the weights it holds."""
        return self.engine.version, self.engine.ranks, {n: t.tolist() for n, t in self.engine.weights.items()}


def weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


def test_every_replica_receives_the_trainers_broadcast_at_its_own_rank(ray_session: int) -> None:
    handle = serve.run(Replica.options(num_replicas=2).bind(), name=APP, route_prefix=None)
    publisher = WeightPublisher(ServeReplicas(handle, timeout_s=120), "127.0.0.1", trainer_gpus=())
    try:
        for version in (1, 2):
            sent = weights(version)
            assert publisher.publish(sent) == version and publisher.path == "gloo"
            served = handle.broadcast("served").results(timeout_s=60)
            expected = {n: t.tolist() for n, t in sent.items()}
            assert [(v, held) for v, _, held in served] == [(version, expected)] * 2
        assert sorted(ranks for _, ranks, _ in served) == [[1], [2]]  # one group for both
    finally:
        publisher.close()
        serve.delete(APP)
