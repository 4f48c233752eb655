"""``Trainer``: trains one served policy from the experience its clients send.

A plain object (no Ray, no HTTP): the Ray actor in ``serving.trainer_actor`` and the local
runtime (``serving.runtime.local``) both hold one. The API methods may be called from any thread
and return at once; the learner is touched only by the trainer's own loop thread, which adds the
received samples, runs an update whenever the learner has enough data, publishes the new weights
with the next version number, and writes checkpoints. The request path never waits for an update.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Literal

import numpy as np
from pydantic import TypeAdapter

from policy_server.errors import InvalidRequest, NotFound, StaleSamples, TrainingNotRunning, summary
from policy_server.schema.training import TrainingSpec
from policy_server.training.base import Learner
from policy_server.training.checkpoint import CheckpointStore, periodic_name
from policy_server.training.collect import Acted, StepCollector
from policy_server.training.experience import ExperienceBatch
from policy_server.training.guard import NonFiniteUpdate, Reason, nonfinite
from policy_server.training.journal import ExperienceJournal
from policy_server.training.telemetry import Telemetry

log = logging.getLogger(__name__)

State = Literal["running", "paused", "stopped"]
Publish = Callable[[dict[str, np.ndarray], int], None]


class TrainerMetrics:
    """Hooks the trainer reports through; this base reports nowhere (``serving.trainer_actor.RayTrainerMetrics`` reports to Ray's metrics)."""

    def received(self, accepted: int, stale: int) -> None: ...
    def malformed(self, n: int) -> None: ...
    def updated(self, seconds: float, version: int) -> None: ...
    def skipped(self, reason: Reason) -> None: ...
    def returns(self, last: float | None, best: float | None) -> None: ...
    def gauges(self, active_clients: int, samples_per_second: float) -> None: ...


class Trainer:
    HEARTBEAT_INTERVAL_S = 5.0

    def __init__(
        self,
        policy: str,
        spec: TrainingSpec,
        learner: Learner,
        publish: Publish,
        store: CheckpointStore,
        version: int = 0,
        metrics: TrainerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        journal: ExperienceJournal | None = None,
    ) -> None:
        self.policy, self.spec, self.learner, self.journal = policy, spec, learner, journal
        self._publish, self.store, self.metrics = publish, store, metrics or TrainerMetrics()
        self.version = version
        self.state: State = "paused"
        self.telemetry = Telemetry(spec.return_window, spec.client_timeout_s, clock)
        self.updates = 0
        self.skipped_updates = 0  # updates refused as non-finite (see training.guard)
        self.samples_received = self.samples_accepted = 0
        self.rejected = {"stale": 0, "malformed": 0}
        self.last_update: dict[str, float] = {}
        self.last_update_seconds: float | None = None
        self.last_checkpoint: str | None = None
        self.last_error: str | None = None
        self._exploration = learner.exploration()
        self._unpublished = False
        self._best_due = False
        self._cond = threading.Condition()
        self._pending: list[tuple[int, ExperienceBatch]] = []  # with their journal sequence numbers
        self._added_seq = self._consumed_seq = self._resumed_seq = 0  # journal numbers reached (see _checkpoint)
        self._commands: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._closing = False
        self._thread: threading.Thread | None = None

    # --- life cycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Start the loop thread; resume from the newest checkpoint and start if the spec says so."""
        self._thread = threading.Thread(target=self._loop, name=f"trainer-{self.policy}", daemon=True)
        self._thread.start()
        if self.spec.resume and self.store.latest() is not None:
            self.resume(None)
        if self.journal is not None:
            if self.spec.resume:  # what clients were told was accepted after the checkpoint
                with self._cond:
                    replayed = list(self.journal.since(self._resumed_seq))
                    rows = sum(len(batch) for _, batch in replayed)
                    self.samples_received += rows
                    self.samples_accepted += rows
                    self._pending.extend(replayed)
                    self._cond.notify_all()
            else:  # a fresh start: an earlier run's experience is not this run's
                self.journal.forget_through(self.journal.last_seq)
        if self.spec.autostart:
            self.start()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # --- the API ----------------------------------------------------------------------------

    def register(self, client_id: str, info: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._cond:
            self.telemetry.seen(client_id, info)
            return self._client_answer(client_id)

    def heartbeat(self, client_id: str) -> dict[str, Any]:
        return self.register(client_id)

    def submit(self, batch: ExperienceBatch) -> dict[str, Any]:
        """Queue a client's validated steps for the learner; raise if none can be used."""
        with self._cond:
            newest = int(batch.versions.max()) if len(batch) else 0
            if newest > self.version:
                self.rejected["malformed"] += len(batch)
                self.metrics.malformed(len(batch))
                raise InvalidRequest.at(
                    "body", f"model_version {newest} is newer than the current version {self.version}"
                )
            improved = self.telemetry.record_steps(batch.client_id, batch.rewards, batch.episode_end)
            self._best_due |= improved
            self.metrics.returns(self.telemetry.last_return, self.telemetry.best_mean_return)
            if self.state != "running":
                raise TrainingNotRunning(f"training of policy {self.policy!r} is {self.state}")
            fresh = batch.versions >= self.version - self.spec.max_sample_delay
            accepted, stale = int(fresh.sum()), int((~fresh).sum())
            self.samples_received += len(batch)
            self.samples_accepted += accepted
            self.rejected["stale"] += stale
            self.metrics.received(accepted, stale)
            if accepted == 0:
                raise StaleSamples(
                    f"all {stale} samples were acted by model versions older than "
                    f"{self.version - self.spec.max_sample_delay} (current {self.version}); "
                    "download the current weights"
                )
            kept = batch if stale == 0 else batch.select(fresh)
            seq = self.journal.append(kept) if self.journal is not None else 0  # on disk before the answer
            self._pending.append((seq, kept))
            self._cond.notify_all()
            return {"accepted": accepted, "rejected": stale, "model_version": self.version, "state": self.state}

    def count_malformed(self, n: int, client_id: str | None = None) -> None:
        with self._cond:
            self.rejected["malformed"] += n
            if client_id:
                self.telemetry.seen(client_id)
        self.metrics.malformed(n)

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "policy": self.policy,
                "algorithm": self.spec.algorithm,
                "state": self.state,
                "model_version": self.version,
                "updates": self.updates,
                "skipped_updates": self.skipped_updates,
                "samples_received": self.samples_received,
                "samples_accepted": self.samples_accepted,
                "samples_rejected": dict(self.rejected),
                **self.telemetry.describe(),
                "last_update_seconds": self.last_update_seconds,
                "last_update": dict(self.last_update),
                "last_checkpoint": self.last_checkpoint,
                "last_error": self.last_error,
                "exploration": dict(self._exploration),
            }

    def start(self) -> dict[str, Any]:
        return self._set_state("running")

    def pause(self) -> dict[str, Any]:
        return self._set_state("paused")

    def stop(self) -> dict[str, Any]:
        """Pause and write the checkpoint ``final``."""
        self._set_state("stopped")
        self._in_loop(lambda: self._checkpoint("final"))
        return self.status()

    def save(self) -> dict[str, Any]:
        """A manual save ("quicksave"), named by its UTC time."""
        name = time.strftime("saved-%Y%m%dT%H%M%SZ", time.gmtime())
        return self._in_loop(lambda: {"checkpoint": self._checkpoint(name), "model_version": self.version})

    def resume(self, name: str | None) -> dict[str, Any]:
        """Load a checkpoint (default: the newest) and publish its weights as a new version."""
        self._in_loop(lambda: self._resume(name))
        return self.status()

    def checkpoints(self) -> dict[str, Any]:
        return {"checkpoints": self.store.list()}

    # --- acting clients (Pathmind's /collect_experience) ---------------------------------------

    @functools.cached_property
    def _collector(self) -> StepCollector:
        return StepCollector(self.telemetry.clock)

    def collect(self, client_id: str, acted: Acted, reward: float, done: bool) -> dict[str, Any]:
        """One call of an acting client: ``acted`` is what the server just answered it; ``reward``
        and ``done`` are of its previous action (see ``training.collect``). Fragments it completes
        are submitted; while training is paused, or when they are stale, they are dropped (the
        client only acts, it is not told). Answers the steps accepted now and the state."""
        accepted = 0
        with self._cond:
            self.telemetry.seen(client_id)
            for batch in self._collector.step(client_id, acted, reward, done):
                try:
                    accepted += self.submit(batch)["accepted"]
                except (TrainingNotRunning, StaleSamples):
                    pass  # counted by submit (stale) or refused as a whole (not running)
            return {"accepted": accepted, "model_version": self.version, "state": self.state,
                    "collecting_clients": len(self._collector)}

    # --- the loop thread ----------------------------------------------------------------------

    def _set_state(self, state: State) -> dict[str, Any]:
        with self._cond:
            self.state = state
            self._cond.notify_all()
        return self.status()

    def _in_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop thread (the only one that touches the learner); wait for it."""
        if self._thread is None or not self._thread.is_alive():
            return fn()
        future: Future[Any] = Future()
        with self._cond:
            self._commands.append((fn, future))
            self._cond.notify_all()
        return future.result()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._commands or self._closing, timeout=1.0)
                if self._closing:
                    break
                pending, self._pending = self._pending, []
                commands, self._commands = self._commands, []
            for seq, batch in pending:
                self.learner.add(batch)
                self._added_seq = max(self._added_seq, seq)
            self._exploration = self.learner.exploration()
            for fn, future in commands:
                try:
                    future.set_result(fn())
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
            try:
                self._step()
            except Exception as exc:
                log.exception("trainer of policy %s failed", self.policy)
                with self._cond:
                    self.last_error = f"{type(exc).__name__}: {summary(exc)}"
                    self.state = "paused"
        for fn, future in self._commands:
            future.set_exception(RuntimeError("the trainer is closing"))

    def _step(self) -> None:
        if self._unpublished:
            self._publish_weights()
        while self.state == "running" and self.learner.ready():
            self._update()
        if self._best_due:
            self._best_due = False
            self._checkpoint("best")
        self.metrics.gauges(self.telemetry.active_clients(), self.telemetry.samples_per_second())

    def _update(self) -> None:
        start = time.perf_counter()
        self._consumed_seq = self._added_seq  # an update takes (or, refused, drops) every row added
        try:
            stats = self.learner.update()
        except NonFiniteUpdate as exc:  # rolled back: no new version, nothing published or saved
            self._skipped(exc)
            return
        seconds = time.perf_counter() - start
        with self._cond:
            self.version += 1
            self.updates += 1
            self.last_update, self.last_update_seconds = stats, seconds
        self._exploration = self.learner.exploration()
        self._publish_weights()
        self.metrics.updated(seconds, self.version)
        if self.updates % self.spec.checkpoint_every == 0:
            self._checkpoint(periodic_name(self.updates))

    def _skipped(self, exc: NonFiniteUpdate) -> None:
        with self._cond:
            self.skipped_updates += 1
            self.last_error = f"update skipped, model version {self.version} kept: {exc}"
        log.warning("policy %s: %s", self.policy, self.last_error)
        self.metrics.skipped(exc.reason)

    def _publish_weights(self) -> None:
        try:
            self._publish(self.learner.actor_weights(), self.version)
        except Exception as exc:  # noqa: BLE001 - replicas restarting: publish again next round
            self._unpublished = True
            self.last_error = f"publishing version {self.version} failed: {summary(exc)}"
            log.warning("policy %s: %s", self.policy, self.last_error)
            return
        self._unpublished = False

    def _checkpoint(self, name: str) -> str:
        """Save the learner and counters as ``name``; the journal then forgets what the checkpoint holds."""
        covered = self._added_seq if self.learner.state_holds_samples else self._consumed_seq
        state = {
            "policy": self.policy,
            "algorithm": self.spec.algorithm,
            "version": self.version,
            "updates": self.updates,
            "samples_accepted": self.samples_accepted,
            "samples_received": self.samples_received,
            "rejected": dict(self.rejected),
            "config": TypeAdapter(TrainingSpec).dump_python(self.spec, mode="json"),
            "telemetry": self.telemetry.state_dict(),
            "learner": self.learner.state_dict(),
            "saved_at": time.time(),
            "journal_seq": covered,
        }
        self.store.save(name, state)
        if self.journal is not None:
            self.journal.forget_through(covered)
        self.last_checkpoint = name
        return name

    def _resume(self, name: str | None) -> None:
        name = self.store.latest() if name is None else name  # "" is no name: refused, not the newest
        if name is None:
            raise NotFound(f"policy {self.policy!r} has no checkpoint to resume from")
        state = self._load_checked(name)
        self.learner.load_state_dict(state["learner"])
        with self._cond:
            self.telemetry.load_state_dict(state["telemetry"])
            self.updates = int(state["updates"])
            self.samples_accepted = int(state["samples_accepted"])
            self.samples_received = int(state.get("samples_received", self.samples_accepted))
            self.rejected = {k: int(v) for k, v in state.get("rejected", self.rejected).items()}
            self._resumed_seq = int(state.get("journal_seq", 0))
            self.version = max(self.version + 1, int(state["version"]))
        self._exploration = self.learner.exploration()
        self._publish_weights()
        self.last_checkpoint = name

    def _load_checked(self, name: str) -> dict[str, Any]:
        """The checkpoint ``name``, written by this algorithm with finite weights; raises NotFound,
        or InvalidRequest naming ``checkpoint``."""
        state = self.store.load(name)
        if state.get("algorithm") != self.spec.algorithm:
            raise InvalidRequest.at(
                "checkpoint",
                f"checkpoint {name!r} was written by {state.get('algorithm')!r}, not {self.spec.algorithm!r}",
            )
        bad = nonfinite(state["learner"]["actor"])  # written before updates were guarded
        if bad:
            raise InvalidRequest.at(
                "checkpoint", f"checkpoint {name!r} holds non-finite weights {bad[:3]}: resume from another one"
            )
        return state

    def checkpoint_weights(self, name: str) -> dict[str, Any]:
        """The actor weights of checkpoint ``name`` (numpy, named as the served module's) and its
        model version, for a candidate version of the policy; the trainer itself is left as it is.
        Raises as ``_load_checked``."""
        state = self._load_checked(name)
        weights = {k: v.detach().cpu().numpy().copy() for k, v in state["learner"]["actor"].items()}
        return {"checkpoint": name, "model_version": int(state["version"]), "weights": weights}

    def _client_answer(self, client_id: str) -> dict[str, Any]:
        return {
            "client_id": client_id,
            "model_version": self.version,
            "algorithm": self.spec.algorithm,
            "state": self.state,
            "heartbeat_interval_s": self.HEARTBEAT_INTERVAL_S,
            "exploration": dict(self._exploration),
        }


def build_trainer(
    policy: str,
    spec: TrainingSpec,
    module: Any,
    space: Any,
    obs_dim: int,
    publish: Publish,
    metrics: TrainerMetrics | None = None,
    device: str = "cpu",
    version: int = 0,
    recurrent: Any = None,
) -> Trainer:
    """A trainer for ``module`` (its own copy of the served model, loaded from the same file),
    counting model versions from ``version`` (the served one, when a trainer restarts);
    ``recurrent``: a recurrent policy's ``RecurrentSpec`` (its rows are ``[obs | state]``)."""
    import torch

    from policy_server.training.learners import make_learner

    if spec.seed is not None:
        torch.manual_seed(spec.seed)
    learner = make_learner(module, obs_dim, space, spec, device, policy, recurrent)
    store = CheckpointStore(spec.checkpoint_dir / policy, keep=spec.keep_checkpoints)
    journal = ExperienceJournal(spec.checkpoint_dir / policy) if spec.journal else None
    return Trainer(policy, spec, learner, publish, store, version=version, metrics=metrics, journal=journal)
