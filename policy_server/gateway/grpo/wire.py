"""Request models of the GRPO routes."""

from __future__ import annotations

from pydantic import Field

from policy_server.fields import Float32, Text
from policy_server.gateway.llm.wire import StopString, _Wire


class GRPOStart(_Wire):
    """A run's settings; every field has a default (see GRPOSettings)."""

    group_size: int = Field(4, ge=2, le=64)
    lr: Float32 = Field(1e-5, gt=0, le=1)
    beta: Float32 = Field(0.04, ge=0)
    clip_eps: Float32 = Field(0.2, gt=0, lt=1)
    max_prompt_length: int = Field(512, ge=1)
    max_completion_length: int = Field(64, ge=1, le=4096)
    temperature: Float32 = Field(1.0, gt=0, le=10)
    stop_strings: list[StopString] = Field(default_factory=list)
    chat: bool = Field(False, description="Wrap each prompt in the chat template.")
    lora: bool = Field(True, description="Train a LoRA adapter (else the full model).")
    lora_r: int = Field(8, ge=1, le=256)
    lora_alpha: int = Field(16, ge=1, le=4096)
    lora_dropout: Float32 = Field(0.0, ge=0, lt=1)
    checkpoint_every: int = Field(10, ge=1)
    max_version_lag: int = Field(0, ge=0, description="Accept rewards for groups this many cycles old.")
    seed: int = 0


class GRPOPrompt(_Wire):
    prompt: Text = Field(min_length=1)


class GRPORewards(_Wire):
    group_id: str = Field(min_length=1, max_length=64)
    rewards: list[Float32] = Field(
        min_length=1, description="One reward per completion of the group, in order: JSON numbers, finite as float32."
    )
