"""Request and response models of the GRPO routes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

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



# --- answers ------------------------------------------------------------------------------------

RunVersion = tuple[str, int]
VERSION_DOC = "`[run_id, cycle]`: the run and the training cycle whose weights made or will use it."


class GRPOStatus(BaseModel):
    run_id: str
    state: Literal["running", "finished"]
    cycle: int = Field(description="Training cycles done (one per rewarded group).")
    model_version: RunVersion = Field(description=VERSION_DOC)
    groups_handed_out: int
    rewards_received: int
    rejected_stale: int = Field(description="Reward submissions refused: their group came from an older cycle.")
    pending_groups: int
    mean_reward: float | None = Field(description="Mean reward of the last `reward_window` groups.")
    last_loss: float | None
    skipped_updates: int = Field(description="Updates refused and rolled back (a non-finite value).")
    last_error: str | None
    reward_history: list[float]


class GRPOStarted(GRPOStatus):
    settings: dict[str, Any] = Field(description="The run's settings, defaults filled in.")


class GRPORunSummary(BaseModel):
    run_id: str
    state: Literal["running", "finished"]
    cycle: int


class GRPORunList(BaseModel):
    runs: list[GRPORunSummary]


class GRPOCompletion(BaseModel):
    text: str
    token_ids: list[int]
    logprobs: list[float] = Field(description="The sampling policy's log-prob of each completion token.")


class GRPOGroup(BaseModel):
    group_id: str
    prompt: str
    completions: list[GRPOCompletion]
    model_version: RunVersion = Field(description=VERSION_DOC)


class GRPOUpdate(BaseModel):
    model_version: RunVersion = Field(description=VERSION_DOC)
    loss: float | None = Field(description="None when the update was skipped.")
    mean_reward: float
    skipped: bool = Field(description="True when a non-finite value refused the update (the model is kept).")
    reason: str | None = Field(None, description="What was non-finite, when skipped.")
    error: str | None = Field(None, description="The run's last error, when skipped.")
