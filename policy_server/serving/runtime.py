"""Starting Ray and Serve, and deploying the policies of a schema on them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from policy_server.policies.torch_policy import model_format
from policy_server.schema.config import PolicySpec
from policy_server.schema.llm import LLMPolicySpec, LLMValueSpec
from policy_server.serving.backend import DirectBackend, PolicyBackend, ServeBackend
from policy_server.serving.deployment import build_deployment, deployment_name
from policy_server.settings import Settings

log = logging.getLogger(__name__)
TRAINER_START_TIMEOUT_S = 120.0


@dataclass
class ServeRuntime:
    """Owns what the gateway started on Ray: the Serve apps, and Ray itself if it started it."""

    settings: Settings
    started_ray: bool = False
    apps: list[str] = field(default_factory=list)
    backends: list[DirectBackend] = field(default_factory=list)

    def start(self) -> None:
        if not ray.is_initialized():
            if self.settings.ray_address:
                ray.init(address=self.settings.ray_address, log_to_driver=False)
            else:
                ray.init(
                    include_dashboard=False,
                    log_to_driver=False,
                    _metrics_export_port=self.settings.ray_metrics_port,
                )
            self.started_ray = True
        serve.start(proxy_location="Disabled")

    def app_name(self, spec: PolicySpec) -> str:
        return f"{self.settings.serve_app_prefix}-{spec.name}"

    def deploy(self, spec: PolicySpec) -> str:
        """Run the policy's Serve app and wait until it is healthy (blocking: seconds)."""
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        if spec.resources.num_gpus > 0 and not gpus:
            log.warning("policy %s asks for GPUs but the cluster has none: serving on CPU", spec.name)
        app_name = self.app_name(spec)
        app = build_deployment(spec, spec.model.read_bytes(), model_format(spec.model), gpus)
        serve.run(app, name=app_name, route_prefix=None)
        self.apps.append(app_name)
        return app_name

    async def connect(self, spec: PolicySpec) -> PolicyBackend:
        """A backend on the deployed app, for the event loop that calls this."""
        app_name, name = self.app_name(spec), deployment_name(spec.name)
        serve.get_deployment_handle(name, app_name)  # raises if it is missing
        # A private handle (serve.get_deployment_handle's are shared and cached) whose router runs
        # in the caller's event loop: saves a thread hop per call (see DESIGN.md).
        handle = DeploymentHandle(name, app_name)
        handle._init(_run_router_in_separate_loop=False)
        backend = ServeBackend(handle)
        if not self.settings.direct_transport:
            return backend
        direct = DirectBackend(backend, spec.resources.concurrent_batches)
        await direct.start()
        self.backends.append(direct)
        return direct

    def start_trainer(self, spec: PolicySpec, space: Any, obs_dim: int) -> Any:
        """The policy's ``TrainerActor``, publishing to its deployment (blocking: seconds)."""
        from policy_server.training.actor import TrainerActor  # torch training code only here

        assert spec.training is not None
        gpus = spec.training.num_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        actor = TrainerActor.options(
            name=f"{self.app_name(spec)}-trainer",
            num_cpus=spec.training.num_cpus,
            num_gpus=gpus,
            max_concurrency=32,
        ).remote(
            spec.name, spec.training, spec.model.read_bytes(), model_format(spec.model), space, obs_dim,
            deployment_name(spec.name), self.app_name(spec), gpus > 0,
        )
        try:
            ray.get(actor.call.remote("status"), timeout=TRAINER_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError as exc:
            ray.kill(actor)
            raise RuntimeError(
                f"the trainer of policy {spec.name} did not start within {TRAINER_START_TIMEOUT_S:.0f} s: "
                f"does the cluster have {spec.training.num_cpus} CPUs and {gpus} GPUs free "
                f"(training.num_cpus / training.num_gpus in the schema)?"
            ) from exc
        return actor

    def deploy_llm(self, spec: LLMPolicySpec | LLMValueSpec) -> Any:
        """Run the LLM policy's or value model's Serve app (blocking); returns its handle."""
        from policy_server.llm.folders import pack_folder
        from policy_server.serving.llm_deployment import LLM_POLICY, LLM_VALUE, build_llm_deployment

        gpus = ray.cluster_resources().get("GPU", 0) > 0
        name = LLM_POLICY if isinstance(spec, LLMPolicySpec) else LLM_VALUE
        app_name = f"{self.settings.serve_app_prefix}-{name}"
        adapter = pack_folder(spec.adapter) if spec.adapter else None
        serve.run(build_llm_deployment(spec, pack_folder(spec.path), adapter, gpus), name=app_name, route_prefix=None)
        self.apps.append(app_name)
        return serve.get_deployment_handle(name, app_name)

    def deploy_llm_state(self, spec: LLMPolicySpec, tokenizer: Any) -> Any:
        """The deployment that keeps the LLM's tasks and sessions (one replica for all gateways)."""
        import tempfile

        from policy_server.llm.folders import pack_folder
        from policy_server.serving.llm_deployment import LLM_POLICY, LLM_STATE, LLMStateDeployment

        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            files = pack_folder(Path(folder))
        app_name = f"{self.settings.serve_app_prefix}-{LLM_STATE}"
        policy_app = f"{self.settings.serve_app_prefix}-{LLM_POLICY}"
        serve.run(LLMStateDeployment.options(name=LLM_STATE).bind(spec, files, policy_app), name=app_name, route_prefix=None)
        self.apps.append(app_name)
        return serve.get_deployment_handle(LLM_STATE, app_name)

    def deploy_grpo(self, spec: LLMPolicySpec) -> Any:
        """The deployment of the LLM policy's GRPO runs (blocking); returns its handle."""
        from policy_server.llm.folders import pack_folder
        from policy_server.serving.llm_deployment import LLM_GRPO, GRPODeployment

        assert spec.training is not None
        gpus = spec.training.num_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        device = spec.device if gpus > 0 else "cpu"
        adapter = pack_folder(spec.adapter) if spec.adapter else None
        app = GRPODeployment.options(
            name=LLM_GRPO, ray_actor_options={"num_cpus": spec.training.num_cpus, "num_gpus": gpus}
        ).bind(spec, pack_folder(spec.path), adapter, str(spec.training.save_dir / "grpo"), device)
        app_name = f"{self.settings.serve_app_prefix}-{LLM_GRPO}"
        serve.run(app, name=app_name, route_prefix=None)
        self.apps.append(app_name)
        return serve.get_deployment_handle(LLM_GRPO, app_name)

    def deploy_x1_trainer(self, kind: str, spec: LLMPolicySpec | LLMValueSpec) -> Any:
        """The deployment of x1's training of the policy or value model (blocking); its handle."""
        from policy_server.llm.folders import pack_folder
        from policy_server.serving.llm_deployment import (
            LLM_POLICY,
            LLM_VALUE,
            X1TrainingDeployment,
            x1_app_name,
        )

        assert spec.training is not None
        gpus = spec.training.num_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        device = spec.device if gpus > 0 else "cpu"
        serving_app = f"{self.settings.serve_app_prefix}-{LLM_POLICY if kind == 'policy' else LLM_VALUE}"
        adapter = pack_folder(spec.adapter) if spec.adapter else None
        name = f"llm-x1-{kind}"
        app = X1TrainingDeployment.options(
            name=name, ray_actor_options={"num_cpus": spec.training.num_cpus, "num_gpus": gpus}
        ).bind(kind, spec, pack_folder(spec.path), adapter, serving_app, device)
        app_name = x1_app_name(self.settings.serve_app_prefix, kind)
        serve.run(app, name=app_name, route_prefix=None)
        self.apps.append(app_name)
        return serve.get_deployment_handle(name, app_name)

    def close_connections(self) -> None:
        """Close the direct connections; from the event loop that opened them."""
        for backend in self.backends:
            backend.close()
        self.backends.clear()

    def stop(self) -> None:
        for name in self.apps:
            try:
                serve.delete(name)
            except Exception as exc:  # noqa: BLE001 - shutting down; report and go on
                log.warning("could not delete Serve app %s: %s", name, exc)
        self.apps.clear()
        if self.started_ray:
            serve.shutdown()
            ray.shutdown()
