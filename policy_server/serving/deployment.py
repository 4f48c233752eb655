"""The Ray Serve deployment of a torch policy: a thin adapter around ``TorchPolicy``."""

from __future__ import annotations

import os
import secrets
import threading
import time

import numpy as np
import ray
from ray import serve
from ray.serve import Application
from ray.util import metrics

from policy_server.devices import AUTO, resolve_device
from policy_server.policies.recurrent import state_layout
from policy_server.policies.torch_policy import ModelFormat, PolicyOutput, TorchPolicy
from policy_server.schema.config import PolicySpec
from policy_server.schema.recurrent import RecurrentSpec
from policy_server.serving.transport import TOKEN_BYTES, TransportServer

TAG_KEYS = ("policy", "application")


@serve.deployment
class PolicyDeployment:
    """Holds one ``TorchPolicy``; receives already-batched observations from the gateway."""

    def __init__(
        self, policy_name: str, model_bytes: bytes, fmt: ModelFormat, use_gpu: bool,
        recurrent: RecurrentSpec | None = None,
    ) -> None:
        device = str(resolve_device(AUTO, use_gpu))
        self.policy = TorchPolicy.from_bytes(model_bytes, fmt, device, state_layout(recurrent))
        # The direct data path (see transport): its secret reaches gateways only through Serve.
        self._token = secrets.token_hex(TOKEN_BYTES)
        self._transport = TransportServer(self.forward, self._token, ray.util.get_node_ip_address())
        # the Serve application tells two servers' same-named policies apart on one Ray cluster
        tags = {"policy": policy_name, "application": serve.get_replica_context().app_name}
        self._rows = metrics.Histogram(
            "policy_server_replica_batch_rows",
            description="Observations per forward pass on a replica.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096],
            tag_keys=TAG_KEYS,
        )
        self._seconds = metrics.Histogram(
            "policy_server_replica_forward_seconds",
            description="Forward-pass time on a replica.",
            boundaries=[0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0],
            tag_keys=TAG_KEYS,
        )
        self._version = metrics.Gauge(
            "policy_server_model_version", description="Model version served.", tag_keys=TAG_KEYS
        )
        for m in (self._rows, self._seconds, self._version):
            m.set_default_tags(tags)
        self._version.set(self.policy.version)
        self._batches = 0
        self._count_lock = threading.Lock()  # forward runs in Serve's thread and the transport's threads

    def forward(self, obs: np.ndarray) -> PolicyOutput:
        start = time.perf_counter()
        out = self.policy.forward(obs)
        self._seconds.observe(time.perf_counter() - start)
        self._rows.observe(len(obs))
        with self._count_lock:
            self._batches += 1
        return out

    def replica_stats(self) -> dict[str, int]:
        """This replica's process id and the batches it answered so far, by either path (for
        ``handle.broadcast``: how the work spreads over the replicas)."""
        return {"pid": os.getpid(), "batches": self._batches}

    def transport_endpoint(self) -> tuple[str, int, str]:
        """Host, port and token where this replica takes batches directly."""
        return (*self._transport.address, self._token)

    def version(self) -> int:
        return self.policy.version

    def get_weights(self) -> dict[str, np.ndarray]:
        return self.policy.get_weights()

    def snapshot(self) -> tuple[dict[str, np.ndarray], int]:
        return self.policy.snapshot()

    def set_weights(self, weights: dict[str, np.ndarray], version: int) -> int:
        """Serve these weights as ``version``; raises ValueError, serving the old ones, when they do
        not fit the model or hold a NaN or an infinity."""
        version = self.policy.set_weights(weights, version)
        self._version.set(version)
        return version


def deployment_name(policy: str) -> str:
    return f"policy-{policy}"


def build_deployment(
    spec: PolicySpec,
    model_bytes: bytes,
    fmt: ModelFormat,
    gpus_available: bool,
) -> Application:
    """The Serve application of one policy, with the schema's resources.

    The model travels as bytes, so replicas on other nodes need no shared file system. GPUs are
    requested only where the cluster has them: a schema asking for one still serves on CPU. With
    ``num_replicas: auto`` Serve starts and stops replicas (``schema.replicas``).
    """
    res = spec.resources
    num_gpus = res.num_gpus if gpus_available else 0.0
    return PolicyDeployment.options(
        name=deployment_name(spec.name),
        **res.serve_options(),  # a fixed num_replicas, or Serve's autoscaling_config
        # never the cap: a gateway keeps concurrent_batches in flight, which with `auto` is at least
        # target_ongoing_requests × max_replicas, so one replica can hold them all while Serve scales
        max_ongoing_requests=2 * res.concurrent_batches,
        ray_actor_options={"num_cpus": res.num_cpus, "num_gpus": num_gpus},
    ).bind(spec.name, model_bytes, fmt, num_gpus > 0, spec.recurrent)
