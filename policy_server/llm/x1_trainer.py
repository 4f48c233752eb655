"""``X1Trainer``: x1's `/train_from_dataset` and `/stop_training` for one LLM (policy or value).

A plain object that owns its own copy of the model. ``start`` validates the whole request (so
a bad dataset is a 422, never a half-started run; errors name the request's fields, such as
``dataset.3.GAE``, and the gateway names them from the body), then trains in a background thread; the
served model keeps answering meanwhile. When the run ends (finished or stopped) the model is
saved atomically and its trainable weights are published to the serving replicas as the served
version + 1 (read when publishing: GRPO runs publish into the same model, and versions never go
back). ``stop`` interrupts before the next optimiser step and waits for the save.

The trainer records each run's start and end in ``<save_dir>/x1-<kind>-run.json``, so a trainer
whose process died in the middle of a run (Serve then starts another) reports that run as
interrupted, never as running, and the last finished run survives the restart. A run saves only
when it ends, so an interrupted run has nothing to resume from: its steps are lost, the model in
``<save_dir>/<kind>`` and the served weights are the previous run's, and it must be started again.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import torch

from policy_server.errors import FieldError, Forbidden, InvalidRequest, summary
from policy_server.files import atomic_write_text, clean_leftovers
from policy_server.llm.datasets import load_dataset_file, parse_samples, save_samples, subset
from policy_server.llm.x1_config import X1TrainingConfig
from policy_server.llm.x1_training import TrainingRun, is_peft
from policy_server.schema.llm import LLMTrainingSpec
from policy_server.training.guard import check

log = logging.getLogger(__name__)

Kind = Literal["policy", "value"]
Publish = Callable[[dict[str, Any]], int]
"""Loads the weights into every serving replica as the served version + 1; returns that version."""
STOPPED = "Training stopped and model saved"


class X1Trainer:
    def __init__(self, kind: Kind, load: Callable[[], Any], training: LLMTrainingSpec, publish: Publish) -> None:
        self.kind, self.training, self._load, self._publish = kind, training, load, publish
        self.version = 0
        self._model: Any = None
        self._serves_plain = False  # the served model has no adapter (a new one must be merged)
        self._run: TrainingRun | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        clean_leftovers(training.save_dir)  # what a save killed half-way left beside the models
        self._record = training.save_dir / f"x1-{kind}-run.json"
        self.last: dict[str, Any] | None = self._recorded_last()
        if self.last is not None:
            self.version = self.last.get("model_version") or 0

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, request: X1TrainingConfig) -> dict[str, str]:
        """Validate the request, then train in the background; 403 while a run is going."""
        with self._lock:
            if self.running:
                raise Forbidden("a training run is already going: POST /stop_training first")
            samples = self._samples(request)
            if self._model is None:
                self._model = self._load()
                self._serves_plain = not is_peft(self._model.model)
            run = TrainingRun(self._model, request)
            run.encode(samples, self._source(request))  # every sample checked before the 201
            self._stop.clear()
            self._run = run
            self._write_record("running")
            self._thread = threading.Thread(target=self._train, args=(run, samples), name=f"x1-{self.kind}", daemon=True)
            self._thread.start()
        gpus = torch.cuda.device_count()
        return {"message": f"Training started with {torch.get_num_threads()} cores and {gpus} GPUs"}

    @staticmethod
    def _source(request: X1TrainingConfig) -> str:
        """The request's field the samples come from."""
        return "dataset" if request.dataset is not None else "dataset_path"

    def _samples(self, request: X1TrainingConfig) -> list[Any]:
        dataset, path = request.dataset, request.dataset_path
        if (dataset is None) == (path is None):
            message = "give exactly one of `dataset` and `dataset_path`"
            raise InvalidRequest(message, [FieldError("", message)])  # the request as a whole
        raw = dataset if dataset is not None else load_dataset_file(self.training.data_dir, path)
        if not raw:
            raise InvalidRequest.at(self._source(request), "no samples")
        samples = parse_samples(raw, self.kind, self._source(request))
        if request.save_samples:  # the samples as sent (valid, since they parsed)
            save_samples(raw, self.training.samples_dir / self.kind)
        return subset(samples, request.percent_of_data, seed=0)

    def _train(self, run: TrainingRun, samples: list[Any]) -> None:
        try:
            result = run.run(samples, should_stop=self._stop.is_set)
            if result["step"] and result["skipped_steps"] == result["step"]:  # nothing was trained
                self.last = {**result, "saved": None, "model_version": self.version, "error": result["last_error"]}
                return
            weights = self._publishable(run.module)
            check("weight", weights, "the trained model")  # every step was checked: never expected
            saved = run.save(self.training.save_dir / self.kind)
            self.version = self._publish(weights)
            self.last = {**result, "saved": str(saved.name), "model_version": self.version, "error": None}
        except Exception as exc:
            log.exception("x1 %s training failed", self.kind)
            self.last = {"error": f"{type(exc).__name__}: {summary(exc)}"}
        finally:
            self._write_record("ended")

    def _write_record(self, state: Literal["running", "ended"]) -> None:
        """Record that a run started (``running``) or ended, with the last run that ended (atomically)."""
        record = {"state": state, "at": time.time(), "last": self.last}
        atomic_write_text(self._record, json.dumps(record) + "\n")

    def _recorded_last(self) -> dict[str, Any] | None:
        """The last run as an earlier process of this trainer left it: what it recorded when the run
        ended, or, for a run that was still going, that it was interrupted (recorded so from now on)."""
        if not self._record.is_file():
            return None
        record = json.loads(self._record.read_text())
        if record["state"] == "ended":
            return record["last"]  # type: ignore[no-any-return]
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record["at"]))
        self.last = {
            "interrupted": True,
            "model_version": (record["last"] or {}).get("model_version", 0),  # of the run before it
            "error": (f"interrupted: the process running the training run started at {started} died before it "
                      "ended; its steps were not saved nor published (the served weights and the model under "
                      "save_dir are the previous run's): start it again"),
        }
        self._write_record("ended")
        return self.last

    def stop(self) -> dict[str, str]:
        """Interrupt the run before its next step and wait until the model is saved."""
        if not self.running:
            return {"message": "No training run is going"}
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        return {"message": STOPPED}

    def status(self) -> dict[str, Any]:
        progress = self._run.progress() if self._run is not None else None
        return {
            "allow_training": self.training.allow_training,
            "stop_training_flag": self._stop.is_set() and self.running,
            "running": self.running,
            "progress": progress,
            "last_run": self.last,
            "model_version": self.version,
        }


    def _publishable(self, module: torch.nn.Module) -> dict[str, Any]:
        """What the serving replicas need: the trained parameters under the served model's names.
        A new adapter on a plain served model is merged into a copy of the weights first."""
        if self._serves_plain and is_peft(module):
            module = copy.deepcopy(module).merge_and_unload()
            return {n: p.detach().cpu().clone() for n, p in module.named_parameters()}
        return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}

