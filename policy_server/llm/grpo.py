"""Control-flow-reversed GRPO: the server hands out groups of completions, the client scores them.

A client asks ``GRPORun.complete(prompt)`` for a group of ``group_size`` sampled completions,
scores them locally, and posts the rewards with ``submit_rewards(group_id, rewards)``. The run
normalises the rewards within the group (``losses.group_advantages``), takes one optimiser step on
the clipped GRPO loss (``losses.grpo_loss``, DeepSeekMath eq. 3 / TRL's ``loss_type="grpo"``;
``grpo_step.train_step``) against a frozen reference model, and moves to the next cycle. Every
completion and every answer names the model version ``(run_id, cycle)``; rewards for a group
generated more than ``max_version_lag`` cycles ago are refused (``StaleGroup``) and counted.

A run is a plain, thread-safe object: no Ray, no HTTP; its errors name the fields of its own
input (``prompt``, ``rewards.1``). Checkpoints (every ``checkpoint_every`` cycles and at ``stop``)
are written by ``grpo_checkpoints``, and every cycle in between is journaled before its rewards are
answered (``grpo_journal``); ``GRPORun.resume`` continues from the newest checkpoint and trains the
journaled cycles after it again. Group ids start with the run object's random ``incarnation``: the
rewards of a group that a dead process handed out are answered ``GroupLost`` (410), not a bare 404.

A serving run (``settings.serve``) samples its groups through the serving engine instead of its
own copy (``Served.generate``: the engine's raw log-probs are the old policy's), still trains its
own copy, and publishes the trained weights into the engine (``Served.publish``) when it starts or
resumes and after every cycle, before answering; its answers name the engine's version
(``served_version``).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import io
import logging
import re
import tarfile
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import TypeAdapter, ValidationError

from policy_server.errors import Conflict, GroupLost, InvalidRequest, NotFound, RunFinished, StaleGroup
from policy_server.fields import Float32, field_errors
from policy_server.llm.engine import publish_next
from policy_server.llm.generation import Generator
from policy_server.llm.grpo_checkpoints import (
    MODEL_FOLDER,
    OPTIMIZER_FILE,
    load_run,
    read_state,
    write_checkpoint,
)
from policy_server.llm.grpo_journal import Cycle, CycleJournal
from policy_server.llm.grpo_settings import GRPOSettings
from policy_server.llm.grpo_step import Group, prepare_model, train_step
from policy_server.llm.models import Dtype, LoadedLM
from policy_server.llm.params import GenerationParams, Sample
from policy_server.training.guard import NonFiniteUpdate

log = logging.getLogger(__name__)

MAX_PENDING_GROUPS = 1024
"""Groups handed out and not yet rewarded that a run remembers; the oldest is forgotten beyond it."""
REMEMBERED_REWARDED = 256
"""Rewarded groups whose ids (and cycles) a run remembers, checkpoints included: their rewards sent
again answer 409 "already rewarded" (a retry after a lost answer), not 410 or 404."""
REWARD_WINDOW = 20
"""``status()["mean_reward"]`` averages the last this many groups."""
_GROUP_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{32}")  # the form of the group ids a run hands out

Generate = Callable[[list[int], GenerationParams], tuple[list[Sample], int]]
"""The serving engine's ``generate`` (blocking): the samples of one prompt and the version that made them."""
Publish = Callable[[dict[str, torch.Tensor]], int]
"""Loads some or all weights into every serving replica (blocking); returns the version they are served as."""


@dataclass(frozen=True)
class Served:
    """The serving engine a serving run samples from and publishes into."""

    generate: Generate
    publish: Publish
    adapter: bool
    """The served policy has a LoRA adapter: publish the adapter's weights (else all weights)."""

    @classmethod
    def in_process(cls, engine: Any, adapter: bool, publish: Publish | None = None) -> Served:
        """An engine of this process (``LLMEngine`` or ``VLLMEngine``): each generate waits on an
        event loop of its own (a run's calls come in worker threads); each publish loads the weights
        as the engine's served version + 1 (``publish``, default ``publish_next``)."""

        def generate(prompt_ids: list[int], params: GenerationParams) -> tuple[list[Sample], int]:
            result: tuple[list[Sample], int] = asyncio.run(engine.generate(prompt_ids, params))
            return result

        return cls(generate, publish or functools.partial(publish_next, engine), adapter)


@dataclass
class _Counters:
    groups_handed_out: int = 0
    rewards_received: int = 0
    rejected_stale: int = 0
    reward_history: list[float] = dataclasses.field(default_factory=list)
    """Mean reward of the group each cycle trained on, in cycle order."""
    last_loss: float | None = None
    skipped_updates: int = 0
    """Reward submissions whose step was refused as non-finite (the model stayed as it was)."""
    last_error: str | None = None


RunState = Literal["running", "finished"]


class GRPORun:
    """One GRPO run over one policy (see the module docstring). It owns ``lm`` and changes it.

    ``base_path`` (the folder ``lm`` was loaded from) is recorded in the checkpoints: ``resume``
    loads the base under a LoRA adapter from it, and, for full fine-tuning, the frozen reference.
    ``reference`` is the frozen reference of full fine-tuning (default: a copy of ``lm`` as given);
    a LoRA run's reference is its base with the adapter disabled.
    ``served``: the serving engine, for a run with ``settings.serve`` (required then, ignored else).
    """

    def __init__(
        self,
        run_id: str,
        lm: LoadedLM,
        settings: GRPOSettings,
        checkpoint_dir: str | Path,
        base_path: str | Path | None = None,
        reference: LoadedLM | None = None,
        served: Served | None = None,
    ) -> None:
        if settings.serve and served is None:
            raise ValueError("a run with settings.serve needs the serving engine (served)")
        if settings.serve and served is not None and served.adapter and not settings.lora:
            raise InvalidRequest.at("lora", "the served policy has a LoRA adapter: a serving run trains it (lora: true)")
        self.run_id = run_id
        self.served = served if settings.serve else None
        self.served_version: int | None = None
        """The version the serving engine serves this run's weights as (None: not published yet)."""
        self._published_cycle: int | None = None
        self.lm = lm
        self.settings = settings
        self.checkpoint_dir = Path(checkpoint_dir)
        self.base_path = Path(base_path).resolve() if base_path is not None else None
        self.cycle = 0
        self.state: RunState = "running"
        self._counters = _Counters()
        self._pending: OrderedDict[str, Group] = OrderedDict()
        self._lock = threading.Lock()
        self.incarnation = uuid.uuid4().hex[:8]
        self._journal = CycleJournal(self.checkpoint_dir)
        self._rewarded: OrderedDict[str, int] = OrderedDict()
        """The last ``REMEMBERED_REWARDED`` rewarded groups: group id -> the cycle it trained."""
        with torch.random.fork_rng(devices=[]):  # a new adapter's initial weights: the same on a resume
            torch.manual_seed(settings.seed)
            self._reference = prepare_model(lm, settings, reference)
        self.generator = Generator(lm)
        params = [p for p in lm.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr)

    # -- the client's calls -------------------------------------------------------------------

    def complete(self, prompt: str) -> dict[str, Any]:
        """Sample a group of completions of ``prompt`` and remember it until its rewards arrive."""
        s = self.settings
        with self._lock:
            self._require_running()
            prompt_ids = self._encode(prompt)
            params = GenerationParams(
                num_samples=s.group_size,
                temperature=s.temperature,
                max_new_tokens=s.max_completion_length,
                stop_strings=s.stop_strings,
                seed=self._group_seed(),
            )
            self._sync_served()
            samples, served_version = self._sample(prompt_ids, params)
            group_id = f"{self.incarnation}-{uuid.uuid4().hex}"
            self._pending[group_id] = Group(
                prompt_ids,
                [x.completion_ids for x in samples],
                [x.log_probs for x in samples],
                self.cycle,
            )
            while len(self._pending) > MAX_PENDING_GROUPS:
                self._pending.popitem(last=False)
            self._counters.groups_handed_out += 1
            return {
                "group_id": group_id,
                "prompt": prompt,
                "completions": [
                    {"text": x.text(self.lm.tokenizer), "token_ids": x.completion_ids, "logprobs": x.log_probs}
                    for x in samples
                ],
                "model_version": [self.run_id, self.cycle],
                "served_version": served_version,
            }

    def submit_rewards(self, group_id: str, rewards: list[float]) -> dict[str, Any]:
        """Train one step on the group with these rewards (one per completion, in order)."""
        with self._lock:
            self._require_running()
            group = self._pending.get(group_id)
            if group is None:
                raise self._missing(group_id)
            _check_rewards(rewards, len(group.completions))
            lag = self.cycle - group.cycle
            if lag > self.settings.max_version_lag:
                del self._pending[group_id]
                self._counters.rejected_stale += 1
                raise StaleGroup(
                    f"group {group_id} was generated at cycle {group.cycle}; the run is at cycle {self.cycle} "
                    f"and accepts rewards at most {self.settings.max_version_lag} cycles old: "
                    "ask for new completions"
                )
            del self._pending[group_id]
            mean_reward = sum(rewards) / len(rewards)
            try:
                stats = self._train(group_id, group, rewards)
            except NonFiniteUpdate as exc:  # rolled back: the cycle stays, nothing is checkpointed
                return self._skipped(exc, mean_reward)
            counters = {k: v for k, v in dataclasses.asdict(self._counters).items() if k != "reward_history"}
            self._journal.append(Cycle(self.cycle, group_id, group, rewards, counters))  # before the answer
            if self.cycle % self.settings.checkpoint_every == 0:
                self._checkpoint()
            self._sync_served()
            return {
                "model_version": [self.run_id, self.cycle],
                "served_version": self.served_version,
                "loss": stats["loss"],
                "mean_reward": mean_reward,
                "skipped": False,
            }

    def _train(self, group_id: str, group: Group, rewards: list[float]) -> dict[str, float]:
        """Under ``self._lock``: one step on the group, then the next cycle; raises ``NonFiniteUpdate``
        having changed nothing."""
        stats = train_step(self.lm, self.optimizer, self._reference, self.settings, group, rewards, f"cycle {self.cycle}")
        self._counters.rewards_received += 1
        self._counters.reward_history.append(sum(rewards) / len(rewards))
        self._counters.last_loss = stats["loss"]
        self.cycle += 1
        self._remember(group_id, self.cycle)
        return stats

    def _remember(self, group_id: str, cycle: int) -> None:
        self._rewarded[group_id] = cycle
        while len(self._rewarded) > REMEMBERED_REWARDED:
            self._rewarded.popitem(last=False)

    def _missing(self, group_id: str) -> Exception:
        """The error for rewards of a group that is not waiting for them."""
        if group_id in self._rewarded:
            return Conflict(
                f"group {group_id} was already rewarded: it trained cycle {self._rewarded[group_id]} (also when "
                "the answer was lost, say when the run's process died: the run kept that cycle)"
            )
        if _GROUP_ID.fullmatch(group_id) and not group_id.startswith(f"{self.incarnation}-"):
            return GroupLost(
                f"group {group_id} was handed out by a process of run {self.run_id} that has since died; the run "
                f"was resumed at cycle {self.cycle} with every rewarded cycle, but groups waiting for rewards "
                "are kept in memory only: ask for new completions"
            )
        return NotFound(
            f"run {self.run_id} has no group {group_id!r} waiting for rewards: it was never handed out, "
            f"was rewarded long ago, or was forgotten (more than {MAX_PENDING_GROUPS} groups waited)"
        )

    def _skipped(self, exc: NonFiniteUpdate, mean_reward: float) -> dict[str, Any]:
        self._counters.skipped_updates += 1
        self._counters.last_error = f"step skipped at cycle {self.cycle}, model kept: {exc}"
        log.warning("GRPO run %s: %s", self.run_id, self._counters.last_error)
        return {
            "model_version": [self.run_id, self.cycle],
            "served_version": self.served_version,
            "loss": None,
            "mean_reward": mean_reward,
            "skipped": True,
            "reason": exc.reason,
            "error": self._counters.last_error,
        }

    def status(self) -> dict[str, Any]:
        with self._lock:
            c = self._counters
            recent = c.reward_history[-REWARD_WINDOW :]
            return {
                "run_id": self.run_id,
                "state": self.state,
                "cycle": self.cycle,
                "model_version": [self.run_id, self.cycle],
                "served_version": self.served_version,
                "groups_handed_out": c.groups_handed_out,
                "rewards_received": c.rewards_received,
                "rejected_stale": c.rejected_stale,
                "pending_groups": len(self._pending),
                "mean_reward": sum(recent) / len(recent) if recent else None,
                "last_loss": c.last_loss,
                "skipped_updates": c.skipped_updates,
                "last_error": c.last_error,
                "reward_history": list(c.reward_history),
            }

    def stop(self) -> dict[str, Any]:
        """Write a final checkpoint and finish the run (idempotent); returns the status."""
        with self._lock:
            if self.state == "running":
                self._checkpoint("finished")  # recorded: a resumed run stays finished
                self.state = "finished"
                self._pending.clear()
        return self.status()

    def save_archive(self) -> bytes:
        """The current model (LoRA: the adapter) and tokenizer folder as a .tar.gz."""
        with self._lock, tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / MODEL_FOLDER
            self._save_model(folder)
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
                tar.add(folder, arcname=f"{self.run_id}-cycle-{self.cycle}")
            return buffer.getvalue()

    # -- resume ---------------------------------------------------------------------------------

    @classmethod
    def resume(
        cls,
        run_id: str,
        checkpoint_dir: str | Path,
        base_path: str | Path | None = None,
        dtype: Dtype = "float32",
        device: str = "cpu",
        served: Served | None = None,
    ) -> GRPORun:
        """The run as it was acknowledged: its newest checkpoint (weights or adapter, optimiser, cycle,
        counters, state), or its start when it died before the first one, then every cycle journaled
        after it trained again (``grpo_journal``). Raises ``NotFound`` for a folder with neither.

        A LoRA run needs its base model, and full fine-tuning with a KL penalty its reference (the
        model it started from): ``base_path``, or the one the checkpoint recorded. A serving run
        publishes the resumed weights on its first ``publish_served`` (or ``complete``).
        """
        checkpoint_dir = Path(checkpoint_dir)
        found = load_run(run_id, checkpoint_dir, base_path, dtype, device)
        run = cls(run_id, found.lm, found.settings, checkpoint_dir, found.base_path, found.reference, served)
        if found.checkpoint is not None:
            state = read_state(found.checkpoint)
            run.cycle = state["cycle"]
            run.state = state.get("state", "running")  # checkpoints before the state was recorded: running
            run._counters = _Counters(**state["counters"])
            for group_id, cycle in state.get("rewarded", {}).items():  # checkpoints before it: none
                run._remember(group_id, cycle)
            optimizer_state = torch.load(found.checkpoint / OPTIMIZER_FILE, map_location=run.lm.device, weights_only=True)
            run.optimizer.load_state_dict(optimizer_state)
        run._replay()
        return run

    def _replay(self) -> None:
        """Train the cycles journaled after the run's cycle again, in order; the counters become the
        last one's. A step that is not finite now (it was when it was acknowledged) is skipped and
        logged."""
        journaled = self._journal.after(self.cycle)
        for done in journaled:
            try:
                self._train(done.group_id, done.group, done.rewards)
            except NonFiniteUpdate as exc:
                log.warning("GRPO run %s: replaying cycle %d skipped: %s", self.run_id, done.cycle, exc)
            history = self._counters.reward_history
            self._counters = _Counters(**done.counters, reward_history=history)
            self.cycle = done.cycle
            self._remember(done.group_id, done.cycle)
        if journaled:
            log.info("GRPO run %s: resumed at cycle %d (%d journaled cycles trained again)",
                     self.run_id, self.cycle, len(journaled))

    # -- the serving engine ---------------------------------------------------------------------

    def publish_served(self) -> int | None:
        """Publish the run's weights into the serving engine unless it serves this cycle's already;
        returns the served version (None for a run that does not serve)."""
        with self._lock:
            self._sync_served()
            return self.served_version

    def _sync_served(self) -> None:
        """Under ``self._lock``: publish when the engine does not serve this cycle's weights (a run
        that starts or resumes, a cycle just trained, a publish that failed before)."""
        if self.served is None or self.state != "running" or self._published_cycle == self.cycle:
            return
        self.served_version = self.served.publish(self._publishable())
        self._published_cycle = self.cycle

    def _publishable(self) -> dict[str, torch.Tensor]:
        """The trained weights under the served model's names: the adapter's when the served
        policy has one; else every weight (a new adapter merged into a copy first)."""
        assert self.served is not None
        model = self.lm.model
        if self.served.adapter:
            return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}
        if hasattr(model, "peft_config"):  # a new adapter on a plain served model
            model = copy.deepcopy(model).merge_and_unload()
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}

    def _group_seed(self) -> int:
        """The seed of the next group. vLLM seeds a request's ``n`` samples with ``seed``, ``seed + 1``,
        ...: a serving run's groups step by ``group_size`` so that no two share a sample's seed."""
        n = self._counters.groups_handed_out
        return self.settings.seed * 1_000_003 + (n * self.settings.group_size if self.served else n)

    def _sample(self, prompt_ids: list[int], params: GenerationParams) -> tuple[list[Sample], int | None]:
        """A group from the serving engine (and its version), or from the run's own copy (None)."""
        if self.served is not None:
            return self.served.generate(prompt_ids, params)
        return self.generator.generate([prompt_ids], params)[0], None

    # -- internals ------------------------------------------------------------------------------

    def _encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest.at("prompt", "must be a non-empty string")
        tokenizer = self.lm.tokenizer
        if self.settings.chat:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                tokenize=True,
                add_generation_prompt=True,
                return_dict=False,
            )
        else:
            ids = self.generator.encode(prompt)
        if len(ids) > self.settings.max_prompt_length:
            raise InvalidRequest.at(
                "prompt",
                f"the prompt has {len(ids)} tokens, more than max_prompt_length={self.settings.max_prompt_length}: "
                "shorten it",
            )
        return list(ids)

    def _require_running(self) -> None:
        if self.state != "running":
            raise RunFinished(
                f"run {self.run_id} is finished (stopped at cycle {self.cycle}); start a new run"
            )

    def _save_model(self, folder: Path) -> None:
        self.lm.model.save_pretrained(folder)
        self.lm.tokenizer.save_pretrained(folder)

    def _checkpoint(self, run_state: RunState = "running") -> Path:
        """Write ``cycle-<n>`` (see ``grpo_checkpoints``); the journal forgets the cycles it holds."""
        state = {
            "run_id": self.run_id,
            "state": run_state,
            "cycle": self.cycle,
            "settings": self.settings.model_dump(),
            "base_path": str(self.base_path) if self.base_path else None,
            "counters": dataclasses.asdict(self._counters),
            "rewarded": dict(self._rewarded),
        }
        folder = write_checkpoint(self.checkpoint_dir, self.cycle, self._save_model, self.optimizer, state)
        self._journal.forget_through(self.cycle)
        return folder


_REWARDS = TypeAdapter(list[Float32])
"""Rewards as the HTTP model takes them (JSON numbers finite as float32, no booleans), so that a
caller of ``submit_rewards`` in Python is held to the same."""


def _check_rewards(rewards: list[float], group_size: int) -> None:
    """One reward per completion of the group, each a number finite as float32; else InvalidRequest."""
    try:
        _REWARDS.validate_python(rewards)
    except ValidationError as exc:
        errors = field_errors(exc, "rewards")
        raise InvalidRequest(f"{errors[0].field}: {errors[0].message}", errors) from None
    if len(rewards) != group_size:
        message = f"expected {group_size} rewards, one per completion of the group, got {len(rewards)}"
        raise InvalidRequest.at("rewards", message)
