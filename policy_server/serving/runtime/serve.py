"""``ServeRuntime``: the services on Ray Serve deployments (and each policy's trainer on a Ray
actor), started by the gateway, reached through the typed adapters of ``runtime.remote``.

On a Ray cluster it joined, the runtime shares its apps and trainers with the cluster's other
gateways of the same schema (``runtime.cluster_state``): it deploys only what does not run yet,
finds each policy's trainer by name, and at shutdown removes only what no other gateway uses.

Policy batches travel by ``runtime.transports`` (direct to the replicas, or through the handle).
When every batch goes through a handle (``direct_transport: false``), ``runtime/__init__`` sets
Ray's documented ``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0`` before Ray Serve is imported, so each
handle's router runs in the gateway's event loop: a thread hop less per call.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve
from ray.actor import ActorHandle
from ray.serve.handle import DeploymentHandle

from policy_server.errors import PolicyServerError, StartupError
from policy_server.policies.spaces import ActionSpace
from policy_server.policies.torch_policy import model_format
from policy_server.schema.config import PolicySpec, ServerSchema
from policy_server.schema.llm import LLMPolicySpec, LLMValueSpec
from policy_server.schema.replicas import Replicas
from policy_server.serving.api import MultiplexedModel, PolicyModel
from policy_server.serving.deployment import build_deployment, deployment_name
from policy_server.serving.runtime.base import Runtime, X1Kind
from policy_server.serving.runtime.cluster_state import (
    NAMESPACE,
    Membership,
    await_gone,
    end_stale_trainer,
    fingerprint,
    policy_fingerprint,
)
from policy_server.serving.runtime.placement import (
    HOW_TO,
    HOW_TO_FREE,
    PlacementWatch,
    cluster_resources,
    unplaced_actor,
    unplaced_replicas,
    wait_ready,
)
from policy_server.serving.runtime.remote import (
    ActorPolicyTrainer,
    ServeGRPORuns,
    ServeLLMModel,
    ServeTasksAndSessions,
    ServeValueModel,
    ServeX1Training,
)
from policy_server.serving.runtime.resources import check_fits, check_free, held_by, resource_requests
from policy_server.serving.runtime.transports import PolicyTransport, open_transport
from policy_server.settings import Settings

log = logging.getLogger(__name__)
TRAINER_START_TIMEOUT_S = 120.0
TRAINER_CLOSE_TIMEOUT_S = 30.0
STATUS_POLL_S = 0.5


class ServeRuntime(Runtime):
    """Owns what the gateway started on Ray: the Serve apps, the trainer actors, and Ray itself if
    it started it; on a cluster it joined, shares the apps and trainers with the other gateways
    (``cluster``: its leases). The blocking Ray calls (deploying: seconds) run in worker threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connected = False  # this runtime called ray.init (it disconnects at stop)
        self.started_ray = False  # ...and that started a Ray of its own (it shuts Serve down too)
        self.apps: list[str] = []
        self.trainers: dict[str, ActorHandle] = {}  # by actor name
        self.cluster: Membership | None = None
        self.renewing: asyncio.Task[None] | None = None
        self.transports: list[PolicyTransport | ServeLLMModel] = []  # their connections close at stop
        self.cancelled = threading.Event()
        self.asks: dict[str, dict[str, float]] = {}  # Serve app or actor name -> what each replica asks

    async def start(self, schema: ServerSchema) -> None:
        if not self.settings.ray_address and not ray.is_initialized() and multiprocessing.parent_process():
            log.warning(
                "this gateway is a worker process (uvicorn --workers or --reload) and starts a Ray of its "
                "own: with --workers, start one Ray for all of them (`ray start --head`) and set RAY_ADDRESS=auto"
            )
        await asyncio.to_thread(self._start, schema)
        if not self.started_ray:  # a Ray of its own has no other gateway to share with
            self.cluster = await asyncio.to_thread(Membership, self.settings.gateway_lease_s)
            self.renewing = asyncio.create_task(self.cluster.renew_forever())

    def cancel_start(self) -> None:
        self.cancelled.set()

    def _start(self, schema: ServerSchema) -> None:
        """Start or join Ray and Serve; refuse a schema that the cluster cannot place: SchemaError
        when its total exceeds the cluster's, StartupError when it exceeds what is free (both only
        logged with ``wait_for_resources``: an autoscaling cluster grows)."""
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
            self.connected = True
        free, cluster = cluster_resources()
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        requests = resource_requests(schema, cluster.get("GPU", 0) > 0)
        prefix = self.settings.serve_app_prefix
        self.asks = {f"{prefix}-{r.name}": r.ask() for r in requests}
        self._refuse_or_warn(lambda: check_fits(requests, cluster, nodes))  # before Serve starts: no Serve to stop
        serve.start(proxy_location="Disabled")
        running = {name for name, app in serve.status().applications.items() if app.status == "RUNNING"}
        advice = HOW_TO_FREE if self.settings.wait_for_resources else HOW_TO  # no advice to set what is set
        self._refuse_or_warn(lambda: check_free(requests, free, held_by(requests, prefix, running), advice))

    def _refuse_or_warn(self, check: Callable[[], None]) -> None:
        """Run a resource check: its refusal stops start-up, or with ``wait_for_resources`` is logged."""
        try:
            check()
        except PolicyServerError as exc:
            if not self.settings.wait_for_resources:
                raise
            log.warning("%s; waiting for them (POLICY_SERVER_WAIT_FOR_RESOURCES)", exc.message)

    def app_name(self, spec: PolicySpec) -> str:
        return f"{self.settings.serve_app_prefix}-{spec.name}"

    async def policy_model(self, spec: PolicySpec) -> PolicyModel:
        app_name = await asyncio.to_thread(self.deploy, spec)
        log.info("policy %s is served by Ray Serve app %s", spec.name, app_name)
        return await self.connect(spec)

    async def candidate_model(self, spec: PolicySpec) -> PolicyModel:
        candidate = candidate_spec(spec)
        app_name = await asyncio.to_thread(self.deploy, candidate, f"{self.app_name(spec)}-canary")
        log.info("the candidate of policy %s is served by Ray Serve app %s", spec.name, app_name)
        return await self.connect(candidate, app_name)

    def deploy(self, spec: PolicySpec, app_name: str | None = None) -> str:
        """Run the policy's Serve app (default name: ``app_name(spec)``) and wait until it is
        healthy (blocking: seconds)."""
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        if spec.resources.num_gpus > 0 and not gpus:
            log.warning("policy %s asks for GPUs but the cluster has none: serving on CPU", spec.name)
        app_name = app_name or self.app_name(spec)
        model = spec.model.read_bytes()
        if not self._joined(app_name, policy_fingerprint(spec, model, gpus)):
            self._run(build_deployment(spec, model, model_format(spec.model), gpus), app_name)
        return app_name

    async def connect(self, spec: PolicySpec, app_name: str | None = None) -> PolicyModel:
        """The deployed policy, for the event loop that calls this (its handle's router runs there)."""
        handle = serve.get_deployment_handle(deployment_name(spec.name), app_name or self.app_name(spec))
        direct = direct_transport(self.settings, spec.resources)
        transport = await open_transport(
            handle, direct, spec.resources.concurrent_batches, self.settings.direct_timeout_s
        )
        self.transports.append(transport)
        return transport

    async def multiplexed_model(self, spec: PolicySpec) -> MultiplexedModel:
        """The ``policies_dir`` policy's multiplexed app; batches go through its handle, never the
        direct transport (``serving.multiplexed``)."""
        from policy_server.serving.multiplexed import ServeMultiplexedModel, build_multiplexed_deployment

        def deploy() -> str:
            gpus = ray.cluster_resources().get("GPU", 0) > 0
            app_name = self.app_name(spec)
            if not self._joined(app_name, policy_fingerprint(spec, spec.model.read_bytes(), gpus)):
                self._run(build_multiplexed_deployment(spec, deployment_name(spec.name), gpus), app_name)
            return app_name

        app_name = await asyncio.to_thread(deploy)
        log.info("policy %s (policies_dir %s) is served by Ray Serve app %s", spec.name, spec.policies_dir, app_name)
        return ServeMultiplexedModel(serve.get_deployment_handle(deployment_name(spec.name), app_name))

    async def policy_trainer(self, spec: PolicySpec, space: ActionSpace, obs_dim: int) -> ActorPolicyTrainer:
        return ActorPolicyTrainer(await asyncio.to_thread(self.start_trainer, spec, space, obs_dim))

    def start_trainer(self, spec: PolicySpec, space: ActionSpace, obs_dim: int) -> ActorHandle:
        """The policy's ``TrainerActor``, publishing to its deployment (blocking: seconds).

        One per policy per cluster: a named, detached actor (in namespace ``policy-server``) that the
        first gateway creates and the others find by its name; the last gateway to leave closes it.
        One that gateways of another schema left behind (their leases ran out) is closed and replaced.
        """
        from policy_server.serving.trainer_actor import TrainerActor  # torch training code only here

        assert spec.training is not None
        name = f"{self.app_name(spec)}-trainer"
        model = spec.model.read_bytes()
        gpus = spec.training.num_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        ask = {"CPU": spec.training.num_cpus, "GPU": gpus}
        claim = "create" if self.cluster is None else self.cluster.claim(name, policy_fingerprint(spec, model, gpus > 0))
        if claim == "replace":
            end_stale_trainer(name, TRAINER_CLOSE_TIMEOUT_S)
        actor = TrainerActor.options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",  # outlives the gateway that created it, while others use it
            get_if_exists=True,  # the trainer another gateway created (then the arguments are unused)
            max_restarts=-1,  # a trainer whose process died comes back, resuming (trainer_actor)
            num_cpus=spec.training.num_cpus,
            num_gpus=gpus,
            max_concurrency=32,
        ).remote(
            spec.name, spec.training, model, model_format(spec.model), space, obs_dim,
            deployment_name(spec.name), self.app_name(spec), gpus > 0, spec.recurrent,
        )
        self.trainers[name] = actor  # closed by stop() whatever happens next, if no other gateway has it
        watch = PlacementWatch(self.settings.placement_grace_s, self.settings.wait_for_resources)
        try:  # an unplaced trainer fails start-up after placement_grace_s (or is waited for)
            wait_ready(actor.status.remote(), TRAINER_START_TIMEOUT_S, lambda: unplaced_actor(name, ask), watch, self.cancelled)
        except StartupError:
            if self.cluster is None or self.cluster.holders(name) == [self.cluster.gateway]:
                ray.kill(self.trainers.pop(name))
            raise
        except ray.exceptions.GetTimeoutError as exc:
            if self.cluster is None or self.cluster.holders(name) == [self.cluster.gateway]:
                ray.kill(self.trainers.pop(name))  # nobody else waits for it: no close() that would hang
            raise StartupError(
                f"the trainer of policy {spec.name} did not start within {TRAINER_START_TIMEOUT_S:.0f} s: "
                f"does the cluster have {spec.training.num_cpus} CPUs and {gpus} GPUs free "
                f"(training.num_cpus / training.num_gpus in the schema)?"
            ) from exc
        return actor

    async def llm_model(self, spec: LLMPolicySpec) -> ServeLLMModel:
        model = ServeLLMModel(await asyncio.to_thread(self.deploy_llm, spec), direct_transport(self.settings, spec.resources))
        self.transports.append(model)
        return model

    async def value_model(self, spec: LLMValueSpec) -> ServeValueModel:
        return ServeValueModel(await asyncio.to_thread(self.deploy_llm, spec))

    async def tasks_and_sessions(self, spec: LLMPolicySpec, tokenizer: Any) -> ServeTasksAndSessions:
        return ServeTasksAndSessions(await asyncio.to_thread(self.deploy_tasks_and_sessions, spec))

    async def grpo_runs(self, spec: LLMPolicySpec) -> ServeGRPORuns:
        return ServeGRPORuns(await asyncio.to_thread(self.deploy_grpo, spec))

    async def x1_training(self, kind: X1Kind, spec: LLMPolicySpec | LLMValueSpec) -> ServeX1Training:
        return ServeX1Training(await asyncio.to_thread(self.deploy_x1_trainer, kind, spec))

    def deploy_llm(self, spec: LLMPolicySpec | LLMValueSpec) -> DeploymentHandle:
        """Run the LLM policy's or value model's Serve app (blocking); returns its handle."""
        from policy_server.serving.llm_deployment import LLM_POLICY, LLM_VALUE, build_llm_deployment

        gpus = ray.cluster_resources().get("GPU", 0) > 0
        name = LLM_POLICY if isinstance(spec, LLMPolicySpec) else LLM_VALUE
        app_name = f"{self.settings.serve_app_prefix}-{name}"
        if not self._joined(app_name, fingerprint(name, spec.model_dump_json(), str(gpus))):
            self._run(build_llm_deployment(spec, gpus), app_name)
        return serve.get_deployment_handle(name, app_name)

    def deploy_tasks_and_sessions(self, spec: LLMPolicySpec) -> DeploymentHandle:
        """The deployment that keeps the LLM's tasks and sessions (one replica for all gateways);
        it loads the tokenizer from the policy's path."""
        from policy_server.serving.llm_deployment import LLM_POLICY, LLM_TASKS, TasksAndSessionsDeployment

        app_name = f"{self.settings.serve_app_prefix}-{LLM_TASKS}"
        policy_app = f"{self.settings.serve_app_prefix}-{LLM_POLICY}"
        if not self._joined(app_name, fingerprint(LLM_TASKS, spec.model_dump_json(), policy_app)):
            self._run(TasksAndSessionsDeployment.options(name=LLM_TASKS).bind(spec, policy_app), app_name)
        return serve.get_deployment_handle(LLM_TASKS, app_name)

    def deploy_grpo(self, spec: LLMPolicySpec) -> DeploymentHandle:
        """The deployment of the LLM policy's GRPO runs (blocking); returns its handle."""
        from policy_server.serving.llm_deployment import LLM_GRPO, LLM_POLICY, GRPODeployment

        assert spec.training is not None
        gpus = spec.training.num_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        device = spec.device if gpus > 0 else "cpu"
        policy_app = f"{self.settings.serve_app_prefix}-{LLM_POLICY}"
        app = GRPODeployment.options(
            name=LLM_GRPO, ray_actor_options={"num_cpus": spec.training.num_cpus, "num_gpus": gpus}
        ).bind(spec, str(spec.training.save_dir / "grpo"), device, policy_app)
        app_name = f"{self.settings.serve_app_prefix}-{LLM_GRPO}"
        if not self._joined(app_name, fingerprint(LLM_GRPO, spec.model_dump_json(), str(gpus))):
            self._run(app, app_name)
        return serve.get_deployment_handle(LLM_GRPO, app_name)

    def deploy_x1_trainer(self, kind: X1Kind, spec: LLMPolicySpec | LLMValueSpec) -> DeploymentHandle:
        """The deployment of x1's training of the policy or value model (blocking); its handle."""
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
        name = f"llm-x1-{kind}"
        app = X1TrainingDeployment.options(
            name=name, ray_actor_options={"num_cpus": spec.training.num_cpus, "num_gpus": gpus}
        ).bind(kind, spec, serving_app, device)
        app_name = x1_app_name(self.settings.serve_app_prefix, kind)
        if not self._joined(app_name, fingerprint(name, spec.model_dump_json(), str(gpus))):
            self._run(app, app_name)
        return serve.get_deployment_handle(name, app_name)

    def _joined(self, app_name: str, built_from: str) -> bool:
        """Claim ``app_name`` for this gateway; True when it already runs (or starts) for other
        gateways, built from the same ``built_from`` fingerprint: then this waits until it runs and
        does not deploy it again (Serve would replace every replica of an identical app: measured,
        a second ``serve._run`` of an unchanged app started new replicas). False: deploy it.

        Raises:
            ClaimConflict: live gateways serve the app built from another schema or model.
            StartupError: the app it waits for failed, was deleted, or did not run in time.
        """
        if self.cluster is None:
            return False
        claim = self.cluster.claim(app_name, built_from)
        app_status = serve.status().applications.get(app_name)
        if claim != "join" or app_status is None or app_status.status not in ("RUNNING", "DEPLOYING"):
            return False
        self.apps.append(app_name)
        deadline = time.monotonic() + self.settings.start_timeout_s
        while app_status is None or app_status.status != "RUNNING":
            if app_status is None or app_status.status not in ("DEPLOYING", "RUNNING"):
                state = "deleted" if app_status is None else f"{app_status.status}: {app_status.message}"
                raise StartupError(f"Serve app {app_name}, started by another gateway, did not start ({state})")
            if self.cancelled.is_set() or time.monotonic() > deadline:
                raise StartupError(f"Serve app {app_name}, started by another gateway, did not run in time or start-up was cancelled")
            self.cancelled.wait(STATUS_POLL_S)
            app_status = serve.status().applications.get(app_name)
        log.info("Serve app %s already runs for other gateways on the cluster: using it as it is", app_name)
        return True

    def _run(self, app: Any, app_name: str) -> None:
        """Deploy ``app`` and wait until Serve reports it RUNNING (blocking).

        Raises:
            StartupError: the app failed to deploy, did not run within ``start_timeout_s``, a
                replica stayed unplaced ``placement_grace_s`` (``placement.PlacementWatch``; with
                ``wait_for_resources`` that is logged every 30 s instead), or start-up was cancelled
                (Ctrl-C). What Serve says about a deployment that waits (a slow model load) is
                logged as it comes.
        """
        serve._run(app, _blocking=False, name=app_name, route_prefix=None)  # Serve's own no-wait run
        self.apps.append(app_name)  # deleted by stop() whatever happens next
        deadline = time.monotonic() + self.settings.start_timeout_s
        said: set[str] = set()
        watch = PlacementWatch(self.settings.placement_grace_s, self.settings.wait_for_resources)
        while True:
            app_status = serve.status().applications.get(app_name)
            if app_status is None:
                raise StartupError(f"Serve app {app_name} disappeared while it was starting")
            if app_status.status == "RUNNING":
                return
            if app_status.status == "DEPLOY_FAILED":
                reasons = "".join(f"; {name}: {last_line(d.message)}" for name, d in app_status.deployments.items() if d.message)
                raise StartupError(f"Serve app {app_name} failed to start: {app_status.message.rstrip('.')}{reasons}")
            waiting = {f"{name}: {d.message}" for name, d in app_status.deployments.items() if d.message}
            for message in sorted(waiting - said):
                log.warning("Serve app %s is starting; %s", app_name, message)
            said |= waiting
            note = watch.observe(time.monotonic(), unplaced_replicas(app_name, self.asks.get(app_name)), *cluster_resources())
            if note:
                log.warning("%s", note)
            if self.cancelled.is_set():
                raise StartupError(f"start-up cancelled while Serve app {app_name} was starting")
            if time.monotonic() > deadline:
                raise StartupError(
                    f"Serve app {app_name} did not start within {self.settings.start_timeout_s:g} s "
                    f"(POLICY_SERVER_START_TIMEOUT_S); Serve says: {'; '.join(sorted(waiting)) or app_status.status}"
                )
            self.cancelled.wait(STATUS_POLL_S)

    async def stop(self) -> None:
        """Close the connections, give up this gateway's leases, and close the trainers and delete
        the apps that no other gateway holds (all of them when the runtime shares nothing)."""
        for transport in self.transports:  # from the event loop that opened them
            transport.close()
        self.transports.clear()
        if self.renewing is not None:
            self.renewing.cancel()
            self.renewing = None
        released = await asyncio.to_thread(self._leave)
        for name, actor in self.trainers.items():
            if name in released:
                await _close_actor(actor)
                await asyncio.to_thread(await_gone, name)
            else:
                log.info("trainer %s keeps running for the cluster's other gateways", name)
        self.trainers.clear()
        await asyncio.to_thread(self._stop, released)

    def _leave(self) -> set[str]:
        """Give up the leases (blocking); what no other live gateway holds, which this one removes.
        An unreachable registry leaves everything running: other gateways may use it."""
        if self.cluster is None:
            return set(self.apps) | set(self.trainers)
        try:
            return set(self.cluster.leave())
        except ray.exceptions.RayError as exc:
            log.warning("the cluster's registry did not answer; leaving the apps and trainers running: %s", exc)
            return set()
        finally:
            self.cluster = None

    def _stop(self, released: set[str] | None = None) -> None:
        """Delete the apps in ``released`` (default: every app this runtime deployed or joined), all
        at once: Serve takes about 3 s to delete one, whose replicas drain, and deletes them in parallel."""
        doomed = [name for name in self.apps if released is None or name in released]
        for name in set(self.apps) - set(doomed):
            log.info("Serve app %s keeps running for the cluster's other gateways", name)
        if doomed:
            with ThreadPoolExecutor(len(doomed), thread_name_prefix="serve-delete") as pool:
                for name, exc in zip(doomed, pool.map(_delete_app, doomed)):
                    if exc is not None:
                        log.warning("could not delete Serve app %s: %s", name, exc)
        self.apps.clear()
        if self.started_ray:
            serve.shutdown()
        if self.connected:  # a cluster it joined keeps its Serve: other gateways may use it
            ray.shutdown()


def _delete_app(name: str) -> Exception | None:
    """``serve.delete(name)``, waiting until it is gone; what it raised, if anything (shutting down:
    reported and gone on from)."""
    try:
        serve.delete(name)
    except Exception as exc:  # noqa: BLE001 - see above
        return exc
    return None


async def _close_actor(actor: ActorHandle) -> None:
    """Let the trainer close (it may write a checkpoint), then end the actor either way."""
    try:
        await asyncio.wait_for(actor.close.remote(), TRAINER_CLOSE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - shutting down; report and go on
        log.warning("the trainer did not close cleanly: %s", exc)
    finally:
        ray.kill(actor)


def candidate_spec(spec: PolicySpec) -> PolicySpec:
    """The policy's candidate as a policy of its own: its model file, the policy's resources, no
    trainer (the trainer publishes to the stable model only)."""
    assert spec.canary is not None
    return spec.model_copy(update={"model": spec.canary.model, "canary": None, "training": None})


def direct_transport(settings: Settings, replicas: Replicas) -> bool:
    """Whether requests go straight to the replicas: not for ``num_replicas: auto``, as Serve's
    autoscaler counts only the requests its handles route (what goes direct, it never sees)."""
    return settings.direct_transport and not replicas.autoscaled


def last_line(message: str) -> str:
    """The last non-empty line of what Serve says about a deployment: after a replica's failed
    constructor, the exception it raised (Serve gives the whole traceback)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else message
