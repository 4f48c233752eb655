"""What one x1 training run is asked for: ``X1TrainingConfig`` (the body of
``/train_from_dataset``) and ``LoraSettings``. One pydantic model
each, validated once; they import neither torch nor transformers.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from policy_server.fields import STRICT, Float32, Text

_CONFIG = ConfigDict(**STRICT, frozen=True)


class LoraSettings(BaseModel):
    """Train a new LoRA adapter on a policy served without one (merged into the served weights)."""

    model_config = _CONFIG

    r: int = Field(8, ge=1, le=256)
    """Rank of the update matrices."""
    alpha: int = Field(16, ge=1, le=4096, description="The update is scaled by alpha / r.")
    dropout: Float32 = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input."""


class X1TrainingConfig(BaseModel):
    """x1's `/train_from_dataset`: PPO for the policy, MSE for the value model."""

    model_config = _CONFIG

    dataset: list[dict[str, Any]] | None = Field(
        None, description="Samples: {messages, GAE} (policy) or {messages, value_target} (value), "
        "or x1's documented {question, context, current_node, value}."
    )
    """The samples, as sent (``datasets.parse_samples`` validates them for the model's kind)."""
    dataset_path: Text | None = Field(None, description="A JSON or JSONL file under the server's data folder.")
    num_epochs: int = Field(1, ge=1, le=1000)
    """Passes over the (subset of the) dataset."""
    percent_of_data: Float32 = Field(1.0, gt=0, le=1)
    """Share of the samples used, drawn with a fixed seed (see ``datasets.subset``)."""
    save_samples: bool = Field(False, description="Store the samples under the server's samples folder.")
    lr: Float32 = Field(1e-5, gt=0, le=1)
    """AdamW learning rate."""
    clip: Float32 = Field(0.2, gt=0, description="PPO: ratio clipping.")
    kl_coef: Float32 = Field(0.01, ge=0, description="PPO: KL penalty to the reference model.")
    entropy_coef: Float32 = Field(0.01, ge=0, description="PPO: entropy bonus.")
    lora: LoraSettings | None = Field(
        None, description="Policy without an adapter: train a new LoRA adapter instead of every weight. "
        "A policy with an adapter always trains its adapter."
    )
