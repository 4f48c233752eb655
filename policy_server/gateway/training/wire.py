"""Request and response models of the training endpoints (the experience models are in ``experience``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from policy_server.fields import STRICT
from policy_server.gateway.training.experience import CLIENT_ID_PATTERN
from policy_server.training.checkpoint import NAME_PATTERN


class _Request(BaseModel):
    model_config = STRICT


class Registration(_Request):
    client_id: str | None = Field(None, min_length=1, max_length=128, pattern=CLIENT_ID_PATTERN,
                                  description="Your id; the server makes one when it is null.")
    info: dict[str, Any] | None = Field(None, description="Anything that describes the client.")


class ClientAnswer(BaseModel):
    client_id: str
    model_version: int
    algorithm: str
    state: str
    heartbeat_interval_s: float
    exploration: dict[str, float] = Field(description="DQN: `epsilon` for epsilon-greedy acting.")


class ExperienceAnswer(BaseModel):
    accepted: int = Field(description="Steps stored for training.")
    rejected: int = Field(description="Steps acted by too old a model version (not stored).")
    model_version: int = Field(description="The current version: act with it next.")
    state: str


class TrainingStatus(BaseModel):
    policy: str
    algorithm: str
    state: str = Field(description="running, paused or stopped.")
    model_version: int
    updates: int
    skipped_updates: int = Field(
        description="Updates refused because a loss, gradient or new weight was not finite; the model "
        "version stayed, nothing was published or saved, and `last_error` says what and where."
    )
    samples_received: int
    samples_accepted: int
    samples_rejected: dict[str, int]
    samples_per_second: float
    active_clients: int
    clients: dict[str, dict[str, Any]]
    episodes: int
    last_return: float | None
    mean_return: float | None = Field(description="Mean return of the last `return_window` episodes.")
    best_mean_return: float | None
    return_window: int
    recent_returns: list[float]
    last_update_seconds: float | None
    last_update: dict[str, float]
    last_checkpoint: str | None
    last_error: str | None
    exploration: dict[str, float]


class Resume(_Request):
    checkpoint: str | None = Field(
        None, description="A checkpoint's name; null: the newest.",
        json_schema_extra={"pattern": NAME_PATTERN},  # checked by the store, whose 422 says what a name may hold
    )


class Saved(BaseModel):
    checkpoint: str
    model_version: int


class Checkpoints(BaseModel):
    checkpoints: list[dict[str, Any]]
