"""The trainer of a policy as a Ray actor (``TrainerActor``), beside the policy's Serve deployment.

A thin adapter: it loads its own copy of the model from the file's bytes (no shared files between
nodes), builds a ``Trainer`` whose publications reach every serving replica through the
deployment's ``broadcast`` (replicas that start later too: ``replica_sync``), and reports to Ray's
metrics export (``ray_policy_server_training_*`` on :8080). Its methods run in a thread pool, so requests never wait for an update.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ray
from ray import serve
from ray.util import metrics as ray_metrics

from policy_server.devices import AUTO, resolve_device
from policy_server.policies.torch_policy import ModelFormat, load_module
from policy_server.schema.training import TrainingSpec
from policy_server.serving.replica_sync import LatestWeights, ServePolicyReplicas
from policy_server.training.collect import Acted
from policy_server.training.experience import ExperienceBatch
from policy_server.training.guard import Reason
from policy_server.training.trainer import Trainer, TrainerMetrics, build_trainer


class RayTrainerMetrics(TrainerMetrics):
    """The trainer's numbers as Ray metrics, tagged with the policy and its Serve application."""

    def __init__(self, policy: str, application: str) -> None:
        keys = ("policy", "application")
        self._samples = ray_metrics.Counter(
            "policy_server_training_samples", description="Samples accepted for training.", tag_keys=keys
        )
        self._rejected = ray_metrics.Counter(
            "policy_server_training_samples_rejected",
            description="Samples rejected, by reason (stale, malformed).",
            tag_keys=(*keys, "reason"),
        )
        self._rate = ray_metrics.Gauge(
            "policy_server_training_samples_per_second", description="Samples received per second.", tag_keys=keys
        )
        self._clients = ray_metrics.Gauge(
            "policy_server_training_active_clients", description="Clients seen within the timeout.", tag_keys=keys
        )
        self._update = ray_metrics.Histogram(
            "policy_server_training_update_seconds",
            description="Time of one trainer update.",
            boundaries=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30],
            tag_keys=keys,
        )
        self._version = ray_metrics.Gauge(
            "policy_server_training_model_version", description="Last version the trainer published.", tag_keys=keys
        )
        self._last = ray_metrics.Gauge(
            "policy_server_training_episode_return", description="Return of the last episode.", tag_keys=keys
        )
        self._best = ray_metrics.Gauge(
            "policy_server_training_best_mean_return",
            description="Best moving average of the episode return.",
            tag_keys=keys,
        )
        self._skipped = ray_metrics.Counter(
            "policy_server_training_updates_skipped",
            description="Updates refused and rolled back, by what was non-finite "
            "(data, loss, gradient, weight, optimizer_state).",
            tag_keys=(*keys, "reason"),
        )
        for m in (self._samples, self._rejected, self._rate, self._clients, self._update, self._version,
                  self._last, self._best, self._skipped):
            m.set_default_tags({"policy": policy, "application": application})

    def received(self, accepted: int, stale: int) -> None:
        if accepted:
            self._samples.inc(accepted)
        if stale:
            self._rejected.inc(stale, tags={"reason": "stale"})

    def malformed(self, n: int) -> None:
        self._rejected.inc(n, tags={"reason": "malformed"})

    def updated(self, seconds: float, version: int) -> None:
        self._update.observe(seconds)
        self._version.set(version)

    def skipped(self, reason: Reason) -> None:
        self._skipped.inc(1, tags={"reason": reason})

    def returns(self, last: float | None, best: float | None) -> None:
        if last is not None:
            self._last.set(last)
        if best is not None:
            self._best.set(best)

    def gauges(self, active_clients: int, samples_per_second: float) -> None:
        self._clients.set(active_clients)
        self._rate.set(samples_per_second)


@ray.remote
class TrainerActor:
    def __init__(
        self,
        policy: str,
        spec: TrainingSpec,
        model_bytes: bytes,
        fmt: ModelFormat,
        space: Any,
        obs_dim: int,
        deployment: str,
        app_name: str,
        use_gpu: bool,
        recurrent: Any = None,
    ) -> None:
        import torch

        device = str(resolve_device(AUTO, use_gpu))
        # torch's default of one thread per core makes the small ops of RL updates slower, not faster,
        # when the node's cores are shared with clients, replicas and Ray (measured: ms per op)
        torch.set_num_threads(max(1, int(spec.num_cpus)))
        replicas = ServePolicyReplicas(serve.get_deployment_handle(deployment, app_name))
        # replicas Serve starts later (autoscaling, a replacement) get the newest weights too
        self.replicas = LatestWeights(replicas)
        version = 0
        if ray.get_runtime_context().was_current_actor_reconstructed:
            # Ray restarted this actor after its process died: go on from the newest checkpoint,
            # numbered past what the replicas serve now (clients act with that version)
            spec = dataclasses.replace(spec, resume=True)
            version = max(replicas.versions(), default=0)
        module = load_module(model_bytes, fmt, device)
        self.trainer: Trainer = build_trainer(
            policy, spec, module, space, obs_dim, self.replicas.publish, RayTrainerMetrics(policy, app_name), device,
            version, recurrent,
        )
        self.trainer.open()
        self.replicas.start()

    # The API of ``serving.api.PolicyTrainer``, each method the trainer's own.

    def register(self, client_id: str, info: dict[str, Any] | None) -> dict[str, Any]:
        return self.trainer.register(client_id, info)

    def heartbeat(self, client_id: str) -> dict[str, Any]:
        return self.trainer.heartbeat(client_id)

    def submit(self, batch: ExperienceBatch) -> dict[str, Any]:
        return self.trainer.submit(batch)

    def collect(self, client_id: str, acted: Acted, reward: float, done: bool) -> dict[str, Any]:
        return self.trainer.collect(client_id, acted, reward, done)

    def count_malformed(self, n: int, client_id: str | None) -> None:
        self.trainer.count_malformed(n, client_id)

    def status(self) -> dict[str, Any]:
        return self.trainer.status()

    def start(self) -> dict[str, Any]:
        return self.trainer.start()

    def pause(self) -> dict[str, Any]:
        return self.trainer.pause()

    def stop(self) -> dict[str, Any]:
        return self.trainer.stop()

    def save(self) -> dict[str, Any]:
        return self.trainer.save()

    def resume(self, name: str | None) -> dict[str, Any]:
        return self.trainer.resume(name)

    def checkpoints(self) -> dict[str, Any]:
        return self.trainer.checkpoints()

    def checkpoint_weights(self, name: str) -> dict[str, Any]:
        return self.trainer.checkpoint_weights(name)

    def close(self) -> None:
        self.replicas.close()
        self.trainer.close()
