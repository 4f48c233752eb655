"""x1's ``/train_from_dataset``: PPO for an LLM policy, MSE for an LLM value model (no Ray, no HTTP).

``TrainingRun`` trains a loaded model in place. The policy's PPO ratio is taken against the policy
that generated the data: a sample's own ``logprobs`` when it carries them, else the policy as it
was when the run started (its log-probs are computed once, before the first update). The KL
penalty is to the reference model: the base model with the adapter disabled when the policy has a
LoRA adapter, else the starting weights. With an adapter only the adapter trains; without one the
whole model trains, unless ``X1TrainingConfig.lora`` asks to wrap it into a new adapter first. A
value model (whose adapter ``load_value`` already merged) trains its backbone and head on the MSE
between ``ValueModel.scores`` and the samples' targets.

A caller runs ``run`` in a thread, stops it through ``should_stop`` (checked before every
optimiser step), reads ``progress()`` from any thread, and calls ``save`` once ``run`` returned.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from policy_server.errors import FieldError, InvalidRequest
from policy_server.files import replacing_dir
from policy_server.llm.datasets import PolicySample, Sample, ValueSample, encode_last_message
from policy_server.llm.losses import entropy_from_logits, ppo_token_loss, token_log_probs, value_mse
from policy_server.llm.models import LoadedLM, LoadedValue, save_value
from policy_server.llm.x1_config import LoraSettings, X1TrainingConfig
from policy_server.training.guard import NonFiniteUpdate, guarded_step, rollback

log = logging.getLogger(__name__)


@dataclass
class _Encoded:
    input_ids: torch.Tensor
    """(T,) token ids."""
    loss_mask: torch.Tensor
    """(T-1,) 1 on the predicted tokens of the last message."""
    target: float
    """The advantage (policy) or the value target."""
    old_log_probs: torch.Tensor | None = None
    """(T-1,) the generating policy's log-probs, when the sample gave them."""
    ref_log_probs: torch.Tensor | None = field(default=None, repr=False)


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


class TrainingRun:
    """One x1 training run over a loaded policy (PPO) or value model (MSE), updating it in place."""

    def __init__(
        self,
        model: LoadedLM | LoadedValue,
        config: X1TrainingConfig | None = None,
        *,
        batch_size: int = 8,
        max_length: int = 1024,
        max_grad_norm: float | None = 1.0,
        seed: int = 0,
        lora_target_modules: str | list[str] = "all-linear",
    ) -> None:
        """``config`` is what the run was asked for; the keywords are how the server runs it:
        samples per optimiser step, most tokens per sample (a longer one is refused), the gradient
        norm clip (None: none), the shuffling seed, and the modules a new LoRA adapter wraps
        (peft's ``target_modules``: names, a regex, or every linear layer but the output)."""
        self.loaded = model
        self.config = config or X1TrainingConfig()
        self.batch_size, self.max_length, self.max_grad_norm, self.seed = batch_size, max_length, max_grad_norm, seed
        self.kind = "value" if isinstance(model, LoadedValue) else "policy"
        self._lock = threading.Lock()
        self._progress: dict[str, Any] = {
            "step": 0,
            "total_steps": 0,
            "epoch": 0,
            "loss": None,
            "running": False,
            "skipped_steps": 0,
            "last_error": None,
        }
        if self.kind == "policy" and self.config.lora is not None and not is_peft(model.model):
            model.model = _wrap_lora(model.model, self.config.lora, lora_target_modules)
        self.parameters = self._make_trainable()

    @property
    def module(self) -> torch.nn.Module:
        return self.loaded.model

    def _make_trainable(self) -> list[torch.nn.Parameter]:
        adapter_only = self.kind == "policy" and is_peft(self.module)
        for name, param in self.module.named_parameters():
            param.requires_grad_(not adapter_only or "lora_" in name)
        return [p for p in self.module.parameters() if p.requires_grad]

    def progress(self) -> dict[str, Any]:
        """A snapshot for status: step, total_steps, epoch, loss (of the last step), running."""
        with self._lock:
            return dict(self._progress)

    def _set_progress(self, **values: Any) -> None:
        with self._lock:
            self._progress.update(values)

    def encode(self, samples: Sequence[Sample], where: str = "dataset") -> list[_Encoded]:
        """Tokenize and mask every sample; raises InvalidRequest naming the first bad one as
        ``<where>.<i>.<key>``."""
        expected = PolicySample if self.kind == "policy" else ValueSample
        encoded = []
        for i, sample in enumerate(samples):
            if not isinstance(sample, expected):
                raise TypeError(
                    f"a {self.kind} run takes {expected.__name__}s, sample {i} is {type(sample).__name__}"
                )
            at = f"{where}.{i}"
            ids, mask = encode_last_message(
                self.loaded.tokenizer,
                sample.messages,
                self.max_length,
                sample.judged_from,
                f"{at}.messages",
            )
            item = _Encoded(torch.tensor(ids), torch.tensor(mask[1:], dtype=torch.float32), 0.0)
            if isinstance(sample, PolicySample):
                item.target = sample.advantage
                item.old_log_probs = _given_log_probs(sample.log_probs, item.loss_mask, f"{at}.logprobs")
            else:
                item.target = sample.value_target
            encoded.append(item)
        return encoded

    def run(
        self,
        samples: Sequence[Sample],
        should_stop: Callable[[], bool] = lambda: False,
        on_step: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Train for ``num_epochs`` over minibatches; returns step, total_steps, epoch, loss, stopped."""
        cfg = self.config
        data = self.encode(samples)
        steps_per_epoch = math.ceil(len(data) / self.batch_size)
        self._set_progress(
            step=0, total_steps=cfg.num_epochs * steps_per_epoch, epoch=0, loss=None, running=True,
            skipped_steps=0, last_error=None,
        )
        try:
            if self.kind == "policy":
                self._fill_log_probs(data)
            optimizer = torch.optim.AdamW(self.parameters, lr=cfg.lr, weight_decay=0.0)
            generator = torch.Generator().manual_seed(self.seed)
            step, stopped, loss = 0, False, None
            self.module.train()
            for epoch in range(cfg.num_epochs):
                self._set_progress(epoch=epoch)
                order = torch.randperm(len(data), generator=generator).tolist()
                for start in range(0, len(data), self.batch_size):
                    if should_stop():
                        stopped = True
                        break
                    batch = [data[i] for i in order[start : start + self.batch_size]]
                    step += 1
                    try:
                        loss, stats = self._train_step(optimizer, batch, f"epoch {epoch} step {step}")
                    except NonFiniteUpdate as exc:  # rolled back; go on with the next minibatch
                        self._skipped(exc)
                        self._set_progress(step=step)
                        continue
                    self._set_progress(step=step, loss=loss)
                    if on_step is not None:
                        on_step({**self.progress(), **stats})
                if stopped:
                    break
        finally:
            self.module.eval()
            self._set_progress(running=False)
        return {**self.progress(), "stopped": stopped}

    def _train_step(
        self, optimizer: torch.optim.Optimizer, batch: list[_Encoded], where: str
    ) -> tuple[float, dict[str, float]]:
        """One optimiser step on a minibatch; raises ``NonFiniteUpdate`` having changed nothing."""
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        with rollback(optimizer):
            loss, stats = self._policy_loss(batch) if self.kind == "policy" else self._value_loss(batch)
            guarded_step(optimizer, named, loss, where, self.max_grad_norm)
        return loss.item(), stats

    def _skipped(self, exc: NonFiniteUpdate) -> None:
        log.warning("x1 %s training: step skipped: %s", self.kind, exc)
        with self._lock:
            self._progress["skipped_steps"] += 1
            self._progress["last_error"] = f"step skipped, weights kept: {exc}"

    @torch.no_grad()
    def _fill_log_probs(self, data: list[_Encoded]) -> None:
        """Old (starting policy, unless given) and reference log-probs, once, before any update."""
        model = self.module
        model.eval()
        for start in range(0, len(data), self.batch_size):
            batch = data[start : start + self.batch_size]
            ids, attention, _ = self._collate(batch)
            start_log_probs = token_log_probs(model(input_ids=ids, attention_mask=attention).logits, ids)
            if is_peft(model):
                with model.disable_adapter():
                    ref_log_probs = token_log_probs(model(input_ids=ids, attention_mask=attention).logits, ids)
            else:
                ref_log_probs = start_log_probs
            for row, item in enumerate(batch):
                length = len(item.loss_mask)
                if item.old_log_probs is None:
                    item.old_log_probs = start_log_probs[row, :length].clone()
                item.ref_log_probs = ref_log_probs[row, :length].clone()

    def _collate(self, batch: list[_Encoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded (B, T) ids and attention mask, and the (B, T-1) loss mask, on the device."""
        pad = self.loaded.tokenizer.pad_token_id
        width = max(len(item.input_ids) for item in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width - 1))
        for row, item in enumerate(batch):
            n = len(item.input_ids)
            ids[row, :n], attention[row, :n], mask[row, : n - 1] = item.input_ids, 1, item.loss_mask
        device = self.loaded.device
        return ids.to(device), attention.to(device), mask.to(device)

    def _padded(self, batch: list[_Encoded], name: str, width: int) -> torch.Tensor:
        out = torch.zeros((len(batch), width))
        for row, item in enumerate(batch):
            values = getattr(item, name)
            out[row, : len(values)] = values
        return out.to(self.loaded.device)

    def _policy_loss(self, batch: list[_Encoded]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, attention, mask = self._collate(batch)
        logits = self.module(input_ids=ids, attention_mask=attention).logits  # (B, T, V)
        new_log_probs = token_log_probs(logits, ids)  # (B, T-1)
        entropy = entropy_from_logits(logits[:, :-1])  # (B, T-1)
        cfg, width = self.config, mask.shape[1]
        b_advantages = torch.tensor([item.target for item in batch], device=ids.device)
        return ppo_token_loss(
            new_log_probs,
            self._padded(batch, "old_log_probs", width),
            self._padded(batch, "ref_log_probs", width),
            b_advantages,
            mask,
            clip=cfg.clip,
            kl_coef=cfg.kl_coef,
            ent_coef=cfg.entropy_coef,
            entropy=entropy,
        )

    def _value_loss(self, batch: list[_Encoded]) -> tuple[torch.Tensor, dict[str, float]]:
        assert isinstance(self.loaded, LoadedValue)
        ids, attention, _ = self._collate(batch)
        scores = self.loaded.model.scores(ids, attention, self.loaded.position)  # (B,)
        targets = torch.tensor([item.target for item in batch], device=scores.device)
        loss = value_mse(scores, targets)
        return loss, {"mse": loss.item(), "mean_score": scores.mean().item()}

    def save(self, folder: str | Path) -> Path:
        """Write the trained model to ``folder`` atomically (see ``save_trained``); call after ``run``."""
        return save_trained(self.loaded, folder)


def _given_log_probs(log_probs: list[float] | None, mask: torch.Tensor, field_name: str) -> torch.Tensor | None:
    """The sample's per-token log-probs spread over the masked positions of a (T-1,) tensor."""
    if log_probs is None:
        return None
    positions = mask.nonzero().flatten()
    if len(log_probs) != len(positions):
        message = f"has {len(log_probs)} values, the last message has {len(positions)} trained tokens"
        raise InvalidRequest(f"{field_name}: {message}", [FieldError(field_name, message)])
    out = torch.zeros_like(mask)
    out[positions] = torch.tensor(log_probs, dtype=out.dtype)
    return out


def _wrap_lora(model: Any, settings: LoraSettings, target_modules: str | list[str]) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecated
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, config)


def save_trained(model: LoadedLM | LoadedValue, folder: str | Path) -> Path:
    """Write a policy's adapter (or its full weights and tokenizer) or a value model to ``folder``.

    Everything is written and fsynced in a sibling temporary folder first, then swapped into place
    (``policy_server.files.replacing_dir``), so ``folder`` always holds either the previous
    complete model or the new one, never a part, even if the process dies.
    ``load_policy(base, adapter=folder)``, ``load_policy(folder)`` or ``load_value(folder)`` reads it.
    """
    folder = Path(folder)
    with replacing_dir(folder) as tmp:
        if isinstance(model, LoadedValue):
            save_value(model.model, model.tokenizer, tmp, model.position)
        else:
            model.model.save_pretrained(tmp)  # a PeftModel writes its adapter alone
            if not is_peft(model.model):
                model.tokenizer.save_pretrained(tmp)
    return folder
