"""Direct weight transfer from a trainer into vLLM's workers, on vLLM's weight-transfer API.

vLLM 0.32 loads weights broadcast by a trainer through ``AsyncLLM.init_weight_transfer_engine``,
``start_weight_update``, ``update_weights`` and ``finish_weight_update`` (its API for RL
trainers), with the trainer at rank 0 of a collective group and each vLLM worker at rank
``rank_offset + its rank``. Two backends:

- ``nccl``: vLLM's own ``NCCLWeightTransferEngine`` / ``NCCLTrainerWeightTransferEngine``, GPU to
  GPU, used unchanged.
- ``gloo``: the same protocol over torch's Gloo process group (TCP, CPU tensors), for replicas on
  CPU. vLLM has no CPU backend, so this one is ours: it subclasses vLLM's NCCL engines and
  replaces only the communicator (``GlooGroup``) and the unpacked send and receive loops, which
  vLLM writes against CUDA streams. It is what tests the whole protocol on a machine without GPUs.

Importing this module adds ``gloo`` to vLLM's factory of worker engines (``vllm_worker`` imports
it in vLLM's workers, ``vllm_engine`` in the replica). The trainer side is ``trainer_engine``,
which ``weight_publish`` drives.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    VLLMWeightSyncClient,
    WeightSource,
    WeightTransferInitRequest,
    WeightTransferUpdateRequest,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLTrainerInitInfo,
    NCCLTrainerWeightTransferEngine,
    NCCLWeightTransferEngine,
    NCCLWeightTransferUpdateInfo,
)
from vllm.v1.engine.async_llm import AsyncLLM

GLOO = "gloo"
TIMEOUT = timedelta(seconds=60)
"""How long a Gloo rank waits for its peers (rendezvous, then each broadcast) before it raises: a
replica's generation stays paused while it waits. NCCL's ranks wait without limit."""


class GlooGroup:
    """The trainer and vLLM's workers in one Gloo process group over a TCP store (the trainer, rank
    0, hosts the store); ``broadcast`` and ``destroy`` as vLLM's ``PyNcclCommunicator`` has them."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int) -> None:
        store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=TIMEOUT)
        self._group: dist.ProcessGroupGloo | None = dist.ProcessGroupGloo(store, rank, world_size, TIMEOUT)
        self._store = store

    def broadcast(self, tensor: torch.Tensor, src: int, stream: Any = None) -> None:
        """Send ``tensor`` (contiguous, CPU) from rank ``src`` into every other rank's ``tensor``."""
        assert self._group is not None, "the group was destroyed"
        options = dist.BroadcastOptions()
        options.rootRank = src
        self._group.broadcast([tensor], options).wait()

    def destroy(self) -> None:
        self._group = None


class GlooWeightTransferEngine(NCCLWeightTransferEngine):
    """vLLM's worker side of ``gloo``: joins the group at ``rank_offset`` + the worker's rank and
    receives one tensor at a time into the model's ``load_weights`` (layer-wise reload as NCCL's)."""

    def init_transfer_engine(self, init_info: NCCLWeightTransferInitInfo) -> None:
        assert init_info.master_address is not None and init_info.master_port is not None
        config = self.parallel_config
        rank = config.data_parallel_index * config.world_size + config.rank + init_info.rank_offset
        self.model_update_group = GlooGroup(  # type: ignore[assignment]
            init_info.master_address, init_info.master_port, rank, init_info.world_size
        )

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))  # no accelerator to synchronize

    def receive_weights(self, update_info: NCCLWeightTransferUpdateInfo) -> None:
        if self.model_update_group is None:
            raise RuntimeError("gloo weight transfer not initialized: call init_weight_transfer_engine first")
        for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes, strict=True):
            weight = torch.empty(shape, dtype=getattr(torch, dtype_name))
            self.model_update_group.broadcast(weight, src=0)
            self.model.load_weights([(name, weight)])


class GlooTrainerWeightTransferEngine(NCCLTrainerWeightTransferEngine):
    """The trainer side of ``gloo`` (rank 0): NCCL's protocol, unpacked, over ``GlooGroup``."""

    @classmethod
    def trainer_init(
        cls, init_info: NCCLTrainerInitInfo, *, client: VLLMWeightSyncClient, source: WeightSource | None = None,
    ) -> GlooTrainerWeightTransferEngine:
        if source is None:
            raise ValueError("the gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, packed=False)
        worker_info = NCCLWeightTransferInitInfo(
            master_address=init_info.master_address, master_port=init_info.master_port,
            rank_offset=1, world_size=init_info.world_size, packed=False,
        )
        # the workers wait inside init_weight_transfer_engine for the rendezvous: both sides at once
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, worker_init_payload(worker_info))
            engine.model_update_group = GlooGroup(  # type: ignore[assignment]
                init_info.master_address, init_info.master_port, 0, init_info.world_size
            )
            joined.result()
        return engine

    def _broadcast(self, source: WeightSource, meta: list[ParamMeta]) -> None:
        assert self.model_update_group is not None
        for _, tensor in self._checked_iter(source, meta):
            self.model_update_group.broadcast(tensor.detach().cpu().contiguous(), src=0)

    def _post_send_sync(self) -> None:
        pass  # Gloo's broadcast returns once sent


class TensorSource(WeightSource):
    """A ``WeightSource`` over a dict of named tensors (checkpoint names), each sent on ``device``."""

    def __init__(self, weights: Mapping[str, torch.Tensor], device: str) -> None:
        self.weights, self.device = weights, device

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.weights.items()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.weights.items():
            yield name, tensor.to(self.device).contiguous()


def trainer_engine(
    backend: str, master_address: str, master_port: int, world_size: int, client: VLLMWeightSyncClient,
    source: WeightSource,
) -> NCCLTrainerWeightTransferEngine:
    """Open the trainer's side (rank 0) of a ``backend`` group of ``world_size`` ranks and make every
    worker join it through ``client`` (whose ``init_weight_transfer_engine`` places each replica's
    workers after the trainer). Blocks until all have joined; raises what a side raised."""
    info = NCCLTrainerInitInfo(master_address=master_address, master_port=master_port, world_size=world_size,
                               packed=backend != GLOO, rank=0)
    cls = GlooTrainerWeightTransferEngine if backend == GLOO else NCCLTrainerWeightTransferEngine
    return cls.trainer_init(info, client=client, source=source)


async def join(llm: AsyncLLM, init_info: dict[str, Any]) -> None:
    """Make ``llm``'s workers join a trainer's group (``init_info``: the worker side's, with this
    replica's ``rank_offset``); returns once every rank has joined."""
    await llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))


async def receive(llm: AsyncLLM, update_info: dict[str, Any]) -> None:
    """Receive one broadcast of weights into ``llm``'s workers (vLLM's layer-wise reload), then tie
    a tied output layer to the new embedding again (``vllm_worker.WeightLoader.retie_lm_head``)."""
    await llm.start_weight_update()
    await llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))
    await llm.finish_weight_update()
    await llm.collective_rpc("retie_lm_head")


if GLOO not in WeightTransferEngineFactory._registry:
    WeightTransferEngineFactory.register_engine(GLOO, GlooWeightTransferEngine)
