"""Control-flow-reversed GRPO: the server hands out groups of completions, the client scores them.

A client asks ``GRPORun.complete(prompt)`` for a group of ``group_size`` sampled completions,
scores them locally, and posts the rewards with ``submit_rewards(group_id, rewards)``. The run
normalises the rewards within the group (``group_advantages``), takes one optimiser step on the
clipped GRPO loss (``grpo_loss``, DeepSeekMath eq. 3 / TRL's ``loss_type="grpo"``) against a frozen
reference model, and moves to the next cycle. Every completion and every answer names the model
version ``(run_id, cycle)``; rewards for a group generated more than ``max_version_lag`` cycles ago
are refused (``StaleGroup``) and counted.

A run is a plain, thread-safe object: no Ray, no HTTP. Checkpoints (every ``checkpoint_every``
cycles and at ``stop``) are folders ``cycle-<n>`` under the run's checkpoint folder, written to a
hidden temporary folder and renamed into place; ``GRPORun.resume`` continues from the newest.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import tarfile
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import TypeAdapter, ValidationError

from policy_server.errors import InvalidRequest, NotFound, RunFinished, StaleGroup
from policy_server.fields import Float32, field_errors
from policy_server.llm.generation import GenerationParams, Generator
from policy_server.llm.models import Dtype, LoadedLM, load_policy
from policy_server.training.guard import NonFiniteUpdate, check, guarded_step, rollback

log = logging.getLogger(__name__)

MODEL_FOLDER = "model"
"""Inside a checkpoint: the adapter (LoRA) or the whole model (full fine-tuning), with the tokenizer."""
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
KEEP_CHECKPOINTS = 2
_CHECKPOINT_PREFIX = "cycle-"


# ---------------------------------------------------------------------------------------------
# The math: pure functions of tensors.


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """Group-normalised advantages: (G,) rewards of one prompt's completions → (G,).

    ``(r - mean(r)) / (std(r) + eps)`` with the Bessel-corrected std, as TRL's ``GRPOTrainer``
    (``torch.std``'s default); ``scale=False`` gives ``r - mean(r)`` (Dr. GRPO). A group whose
    rewards are all equal (including a group of one) carries no signal: all zeros, exactly.

    Naive equivalent: ``m = sum(r) / G; s = sqrt(sum((x - m) ** 2 for x in r) / (G - 1));
    [(x - m) / (s + eps) for x in r]``.
    """
    if rewards.ndim != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty 1-D tensor, got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    if bool((rewards == rewards[0]).all()):
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean()
    return centred / (rewards.std() + eps) if scale else centred


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy ‖ reference) per token: any shape → same shape, >= 0.

    ``exp(ref - logp) - (ref - logp) - 1`` for tokens sampled from the policy.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def grpo_loss(
    new_logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.04,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO loss to minimise, and statistics.

    ``new_logp``, ``old_logp``, ``ref_logp``: (B, T) log-probs of the completion tokens under the
    policy being trained, the policy that sampled them, and the reference (None: no KL term);
    ``advantages``: (B,); ``mask``: (B, T), 1 on completion tokens. Per token
    ``-(min(ρ·A, clip(ρ, 1-ε, 1+ε)·A) - β·k3)`` with ``ρ = exp(new - old)``, averaged over each
    sequence's tokens, then over the sequences. Returns ``(loss (), {"loss", "kl", "clip_fraction",
    "ratio"})``, the statistics averaged over all masked tokens.
    """
    mask = mask.to(new_logp.dtype)
    ratio = torch.exp(new_logp - old_logp)
    adv = advantages[:, None].to(new_logp.dtype)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    per_token = -surrogate
    kl = kl_k3(new_logp, ref_logp) if ref_logp is not None else torch.zeros_like(new_logp)
    if ref_logp is not None:
        per_token = per_token + beta * kl
    tokens = mask.sum(-1).clamp(min=1)  # (B,)
    loss = ((per_token * mask).sum(-1) / tokens).mean()
    with torch.no_grad():
        total = mask.sum().clamp(min=1)
        clipped = ((ratio - 1).abs() > clip_eps).to(mask.dtype)
        stats = {
            "loss": loss.item(),
            "kl": ((kl * mask).sum() / total).item(),
            "clip_fraction": ((clipped * mask).sum() / total).item(),
            "ratio": ((ratio * mask).sum() / total).item(),
        }
    return loss, stats


def completion_logprobs(
    model: Any, prompt_ids: list[int], completions: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs of each completion after one shared prompt.

    → (log-probs (G, T), mask (G, T)) with T the longest completion; completions are right-padded
    (the padding's log-probs are garbage and masked out).
    """
    width = max(len(c) for c in completions)
    p = len(prompt_ids)
    ids = torch.tensor([prompt_ids + c + [0] * (width - len(c)) for c in completions], device=device)
    mask = torch.tensor([[1] * (p + len(c)) + [0] * (width - len(c)) for c in completions], device=device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, p - 1 : -1].float()
    targets = ids[:, p:]
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    return logp, mask[:, p:]


# ---------------------------------------------------------------------------------------------
# A run.


@dataclass(frozen=True)
class GRPOSettings:
    """How a GRPO run samples and trains; validated on construction (``ValueError``)."""

    group_size: int = 4
    """Completions per prompt; one group is one optimiser step."""
    lr: float = 1e-5
    """AdamW learning rate."""
    beta: float = 0.04
    """Weight of the k3 KL penalty to the reference model; 0 skips the reference."""
    clip_eps: float = 0.2
    """PPO clip range of the probability ratio."""
    max_prompt_length: int = 512
    """Longer prompts (in tokens) are refused."""
    max_completion_length: int = 64
    """Most tokens per completion."""
    temperature: float = 1.0
    """Sampling temperature of the completions."""
    stop_strings: tuple[str, ...] = ()
    """A completion also ends on these (it always ends on the model's end token)."""
    chat: bool = False
    """Render a prompt as one user message with the tokenizer's chat template (else plain text)."""
    lora: bool = True
    """Train a LoRA adapter (the model's own when it was loaded with one, else a new one); False:
    full fine-tuning."""
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: str | tuple[str, ...] = "all-linear"
    """Modules a new adapter wraps (peft's ``target_modules``)."""
    checkpoint_every: int = 10
    """Checkpoint every this many cycles (and at stop)."""
    max_version_lag: int = 0
    """Rewards are accepted for groups generated at most this many cycles ago (0: the current one)."""
    max_pending_groups: int = 1024
    """Groups handed out and not yet rewarded that are remembered; the oldest is forgotten beyond it."""
    reward_window: int = 20
    """``status()["mean_reward"]`` averages the last this many groups."""
    seed: int = 0
    """Seeds sampling: group n of a run is sampled with a seed derived from (seed, n)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop_strings, list):
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        checks = [
            (self.group_size >= 2, f"group_size must be >= 2, not {self.group_size}"),
            (self.lr > 0, f"lr must be > 0, not {self.lr}"),
            (self.beta >= 0, f"beta must be >= 0, not {self.beta}"),
            (0 < self.clip_eps < 1, f"clip_eps must be in (0, 1), not {self.clip_eps}"),
            (self.max_prompt_length >= 1, "max_prompt_length must be >= 1"),
            (self.max_completion_length >= 1, "max_completion_length must be >= 1"),
            (all(isinstance(s, str) and s for s in self.stop_strings), "stop strings must be non-empty strings"),
            (0 < self.temperature < math.inf, f"temperature must be > 0, not {self.temperature}"),
            (self.lora_r >= 1, "lora_r must be >= 1"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.max_version_lag >= 0, "max_version_lag must be >= 0"),
            (self.max_pending_groups >= 1, "max_pending_groups must be >= 1"),
            (self.reward_window >= 1, "reward_window must be >= 1"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GRPOSettings:
        data = dict(data)
        for key in ("stop_strings", "lora_target_modules"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass
class _Group:
    prompt_ids: list[int]
    completions: list[list[int]]
    old_logprobs: list[list[float]]
    cycle: int


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
    """

    def __init__(
        self,
        run_id: str,
        lm: LoadedLM,
        settings: GRPOSettings,
        checkpoint_dir: str | Path,
        base_path: str | Path | None = None,
        reference: LoadedLM | None = None,
    ) -> None:
        self.run_id = run_id
        self.lm = lm
        self.settings = settings
        self.checkpoint_dir = Path(checkpoint_dir)
        self.base_path = Path(base_path).resolve() if base_path is not None else None
        self.cycle = 0
        self.state: RunState = "running"
        self._counters = _Counters()
        self._pending: OrderedDict[str, _Group] = OrderedDict()
        self._lock = threading.Lock()
        self._reference: Any = None
        self._prepare_model(reference)
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
                seed=s.seed * 1_000_003 + self._counters.groups_handed_out,
            )
            samples = self.generator.generate([prompt_ids], params)[0]
            group_id = uuid.uuid4().hex
            self._pending[group_id] = _Group(
                prompt_ids,
                [x.completion_ids for x in samples],
                [x.logprobs for x in samples],
                self.cycle,
            )
            while len(self._pending) > s.max_pending_groups:
                self._pending.popitem(last=False)
            self._counters.groups_handed_out += 1
            return {
                "group_id": group_id,
                "prompt": prompt,
                "completions": [
                    {"text": x.text(self.lm.tokenizer), "token_ids": x.completion_ids, "logprobs": x.logprobs}
                    for x in samples
                ],
                "model_version": [self.run_id, self.cycle],
            }

    def submit_rewards(self, group_id: str, rewards: list[float]) -> dict[str, Any]:
        """Train one step on the group with these rewards (one per completion, in order)."""
        with self._lock:
            self._require_running()
            group = self._pending.get(group_id)
            if group is None:
                raise NotFound(
                    f"run {self.run_id} has no group {group_id!r} waiting for rewards: it was never handed out, "
                    "was already rewarded, or was forgotten (more than max_pending_groups groups waited)"
                )
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
                stats = self._step(group, rewards)
            except NonFiniteUpdate as exc:  # rolled back: the cycle stays, nothing is checkpointed
                return self._skipped(exc, mean_reward)
            self._counters.rewards_received += 1
            self._counters.reward_history.append(mean_reward)
            self._counters.last_loss = stats["loss"]
            self.cycle += 1
            if self.cycle % self.settings.checkpoint_every == 0:
                self._checkpoint()
            return {
                "model_version": [self.run_id, self.cycle],
                "loss": stats["loss"],
                "mean_reward": mean_reward,
                "skipped": False,
            }

    def _skipped(self, exc: NonFiniteUpdate, mean_reward: float) -> dict[str, Any]:
        self._counters.skipped_updates += 1
        self._counters.last_error = f"step skipped at cycle {self.cycle}, model kept: {exc}"
        log.warning("GRPO run %s: %s", self.run_id, self._counters.last_error)
        return {
            "model_version": [self.run_id, self.cycle],
            "loss": None,
            "mean_reward": mean_reward,
            "skipped": True,
            "reason": exc.reason,
            "error": self._counters.last_error,
        }

    def status(self) -> dict[str, Any]:
        with self._lock:
            c = self._counters
            recent = c.reward_history[-self.settings.reward_window :]
            return {
                "run_id": self.run_id,
                "state": self.state,
                "cycle": self.cycle,
                "model_version": [self.run_id, self.cycle],
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
                self._checkpoint()
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
    ) -> GRPORun:
        """The run as its newest checkpoint left it: weights or adapter, optimiser, cycle, counters.

        A LoRA run needs its base model, and full fine-tuning with a KL penalty its reference (the
        model it started from): ``base_path``, or the one the checkpoint recorded.
        """
        folder = latest_checkpoint(checkpoint_dir)
        if folder is None:
            raise NotFound(f"run {run_id} has no checkpoint in {checkpoint_dir}: it cannot be resumed")
        state = json.loads((folder / STATE_FILE).read_text())
        if state["run_id"] != run_id:
            raise ValueError(
                f"the checkpoints in {checkpoint_dir} belong to run {state['run_id']}, not {run_id}"
            )
        settings = GRPOSettings.from_dict(state["settings"])
        base = base_path or state.get("base_path")
        reference = None
        if (settings.lora or settings.beta > 0) and base is None:
            raise ValueError(
                f"run {run_id} needs the model it started from (LoRA base or KL reference): "
                "give base_path, that model's folder"
            )
        if settings.lora:
            lm = load_policy(base, adapter=folder / MODEL_FOLDER, dtype=dtype, device=device)
        else:
            lm = load_policy(folder / MODEL_FOLDER, dtype=dtype, device=device)
            if settings.beta > 0:
                reference = load_policy(base, dtype=dtype, device=device)
        run = cls(run_id, lm, settings, checkpoint_dir, base_path=base, reference=reference)
        run.cycle = state["cycle"]
        run._counters = _Counters(**state["counters"])
        optimizer_state = torch.load(folder / OPTIMIZER_FILE, map_location=lm.device, weights_only=True)
        run.optimizer.load_state_dict(optimizer_state)
        return run

    # -- internals ------------------------------------------------------------------------------

    def _prepare_model(self, reference: LoadedLM | None) -> None:
        """Make the trainable parameters and the frozen reference."""
        s, lm = self.settings, self.lm
        is_peft = hasattr(lm.model, "peft_config")
        if s.lora:
            if not is_peft:
                from peft import LoraConfig, get_peft_model

                config = LoraConfig(
                    r=s.lora_r,
                    lora_alpha=s.lora_alpha,
                    lora_dropout=s.lora_dropout,
                    target_modules=list(s.lora_target_modules)
                    if isinstance(s.lora_target_modules, tuple)
                    else s.lora_target_modules,
                    task_type="CAUSAL_LM",
                )
                lm.model = get_peft_model(lm.model, config)
            for name, param in lm.model.named_parameters():
                param.requires_grad_("lora_" in name)
        else:
            if is_peft:
                lm.model = lm.model.merge_and_unload()
            for param in lm.model.parameters():
                param.requires_grad_(True)
            if s.beta > 0:
                model = reference.model if reference is not None else copy.deepcopy(lm.model)
                self._reference = model.eval().requires_grad_(False)
        lm.model.eval()

    def _reference_logprobs(self, group: _Group) -> torch.Tensor | None:
        if self.settings.beta == 0:
            return None
        with torch.no_grad():
            if self._reference is not None:
                return completion_logprobs(
                    self._reference, group.prompt_ids, group.completions, self.lm.device
                )[0]
            with self.lm.model.disable_adapter():
                return completion_logprobs(
                    self.lm.model, group.prompt_ids, group.completions, self.lm.device
                )[0]

    def _step(self, group: _Group, rewards: list[float]) -> dict[str, float]:
        s, device = self.settings, self.lm.device
        advantages = group_advantages(torch.tensor(rewards, dtype=torch.float32)).to(device)
        width = max(len(c) for c in group.completions)
        old = torch.tensor([lp + [0.0] * (width - len(lp)) for lp in group.old_logprobs], device=device)
        ref = self._reference_logprobs(group)
        check("data", [("the group's advantages", advantages)], "the rewards")
        model = self.lm.model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        model.train()  # LoRA dropout, if any; the base model's own dropout too
        try:
            with rollback(self.optimizer):
                new, mask = completion_logprobs(model, group.prompt_ids, group.completions, device)
                loss, stats = grpo_loss(new, old, ref, advantages, mask, s.clip_eps, s.beta)
                guarded_step(self.optimizer, named, loss, f"cycle {self.cycle}")
        finally:
            model.eval()
        return stats

    def _encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest.at("body.prompt", "must be a non-empty string")
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
                "body.prompt",
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

    def _checkpoint(self) -> Path:
        """Write ``cycle-<n>`` atomically and keep the newest ``KEEP_CHECKPOINTS``."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoint_dir / f"{_CHECKPOINT_PREFIX}{self.cycle:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.checkpoint_dir))
        try:
            self._save_model(tmp / MODEL_FOLDER)
            torch.save(self.optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            state = {
                "run_id": self.run_id,
                "cycle": self.cycle,
                "settings": self.settings.to_dict(),
                "base_path": str(self.base_path) if self.base_path else None,
                "counters": dataclasses.asdict(self._counters),
            }
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
            old = None
            if final.exists():  # stop right after a periodic checkpoint: replace it
                old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
                final.rename(old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for stale in _checkpoints(self.checkpoint_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(stale, ignore_errors=True)
        return final


def _checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The complete checkpoint folders, oldest first (hidden temporary folders are not listed)."""
    found = [
        p
        for p in Path(checkpoint_dir).glob(f"{_CHECKPOINT_PREFIX}*")
        if p.is_dir() and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest checkpoint folder of a run, or None."""
    found = _checkpoints(Path(checkpoint_dir))
    return found[-1] if found else None


_REWARDS = TypeAdapter(list[Float32])
"""Rewards as the HTTP model takes them (JSON numbers finite as float32, no booleans), so that a
caller of ``submit_rewards`` in Python is held to the same."""


def _check_rewards(rewards: list[float], group_size: int) -> None:
    """One reward per completion of the group, each a number finite as float32; else InvalidRequest."""
    try:
        _REWARDS.validate_python(rewards)
    except ValidationError as exc:
        errors = field_errors(exc, "body.rewards")
        raise InvalidRequest(f"{errors[0].field}: {errors[0].message}", errors) from None
    if len(rewards) != group_size:
        message = f"expected {group_size} rewards, one per completion of the group, got {len(rewards)}"
        raise InvalidRequest.at("body.rewards", message)
