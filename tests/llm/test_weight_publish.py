"""weight_publish: the trainer's side of publishing weights. The direct path runs on real Gloo
groups: the trainer (this thread, rank 0) and several replicas (threads) whose receivers hold our
worker-side engine (``support.GlooReplicaEngine``); a replica set that changes gets a new group."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
import torch
from support import GlooReplicaEngine

from policy_server.errors import Conflict
from policy_server.llm.weight_publish import (
    Peer,
    Replicas,
    ReplicaSyncClient,
    TransferReceiver,
    WeightPublisher,
    check_complete,
    direct_backend,
)

SHAPES = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,)}


class ThreadReplicas(Replicas):
    """``Replicas`` in this process, each call on every receiver at once (a Serve broadcast's
    concurrency: the ranks of a group must all be in its rendezvous and its broadcasts together)."""

    def __init__(self, receivers: list[TransferReceiver]) -> None:
        self.receivers = receivers
        self.calls: list[str] = []

    def _broadcast(self, method: str, *args: Any) -> list[Any]:
        self.calls.append(method)
        with ThreadPoolExecutor(len(self.receivers)) as pool:
            return list(pool.map(lambda r: getattr(r, method)(*args), self.receivers))


def receivers(n: int, start: int = 0) -> list[TransferReceiver]:
    return [TransferReceiver(GlooReplicaEngine(), "float32", None, f"replica-{i}") for i in range(start, start + n)]


def weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}


@pytest.fixture(autouse=True)
def checkpoint_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The receivers' checkpoint is ``SHAPES`` (a replica reads its folder's safetensors headers)."""
    monkeypatch.setattr("policy_server.llm.checkpoint.weight_shapes", lambda folder: dict(SHAPES))


def peer(replica_id: str, backend: str | None = "gloo", gpus: tuple[str, ...] = ()) -> Peer:
    return Peer(replica_id, backend, 2 if replica_id == "b" else 1, 0, "float32", dict(SHAPES), None, gpus)


def test_each_replica_joins_after_the_trainer_and_the_replicas_before_it() -> None:
    client = ReplicaSyncClient(ThreadReplicas([]), [peer("a"), peer("b"), peer("c")], group="g")  # b: 2 ranks
    assert client.offsets == {"a": 1, "b": 2, "c": 4}
    assert client.world_size == 5


def test_the_direct_backend_is_the_one_every_replica_accepts_and_nccl_needs_a_gpu_of_the_trainers_own() -> None:
    trainer = ("10.0.0.1:1",)
    assert direct_backend([peer("a"), peer("b")], trainer_gpus=()) == "gloo"
    assert direct_backend([peer("a"), peer("b", backend=None)], trainer) is None  # a replica without
    assert direct_backend([peer("a", "nccl", ("10.0.0.1:0",)), peer("b", "gloo")], trainer) is None
    assert direct_backend([peer("a", "nccl", ("10.0.0.1:0",))], trainer_gpus=()) is None  # a trainer on CPU
    assert direct_backend([peer("a", "nccl", ("10.0.0.1:0",)), peer("c", "nccl", ("10.0.0.2:1",))], trainer) == "nccl"
    # NCCL refuses two ranks on one device: a trainer sharing a replica's GPU publishes through Serve
    assert direct_backend([peer("a", "nccl", ("10.0.0.1:0",)), peer("c", "nccl", ("10.0.0.1:1",))], trainer) is None


def test_a_direct_transfer_refuses_what_it_cannot_load_whole() -> None:
    good = weights(0)
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        check_complete({"model.embed_tokens.weight": good["model.embed_tokens.weight"]}, SHAPES, torch.float32, 1)
    with pytest.raises(ValueError, match=r"unknown \['lm_head.weight'\]"):
        check_complete({**good, "lm_head.weight": torch.zeros(8, 4)}, SHAPES, torch.float32, 1)
    with pytest.raises(ValueError, match="wrong shapes"):
        check_complete({**good, "model.norm.weight": torch.zeros(5)}, SHAPES, torch.float32, 1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_complete({**good, "model.norm.weight": torch.tensor([0.0, float("nan"), 0.0, 0.0])}, SHAPES, torch.float32, 1)
    edge = {**good, "model.norm.weight": torch.tensor([3.0e38, 1.0, 1.0, 1.0])}  # finite in float32
    check_complete(edge, SHAPES, torch.float32, 1)
    check_complete(edge, SHAPES, torch.bfloat16, 1)  # bfloat16 has float32's range
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_complete(edge, SHAPES, torch.float16, 1)  # above float16's 65504: infinite once served


def test_two_replicas_receive_every_weight_over_gloo_and_a_new_replica_set_gets_a_new_group() -> None:
    first = receivers(2)
    replicas = ThreadReplicas(first)
    publisher = WeightPublisher(replicas, "127.0.0.1", trainer_gpus=())
    try:
        for version, seed in ((1, 1), (2, 2)):
            sent = weights(seed)
            assert publisher.publish(sent) == version and publisher.path == "gloo"
            for r in first:
                assert r.engine.version == version
                assert {n: t.tolist() for n, t in r.engine.weights.items()} == {n: t.tolist() for n, t in sent.items()}
        assert [r.engine.ranks for r in first] == [[1], [2]]  # one group for both publishes
        assert replicas.calls.count("init_weight_transfer") == 1 and "set_weights" not in replicas.calls

        replicas.receivers = [*first, *receivers(1, start=2)]  # Serve started a third replica
        sent = weights(3)
        assert publisher.publish(sent) == 3
        assert [r.engine.ranks for r in replicas.receivers] == [[1, 1], [2, 2], [3]]  # a group of 4 ranks
        assert all(torch.equal(r.engine.weights["model.norm.weight"], sent["model.norm.weight"]) for r in replicas.receivers)
    finally:
        publisher.close()
    assert all(r.group is None for r in replicas.receivers)


def test_a_replica_another_publisher_took_over_is_planned_again() -> None:
    shared = receivers(2)
    grpo = WeightPublisher(ThreadReplicas(shared), "127.0.0.1", trainer_gpus=())
    x1 = WeightPublisher(ThreadReplicas(shared), "127.0.0.1", trainer_gpus=())
    try:
        assert grpo.publish(weights(1)) == 1
        assert x1.publish(weights(2)) == 2  # its own group: the replicas leave GRPO's
        assert {r.group for r in shared} == {x1.group}
        sent = weights(3)
        assert grpo.publish(sent) == 3  # its group is gone: a new one
        assert all(torch.equal(r.engine.weights["model.embed_tokens.weight"], sent["model.embed_tokens.weight"]) for r in shared)
    finally:
        grpo.close()
        x1.close()


def test_a_transfer_that_stops_half_way_is_published_again_through_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica's worker fails after the first tensor: no replica may keep a half-loaded model."""
    monkeypatch.setattr("policy_server.llm.vllm_transfer.TIMEOUT", timedelta(seconds=2))  # a rank gone: 2 s
    shared = receivers(2)
    worker = shared[1].engine.worker
    load = worker.model.load_weights

    def lost(pairs: Any) -> None:
        raise RuntimeError("the worker died")

    worker.model.load_weights = lost
    publisher = WeightPublisher(ThreadReplicas(shared), "127.0.0.1", trainer_gpus=())
    try:
        sent = weights(1)
        assert publisher.publish(sent) == 2 and publisher.path == "rpc"  # version 1 went half-way
        for r in shared:
            assert r.engine.version == 2 and all(torch.equal(r.engine.weights[n], t) for n, t in sent.items())
        assert all(r.group is None for r in shared)  # the group is closed

        worker.model.load_weights = load
        assert publisher.publish(weights(2)) == 3 and publisher.path == "gloo"  # a new group
    finally:
        publisher.close()


def test_refused_weights_and_stale_versions_change_nothing_and_open_no_group() -> None:
    shared = receivers(2)
    replicas = ThreadReplicas(shared)
    publisher = WeightPublisher(replicas, "127.0.0.1", trainer_gpus=())
    bad = {**weights(1), "model.norm.weight": torch.full((4,), float("inf"))}
    with pytest.raises(ValueError, match="NaN or infinite"):
        publisher.publish(bad)
    with pytest.raises(Conflict, match="not newer"):
        publisher.publish(weights(1), version=0)
    assert replicas.calls == ["weight_transfer_peer", "weight_transfer_peer"]
    assert all(r.engine.version == 0 and r.engine.weights == {} and r.group is None for r in shared)


def test_replicas_without_a_direct_backend_get_set_weights_as_the_newest_version_plus_one() -> None:
    plain = receivers(2)
    for r, version in zip(plain, (4, 6), strict=True):
        r.engine.transfer_backend, r.engine.version = None, version  # the transformers engine, say
    replicas = ThreadReplicas(plain)
    publisher = WeightPublisher(replicas, "127.0.0.1", trainer_gpus=("10.0.0.1:0",))
    partial = {"model.norm.weight": torch.ones(4)}  # set_weights takes part of the weights
    assert publisher.publish(partial) == 7 and publisher.path == "rpc"
    assert replicas.calls == ["weight_transfer_peer", "set_weights"]
    assert all(r.engine.version == 7 and torch.equal(r.engine.weights["model.norm.weight"], torch.ones(4)) for r in plain)


def test_a_receiver_refuses_a_group_it_is_not_in_before_waiting_for_anyone() -> None:
    (receiver,) = receivers(1)
    with pytest.raises(RuntimeError, match="not in weight transfer group g1"):
        receiver.receive_weights({"names": [], "dtype_names": [], "shapes": []}, 1, "g1")
    with pytest.raises(RuntimeError, match="not in the weight transfer group's plan"):
        receiver.init_weight_transfer({}, {"another-replica": 1}, "g1")
    receiver.shutdown_weight_transfer("g1")  # not its group: nothing to leave
    assert receiver.group is None and receiver.engine.version == 0
