"""One GRPO training step on a group of scored completions, and the model it trains.

``prepare_model`` makes a loaded policy trainable (a LoRA adapter, or every weight with a frozen
reference); ``train_step`` takes one optimiser step on the clipped GRPO loss (``losses.grpo_loss``)
of a group, rolling everything back when the update is not finite.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from policy_server.llm.grpo_settings import GRPOSettings
from policy_server.llm.losses import group_advantages, grpo_loss
from policy_server.llm.models import LoadedLM
from policy_server.training.guard import check, guarded_step, rollback

LORA_TARGET_MODULES = "all-linear"
"""Modules a new adapter wraps (peft's ``target_modules``): every linear layer but the output."""


@dataclass
class Group:
    """A group of completions handed out and waiting for its rewards."""

    prompt_ids: list[int]
    completions: list[list[int]]
    """Token ids of each completion."""
    old_log_probs: list[list[float]]
    """The sampling policy's log-prob of each completion token."""
    cycle: int
    """The run's cycle (model version) that sampled it."""


def completion_log_probs(
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
    log_probs = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    return log_probs, mask[:, p:]


def prepare_model(lm: LoadedLM, settings: GRPOSettings, reference: LoadedLM | None) -> Any:
    """Make ``lm``'s trainable parameters (in place) and return the frozen reference of full
    fine-tuning with a KL penalty (``reference``'s model, else a copy of ``lm``'s), or None: a LoRA
    run's reference is its base with the adapter disabled, and ``beta == 0`` needs none."""
    s = settings
    is_peft = hasattr(lm.model, "peft_config")
    frozen = None
    if s.lora:
        if not is_peft:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=s.lora_r,
                lora_alpha=s.lora_alpha,
                lora_dropout=s.lora_dropout,
                target_modules=LORA_TARGET_MODULES,
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
            frozen = model.eval().requires_grad_(False)
    lm.model.eval()
    return frozen


def reference_log_probs(lm: LoadedLM, reference: Any, beta: float, group: Group) -> torch.Tensor | None:
    """(G, T) log-probs of the group's completions under the reference; None without a KL term."""
    if beta == 0:
        return None
    with torch.no_grad():
        if reference is not None:
            return completion_log_probs(reference, group.prompt_ids, group.completions, lm.device)[0]
        with lm.model.disable_adapter():
            return completion_log_probs(lm.model, group.prompt_ids, group.completions, lm.device)[0]


def train_step(
    lm: LoadedLM,
    optimizer: torch.optim.Optimizer,
    reference: Any,
    settings: GRPOSettings,
    group: Group,
    rewards: list[float],
    where: str,
) -> dict[str, float]:
    """One optimiser step on the group with these rewards (one per completion); returns the loss's
    statistics. Raises ``NonFiniteUpdate`` having changed neither the model nor the optimiser."""
    s, device = settings, lm.device
    advantages = group_advantages(torch.tensor(rewards, dtype=torch.float32)).to(device)
    width = max(len(c) for c in group.completions)
    old = torch.tensor([lp + [0.0] * (width - len(lp)) for lp in group.old_log_probs], device=device)
    ref = reference_log_probs(lm, reference, s.beta, group)
    check("data", [("the group's advantages", advantages)], "the rewards")
    model = lm.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.train()  # LoRA dropout, if any; the base model's own dropout too
    try:
        with rollback(optimizer):
            new, mask = completion_log_probs(model, group.prompt_ids, group.completions, device)
            loss, stats = grpo_loss(new, old, ref, advantages, mask, s.clip_eps, s.beta)
            guarded_step(optimizer, named, loss, where)
    finally:
        model.eval()
    return stats
