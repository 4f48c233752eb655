"""``GRPORuns``: the GRPO runs of one served LLM policy (grpo_server's control-flow reversal).

A client starts a run, asks for groups of completions, scores them locally and sends the
rewards back; each reward submission is one training cycle. Each run trains its own copy of
the model, records its start, checkpoints and journals its cycles under ``root/<run_id>``, and is
resumed with every acknowledged cycle when it is asked for after a restart (its process died:
``GRPORun.resume``). A plain object: a Serve deployment holds one (or the gateway, with the local
backend).

A run started with ``serve: true`` samples through the served policy and publishes its weights
into it (``grpo.Served``): at most one such run at a time, since the served model has one set of
weights. It publishes its starting weights when it starts (the policy's own, whatever an earlier
run left served) and its resumed weights when it is resumed; a finished run publishes nothing.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

from policy_server.errors import InvalidRequest, NotFound, TooManyRuns
from policy_server.llm.grpo import GRPORun, Served
from policy_server.llm.grpo_checkpoints import latest_checkpoint
from policy_server.llm.grpo_journal import read_start, write_start
from policy_server.llm.grpo_settings import GRPOSettings
from policy_server.llm.models import load_policy

RUN_ID = r"^[A-Za-z0-9_-]{1,64}$"


class GRPORuns:
    def __init__(
        self, model: Path, adapter: Path | None, root: Path, dtype: str = "float32", device: str = "cpu",
        max_runs: int = 2, served: Served | None = None,
    ) -> None:
        self.model, self.adapter, self.root = model, adapter, root
        self.dtype, self.device, self.max_runs = dtype, device, max_runs
        self.served = served
        """The serving engine that ``serve: true`` runs sample from and publish into (None: no such runs)."""
        self._runs: dict[str, GRPORun] = {}
        self._lock = threading.Lock()

    def start(self, settings: GRPOSettings) -> dict[str, Any]:
        """A new run with these settings; returns its status and its settings."""
        with self._lock:
            running = [r for r in self._runs.values() if r.state == "running"]
            if len(running) >= self.max_runs:
                raise TooManyRuns(
                    f"{len(running)} runs are going (at most {self.max_runs}): stop one first"
                )
            if settings.serve:
                self._check_serving_slot()
            run_id = uuid.uuid4().hex[:16]
            lm = load_policy(self.model, self.adapter, self.dtype, self.device)
            run = GRPORun(run_id, lm, settings, self.root / run_id, base_path=self.model, served=self.served)
            write_start(self.root / run_id, {"run_id": run_id, "settings": settings.model_dump(), "model": str(self.model),
                                             "adapter": str(self.adapter) if self.adapter else None})
            run.publish_served()
            self._runs[run_id] = run
        return run.status() | {"settings": settings.model_dump()}

    def run(self, run_id: str) -> GRPORun:
        """The run, resumed when this process has not seen it yet (``GRPORun.resume``: its newest
        checkpoint or its start, and the cycles journaled after it)."""
        with self._lock:
            if run_id in self._runs:
                return self._runs[run_id]
            folder = self.root / run_id
            inside = folder.resolve().is_relative_to(self.root.resolve())
            if not inside or (latest_checkpoint(folder) is None and read_start(folder) is None):
                raise NotFound(f"no GRPO run {run_id!r}")
            run = GRPORun.resume(run_id, folder, base_path=self.model, dtype=self.dtype, device=self.device,
                                 served=self.served)
            if run.state == "running" and run.settings.serve:
                self._check_serving_slot()
            run.publish_served()
            self._runs[run_id] = run
            return run

    def _check_serving_slot(self) -> None:
        """Under ``self._lock``: refuse a second serving run (``TooManyRuns``), or any when this
        server has no serving engine to give them (``InvalidRequest`` naming ``serve``)."""
        if self.served is None:
            raise InvalidRequest.at("serve", "this server has no served policy for GRPO runs to sample from")
        holder = next((r for r in self._runs.values() if r.state == "running" and r.settings.serve), None)
        if holder is not None:
            raise TooManyRuns(
                f"run {holder.run_id} trains the served model (serve: true): one such run at a time; "
                "stop it first, or start this run with serve: false"
            )

    def complete(self, run_id: str, prompt: str) -> dict[str, Any]:
        return self.run(run_id).complete(prompt)

    def rewards(self, run_id: str, group_id: str, rewards: list[float]) -> dict[str, Any]:
        return self.run(run_id).submit_rewards(group_id, rewards)

    def status(self, run_id: str) -> dict[str, Any]:
        return self.run(run_id).status()

    def stop(self, run_id: str) -> dict[str, Any]:
        return self.run(run_id).stop()

    def archive(self, run_id: str) -> bytes:
        return self.run(run_id).save_archive()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"run_id": r.run_id, "state": r.state, "cycle": r.cycle} for r in self._runs.values()]
