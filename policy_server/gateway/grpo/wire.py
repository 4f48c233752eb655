"""Request and response models of the GRPO routes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from policy_server.fields import Float32, Text
from policy_server.gateway.llm.wire import _Wire


class GRPOPrompt(_Wire):
    prompt: Text = Field(min_length=1)


class GRPORewards(_Wire):
    group_id: str = Field(min_length=1, max_length=64)
    rewards: list[Float32] = Field(
        min_length=1, description="One reward per completion of the group, in order: JSON numbers, finite as float32."
    )



# --- answers ------------------------------------------------------------------------------------

RunVersion = Annotated[list[str | int], Field(min_length=2, max_length=2)]
VERSION_DOC = "`[run_id, cycle]`: the run and the training cycle whose weights made or will use it."
SERVED_DOC = ("`serve: true` runs: the served policy's version (as its own answers name it) that holds "
              "the run's weights, or made these completions; null for a run that samples from its own copy.")


class GRPOStatus(BaseModel):
    run_id: str
    state: Literal["running", "finished"]
    cycle: int = Field(description="Training cycles done (one per rewarded group).")
    model_version: RunVersion = Field(description=VERSION_DOC)
    served_version: int | None = Field(description=SERVED_DOC)
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
    served_version: int | None = Field(description=SERVED_DOC)


class GRPOUpdate(BaseModel):
    model_version: RunVersion = Field(description=VERSION_DOC)
    served_version: int | None = Field(None, description=SERVED_DOC)
    loss: float | None = Field(description="None when the update was skipped.")
    mean_reward: float
    skipped: bool = Field(description="True when a non-finite value refused the update (the model is kept).")
    reason: str | None = Field(None, description="What was non-finite, when skipped.")
    error: str | None = Field(None, description="The run's last error, when skipped.")
