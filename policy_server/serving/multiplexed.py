"""Many policies per replica (``policies_dir``): a Serve deployment that loads each policy id's model
file on demand into a bounded LRU (Ray Serve's model multiplexing, ``@serve.multiplexed``), and the
gateway's typed adapter to it.

Requests carry the id as Serve's ``multiplexed_model_id`` (``handle.options``), so Serve's router
sends an id to a replica that already holds it where one does. The direct transport
(``serving.transport``) does not apply: it bypasses Serve's router, which is what picks the
replica by model id; every batch goes through the handle.

Every node that runs a replica must read ``policies_dir`` at the same path (as LLM model folders):
the files are read where they are served, never sent through Ray.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from ray.util import metrics

from policy_server.devices import AUTO, resolve_device
from policy_server.policies.multiplex import Signature, load_policy
from policy_server.policies.served import resolve_policy
from policy_server.policies.torch_policy import PolicyOutput, TorchPolicy
from policy_server.schema.config import PolicySpec
from policy_server.serving.errors import remote
from policy_server.serving.runtime.transports import answers_in_time

TAG_KEYS = ("policy", "application")


class _Loaded:
    """One policy id's model in Serve's LRU; Serve calls ``__del__`` when it evicts it (its documented
    hook), which the replica counts. Python may call ``__del__`` again when it frees the object."""

    def __init__(self, policy_id: str, policy: TorchPolicy, evicted: Callable[[str], None]) -> None:
        self.policy_id, self.policy, self._evicted = policy_id, policy, evicted
        self._gone = False

    def __del__(self) -> None:
        if not self._gone:
            self._gone = True
            self._evicted(self.policy_id)


@serve.deployment
class MultiplexedPolicyDeployment:
    """Holds up to ``resources.max_models_per_replica`` policies of ``spec.policies_dir``."""

    def __init__(self, spec: PolicySpec, use_gpu: bool) -> None:
        assert spec.policies_dir is not None
        self.device = str(resolve_device(AUTO, use_gpu))
        served, reference = resolve_policy(spec)  # the start-up file, against the schema, as the gateway did
        self.signature = Signature.of(reference, served.obs_dim, served.obs_shape, served.obs_dtype.name)
        self.folder: Path = spec.policies_dir
        self.loaded: dict[str, None] = {}  # ids held now, for replica_stats
        self.loads = self.evictions = 0
        self._lock = threading.Lock()
        tags = {"policy": spec.name, "application": serve.get_replica_context().app_name}
        self._load_count = metrics.Counter(
            "policy_server_replica_model_loads", description="Policy ids loaded into a replica's LRU.", tag_keys=TAG_KEYS
        )
        self._evict_count = metrics.Counter(
            "policy_server_replica_model_evictions", description="Policy ids evicted from a replica's LRU.",
            tag_keys=TAG_KEYS,
        )
        for m in (self._load_count, self._evict_count):
            m.set_default_tags(tags)
        # the LRU's size is the schema's: the decorator is applied here, not on the class (Serve
        # finds a multiplexed loader set as an instance attribute at start)
        size = spec.resources.max_models_per_replica
        self._model: Callable[[str], Awaitable[_Loaded]] = serve.multiplexed(max_num_models_per_replica=size)(self._loader())

    def _loader(self) -> Callable[[str], Awaitable[_Loaded]]:
        async def load_policy_id(policy_id: str) -> _Loaded:
            policy = await asyncio.to_thread(load_policy, self.folder, policy_id, self.signature, self.device)
            with self._lock:
                self.loaded[policy_id] = None
                self.loads += 1
            self._load_count.inc()
            return _Loaded(policy_id, policy, self._evicted)

        return load_policy_id

    def _evicted(self, policy_id: str) -> None:
        with self._lock:
            self.loaded.pop(policy_id, None)
            self.evictions += 1
        self._evict_count.inc()

    async def forward(self, obs: np.ndarray) -> PolicyOutput:
        """The heads of the request's policy id (Serve's multiplexed model id) for ``obs``; raises
        NotFound or ModelError (``policies.multiplex.load_policy``) for that id alone."""
        loaded = await self._model(serve.get_multiplexed_model_id())
        return await asyncio.to_thread(loaded.policy.forward, obs)

    def replica_stats(self) -> dict[str, Any]:
        """This replica's process id, the ids it holds, and its loads and evictions so far."""
        with self._lock:
            return {"pid": os.getpid(), "loaded": sorted(self.loaded), "loads": self.loads, "evictions": self.evictions}


def build_multiplexed_deployment(spec: PolicySpec, name: str, gpus_available: bool) -> Application:
    """The Serve application of a ``policies_dir`` policy, with the schema's resources."""
    res = spec.resources
    num_gpus = res.num_gpus if gpus_available else 0.0
    return MultiplexedPolicyDeployment.options(
        name=name,
        **res.serve_options(),
        max_ongoing_requests=2 * res.concurrent_batches,
        ray_actor_options={"num_cpus": res.num_cpus, "num_gpus": num_gpus},
    ).bind(spec, num_gpus > 0)


class ServeMultiplexedModel:
    """``serving.api.MultiplexedModel`` on the deployment's handle: each batch is routed by its
    policy id (``multiplexed_model_id``)."""

    what = "the policy's deployment"

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def forward(self, obs: np.ndarray, policy_id: str) -> PolicyOutput:
        call = self.handle.options(multiplexed_model_id=policy_id).forward.remote
        return await remote(self.what, call, obs)

    async def ready(self) -> bool:
        return await answers_in_time(self.handle.replica_stats.remote())

    async def replica_stats(self) -> list[dict[str, Any]]:
        return await remote(self.what, self.handle.broadcast("replica_stats").results_async)  # type: ignore[no-any-return]
