"""Publishing a trainer's weights into every replica of the served LLM policy.

Two paths. Through Serve (``rpc``): every replica gets the weights as ``set_weights`` arguments
and loads them into its vLLM worker (the only path for the transformers engine, adapters and the
value model). Direct (``nccl`` on GPUs, ``gloo`` on CPU; ``vllm_transfer``): the trainer is rank 0
of a collective group that every replica's vLLM workers joined, and broadcasts the weights
straight into them; Serve carries only the control calls and the parameter list.

vLLM's trainer engine places every worker at ``rank_offset`` 1, which fits one vLLM engine.
``ReplicaSyncClient`` (vLLM's ``VLLMWeightSyncClient`` protocol, over our replicas) gives each
replica its own offset, so one broadcast reaches all of them. The group is planned for the replica
set it was opened with: ``WeightPublisher`` opens a new one when Serve's set of replicas changes
(one replaced, scaled). A transfer that fails half-way (a replica or the network gone: Gloo gives
up after ``vllm_transfer.TIMEOUT``) closes the group and publishes the same weights through Serve,
so no replica keeps a half-loaded model; the next publish opens a new group.
"""

from __future__ import annotations

import logging
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from policy_server.llm.engine import check_newer
from policy_server.net import free_port

log = logging.getLogger(__name__)


class Replicas(ABC):
    """Every replica of the served deployment (its ``ReceivesWeights`` methods), each call made on
    all of them at once; the answers come in any order, and what one replica raised is raised."""

    def weight_transfer_peers(self) -> list[tuple[Any, ...]]:
        return self._broadcast("weight_transfer_peer")

    def set_weights(self, weights: dict[str, Any], version: int) -> list[int]:
        return self._broadcast("set_weights", weights, version)

    def init_weight_transfer(self, init_info: dict[str, Any], offsets: dict[str, int], group: str) -> None:
        self._broadcast("init_weight_transfer", init_info, offsets, group)

    def receive_weights(self, update_info: dict[str, Any] | list[dict[str, Any]], version: int, group: str) -> None:
        self._broadcast("receive_weights", update_info, version, group)

    def shutdown_weight_transfer(self, group: str) -> None:
        self._broadcast("shutdown_weight_transfer", group)

    @abstractmethod
    def _broadcast(self, method: str, *args: Any) -> list[Any]:
        """``method`` of ``ReceivesWeights`` / ``TransferReceiver`` on every replica."""


class ServeReplicas(Replicas):
    """``Replicas`` over a Serve deployment handle (Serve's ``broadcast`` names the method)."""

    def __init__(self, handle: Any, timeout_s: float = 300) -> None:
        self.handle, self.timeout_s = handle, timeout_s

    def _broadcast(self, method: str, *args: Any) -> list[Any]:
        return self.handle.broadcast(method, *args).results(timeout_s=self.timeout_s)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Peer:
    """What one replica reports for a transfer: its Serve replica id, the backend its vLLM engine
    accepts (None: ``set_weights`` only), how many workers (ranks) it has, its served version, the
    dtype it serves, its checkpoint's tensor shapes by name (empty without a backend), the
    publisher whose group its workers are in (None: none), and its GPUs (``assigned_gpus``)."""

    replica_id: str
    backend: str | None
    ranks: int
    version: int
    dtype: str
    shapes: dict[str, tuple[int, ...]]
    group: str | None
    gpus: tuple[str, ...] = ()


class ReplicaSyncClient:
    """vLLM's ``VLLMWeightSyncClient`` over our replicas: each replica's workers join at their own
    ``rank_offset`` (1, then after the previous replica's ranks), and each replica's
    ``receive_weights`` pauses, receives, finishes and resumes in one call (so a trainer that dies
    mid-way never leaves a replica paused): ``start_weight_update`` and ``finish_weight_update``
    have nothing left to do. Set ``version`` before each ``send_weights``."""

    def __init__(self, replicas: Replicas, peers: list[Peer], group: str) -> None:
        self.replicas, self.group = replicas, group
        self.offsets: dict[str, int] = {}
        rank = 1  # the trainer is rank 0
        for peer in peers:
            self.offsets[peer.replica_id] = rank
            rank += peer.ranks
        self.world_size = rank
        self.version = 0

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.replicas.init_weight_transfer(init_info, self.offsets, self.group)

    def start_weight_update(self) -> None:
        pass

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self.replicas.receive_weights(update_info, self.version, self.group)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        pass

    def shutdown_weight_transfer_engine(self) -> None:
        self.replicas.shutdown_weight_transfer(self.group)


class TransferReceiver:
    """One replica's side of publishing, around its policy engine: what ``Peer`` reports, joining
    and leaving a publisher's group, receiving into the engine, and ``set_weights``. A replica is in
    one group at a time: joining another leaves the first; calls naming a group it is not in fail
    before waiting for anyone."""

    def __init__(
        self, engine: Any, dtype: str, folder: Any, replica_id: str, on_version: Callable[[int], None] | None = None,
    ) -> None:
        self.engine, self.dtype, self.folder, self.replica_id = engine, dtype, folder, replica_id
        self.on_version = on_version
        self.group: str | None = None
        self._fixed_peer: tuple[str | None, dict[str, tuple[int, ...]], tuple[str, ...]] | None = None

    def weight_transfer_peer(self) -> tuple[Any, ...]:
        backend, shapes, gpus = self._fixed()
        return self.replica_id, backend, 1, self.engine.version, self.dtype, shapes, self.group, gpus

    def _fixed(self) -> tuple[str | None, dict[str, tuple[int, ...]], tuple[str, ...]]:
        """The backend, the checkpoint's shapes and the GPUs: read once (the folder's headers are
        not read again every publish), as a replica's folder and GPUs never change."""
        if self._fixed_peer is None:
            from policy_server.llm.checkpoint import weight_shapes

            backend = getattr(self.engine, "transfer_backend", None)  # the transformers engine has none
            self._fixed_peer = backend, weight_shapes(self.folder) if backend else {}, assigned_gpus()
        return self._fixed_peer

    def init_weight_transfer(self, init_info: dict[str, Any], offsets: dict[str, int], group: str) -> None:
        if self.replica_id not in offsets:  # started after the publisher planned: its next plan has it
            raise RuntimeError(f"replica {self.replica_id} is not in the weight transfer group's plan")
        if self.group is not None:
            self.shutdown_weight_transfer(self.group)
        self.engine.init_weight_transfer({**init_info, "rank_offset": offsets[self.replica_id]})
        self.group = group

    def receive_weights(self, update_info: dict[str, Any], version: int, group: str) -> int:
        if group != self.group:
            raise RuntimeError(f"replica {self.replica_id} is not in weight transfer group {group}")
        return self._served(self.engine.receive_weights(update_info, version))

    def shutdown_weight_transfer(self, group: str) -> None:
        if group == self.group:
            self.group = None
            self.engine.shutdown_weight_transfer()

    def set_weights(self, weights: dict[str, Any], version: int) -> int:
        return self._served(self.engine.set_weights(weights, version))

    def _served(self, version: int) -> int:
        if self.on_version is not None:
            self.on_version(version)
        return version


class LocalReplicas(Replicas):
    """``Replicas`` of one engine in this process (the local backend)."""

    def __init__(self, receiver: TransferReceiver) -> None:
        self.receiver = receiver

    def _broadcast(self, method: str, *args: Any) -> list[Any]:
        return [getattr(self.receiver, method)(*args)]


def assigned_gpus() -> tuple[str, ...]:
    """The GPUs of this process as ``node:id``: those Ray gave it in an actor or Serve replica;
    outside one, all it sees, named ``this-process`` (a trainer and an engine in one process share them)."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        node = ray.util.get_node_ip_address()
        return tuple(f"{node}:{gpu}" for gpu in ray.get_gpu_ids())
    return ("this-process",) if torch.cuda.is_available() else ()


def direct_backend(peers: list[Peer], trainer_gpus: tuple[str, ...]) -> str | None:
    """The backend every replica accepts, if one fits the trainer: ``nccl`` needs the trainer on a
    GPU of its own (NCCL refuses two ranks on one device), ``gloo`` takes any. None: publish
    through Serve."""
    backends = {peer.backend for peer in peers}
    if len(backends) != 1 or None in backends:
        return None
    (backend,) = backends
    if backend == "nccl":
        replica_gpus = {gpu for peer in peers for gpu in peer.gpus}
        if not trainer_gpus or replica_gpus & set(trainer_gpus):
            return None
    return backend


class WeightPublisher:
    """Publishes a trainer's weights (checkpoint names; all of them for a direct transfer) into
    every replica as ``version``, directly when ``direct_backend`` finds a backend, else through
    Serve's ``set_weights``. ``host`` is the address of this trainer's node that the replicas'
    workers connect to."""

    def __init__(self, replicas: Replicas, host: str, trainer_gpus: tuple[str, ...] | None = None) -> None:
        self.replicas, self.host = replicas, host
        self.trainer_gpus = assigned_gpus() if trainer_gpus is None else trainer_gpus
        self.group = uuid.uuid4().hex  # names this publisher's groups to the replicas
        self._engine: Any = None  # vLLM's trainer engine of the open group
        self._client: ReplicaSyncClient | None = None
        self._planned: list[tuple[str, str | None, int]] = []  # the replicas the group was opened for
        self.path = ""  # the last publish's: rpc, nccl or gloo

    def publish(self, weights: dict[str, torch.Tensor], version: int | None = None) -> int:
        """Load ``weights`` into every replica as ``version`` (default: the newest served version
        + 1) and return the version served; sets ``path``. A direct transfer that fails is logged,
        its group closed, and the weights go through Serve as ``version + 1``. Raises ``Conflict``
        unless ``version`` is newer than every replica's, ValueError for weights a direct transfer
        cannot load (changing nothing), and what a replica raised for ``set_weights``."""
        peers = sorted((Peer(*p) for p in self.replicas.weight_transfer_peers()), key=lambda p: p.replica_id)
        version = max(p.version for p in peers) + 1 if version is None else version
        for peer in peers:
            check_newer(version, peer.version)  # before any rank waits for another
        backend = direct_backend(peers, self.trainer_gpus)
        if backend is None:
            self.replicas.set_weights(weights, version)
            self.path = "rpc"
            return version
        check_complete(weights, peers[0].shapes, getattr(torch, peers[0].dtype), version)
        try:
            self._send(backend, peers, weights, version)
        except Exception:
            # a broadcast that stopped half-way leaves a replica with some layers new: every
            # replica gets every weight again, through Serve, as the next version (the ones that
            # received the broadcast already serve ``version``)
            log.exception("the %s weight transfer of version %d failed: publishing it through Serve", backend, version)
            self.close()
            version += 1
            self.replicas.set_weights(weights, version)
            self.path = "rpc"
            return version
        self.path = backend
        return version

    def _send(self, backend: str, peers: list[Peer], weights: dict[str, torch.Tensor], version: int) -> None:
        from policy_server.llm.vllm_transfer import TensorSource, trainer_engine

        device = "cuda" if backend == "nccl" else "cpu"
        planned = [(p.replica_id, p.backend, p.ranks) for p in peers]
        joined = all(p.group == self.group for p in peers)  # another publisher may have taken a replica over
        if self._engine is None or planned != self._planned or not joined:
            self.close()
            self._client = ReplicaSyncClient(self.replicas, peers, self.group)
            self._engine = trainer_engine(backend, self.host, free_port(self.host), self._client.world_size,
                                          self._client, TensorSource({}, device))
            self._planned = planned
            log.info("weight transfer group open: %s, %d ranks", backend, self._client.world_size)
        assert self._client is not None
        self._engine.source = TensorSource(weights, device)
        self._client.version = version
        self._engine.send_weights()

    def close(self) -> None:
        """Close the open group, if any (each replica leaves it; a replica that cannot is logged)."""
        engine, client, self._engine, self._client, self._planned = self._engine, self._client, None, None, []
        if engine is None:
            return
        engine.shutdown()
        try:
            assert client is not None
            client.shutdown_weight_transfer_engine()
        except Exception:  # a replica gone or stuck: the next group is planned without it
            log.exception("a replica did not leave the weight transfer group")


def check_complete(
    weights: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, version: int
) -> None:
    """Refuse, before any rank waits, what a direct transfer cannot load whole: it replaces every
    weight (vLLM reloads layer by layer), so every checkpoint name must come, with its shape, and
    finite once cast to the served ``dtype``. Raises ValueError naming the offending weights."""
    missing, unknown = sorted(set(shapes) - set(weights)), sorted(set(weights) - set(shapes))
    if missing or unknown:
        raise ValueError(f"a direct weight transfer sends every weight: missing {missing[:5]}, unknown {unknown[:5]}")
    wrong = {n: (list(t.shape), list(shapes[n])) for n, t in weights.items() if tuple(t.shape) != tuple(shapes[n])}
    if wrong:
        raise ValueError(f"weights have the wrong shapes (given, expected): {dict(list(wrong.items())[:5])}")
    bad = [n for n, t in weights.items() if not bool(torch.isfinite(t.to(dtype)).all())]
    if bad:
        raise ValueError(f"refused weights of version {version}: {bad[:5]} hold NaN or infinite values; "
                         "the served weights stay")

