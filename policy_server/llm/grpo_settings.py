"""``GRPOSettings``: how a GRPO run samples and trains. One pydantic model, validated once: the
body of ``POST /llm/grpo/runs`` and a checkpoint's recorded settings.

It imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from policy_server.fields import STRICT, Float32, Text

StopString = Annotated[Text, Field(min_length=1)]
"""A string that ends a completion: never empty (it would end every completion at once)."""


class GRPOSettings(BaseModel):
    """A run's settings; every field has a default. Validated on construction (pydantic's
    ``ValidationError``, a 422 naming the field on the wire)."""

    model_config = ConfigDict(**STRICT, frozen=True)

    group_size: int = Field(4, ge=2, le=64)
    """Completions per prompt; one group is one optimiser step."""
    lr: Float32 = Field(1e-5, gt=0, le=1)
    """AdamW learning rate."""
    beta: Float32 = Field(0.04, ge=0)
    """Weight of the k3 KL penalty to the reference model; 0 skips the reference."""
    clip_eps: Float32 = Field(0.2, gt=0, lt=1)
    """PPO clip range of the probability ratio."""
    max_prompt_length: int = Field(512, ge=1)
    """Longer prompts (in tokens) are refused."""
    max_completion_length: int = Field(64, ge=1, le=4096)
    """Most tokens per completion."""
    temperature: Float32 = Field(1.0, gt=0, le=10)
    """Sampling temperature of the completions."""
    stop_strings: list[StopString] = Field(default_factory=list)
    """A completion also ends on these (it always ends on the model's end token)."""
    chat: bool = Field(False, description="Wrap each prompt in the chat template.")
    """Render a prompt as one user message with the tokenizer's chat template (else plain text)."""
    lora: bool = Field(True, description="Train a LoRA adapter (else the full model).")
    """Train a LoRA adapter (the model's own when it was loaded with one, else a new one); False:
    full fine-tuning."""
    lora_r: int = Field(8, ge=1, le=256)
    lora_alpha: int = Field(16, ge=1, le=4096)
    lora_dropout: Float32 = Field(0.0, ge=0, lt=1)
    checkpoint_every: int = Field(10, ge=1)
    """Checkpoint every this many cycles (and at stop)."""
    max_version_lag: int = Field(0, ge=0, description="Accept rewards for groups this many cycles old.")
    """Rewards are accepted for groups generated at most this many cycles ago (0: the current one)."""
    serve: bool = Field(
        False, description="Sample through the served model and publish each cycle's weights into it (one such run at a time)."
    )
    """Sample the groups through the serving engine (every replica of the policy) instead of the run's
    own copy, and publish the trained weights into it after every cycle: what the policy serves is
    what the run trains. At most one such run at a time; False: the run samples from its own copy."""
    seed: int = 0
    """Seeds sampling: group n of a run is sampled with a seed derived from (seed, n)."""

    @classmethod
    def recorded(cls, data: dict[str, Any]) -> GRPOSettings:
        """The settings a checkpoint recorded. Checkpoints written before these settings were the
        request's model also hold ``max_pending_groups``, ``reward_window`` and
        ``lora_target_modules`` (now the run's constants, with the same values): left out."""
        return cls.model_validate({k: v for k, v in data.items() if k in cls.model_fields})
