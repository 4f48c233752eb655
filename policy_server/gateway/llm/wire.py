"""Request and response models of the x1 endpoints of the LLM policy and value model: x1's field
names and defaults, plus the token-record and session extensions. The training bodies are the
domain's own models (``llm.x1_config.X1TrainingConfig``, ``llm.grpo_settings.GRPOSettings``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from policy_server.fields import STRICT, Float32, Text
from policy_server.llm.grpo_settings import StopString

Strategy = Literal["temperature", "beam_search", "diverse_beam_search"]
SESSION_ID = r"^[A-Za-z0-9_.:-]{1,128}$"


class _Wire(BaseModel):
    """Our own request models: unknown fields refused, JSON types taken strictly ("5" is no int)."""

    model_config = STRICT


class _Sampling(_Wire):
    num_samples: int = Field(1, ge=1, description="Samples to generate.")
    temperature: Float32 = Field(0.7, ge=0, le=10, description="Sampling temperature (0: greedy).")
    decoding_strategy: Strategy = Field("temperature", description="temperature, beam_search or diverse_beam_search.")
    num_beam_groups: int | None = Field(
        None, ge=1, description="diverse_beam_search: groups of num_samples / num_beam_groups beams; "
        "default num_samples groups of one beam. Must divide num_samples."
    )
    diversity_penalty: Float32 = Field(
        0.5, ge=0, le=100, description="diverse_beam_search: subtracted from a token's log-prob once per "
        "earlier group that chose it at the same step (Vijayakumar et al. 2016)."
    )
    safe_logits: bool = Field(False, description="Replace NaN/inf logits (and report how many) instead of failing.")
    seed: int | None = Field(None, description="Seed of the sampler (reproducible samples).")
    return_tokens: bool = Field(False, description="Also answer training-ready token records per sample.")


class DirectForward(_Sampling):
    input_string: Text = Field(min_length=1, description="The prompt, as text (no template applied).")
    max_input_length: int = Field(1024, ge=1, description="Most prompt tokens (longer: 422, or `truncate`).")
    max_output_length: int | None = Field(
        None, ge=1, description="Most tokens of prompt and completion together; default max_input_length + 256."
    )
    stop_strings: list[StopString] | None = Field(None, description="Default: the step and end tokens.")
    skip_special_tokens: bool = Field(True, description="Leave special tokens out of the answered text.")
    truncate: bool = Field(False, description="Keep the last max_input_length prompt tokens instead of a 422.")
    min_new_tokens: int = Field(
        0, ge=0, description="Sampling: generate at least this many tokens before a stop string can end a sample."
    )
    session_id: str | None = Field(
        None, pattern=SESSION_ID, description="Track this generation in a session (multi-turn token records)."
    )
    session_mode: Literal["linear", "tree"] = Field(
        "linear", description="linear: an extension replaces its node; tree: every branch is kept."
    )


class Forward(_Sampling):
    question: Text = Field(min_length=1, description="The problem.")
    context: Text = Field("", description="The steps so far, as text.")
    full_simulation: bool = Field(False, description="Generate to the end token instead of one step.")
    max_output_length: int | None = Field(None, ge=1, description="Most tokens of prompt and completion together.")


class ValueMessage(_Wire):
    """One message of a conversation the value model scores (checked by ``ValueService``, so
    that a bad message is named ``body.messages.<i>.<j>.content`` rather than by union branch)."""

    role: Text
    content: Text


class ValueForward(_Wire):
    messages: list[dict[str, Any]] | list[list[dict[str, Any]]] = Field(
        description="One conversation (a list of {role, content}) or a list of conversations."
    )


class Message(BaseModel):
    message: str


class ModelStatus(BaseModel):
    """x1's status of the policy or value server."""

    status: str
    allow_training: bool
    stop_training_flag: bool
    allow_inference: bool
    model: str
    model_version: int
    training: dict[str, Any] | None = Field(None, description="Progress of the running or last training run.")


class TokenRecord(BaseModel):
    """One sample as training data: prompt and completion token ids, the prompt masked."""

    tokens: list[int] = Field(description="Prompt then completion token ids.")
    masked_tokens: list[int] = Field(description="The same ids with the prompt's replaced by -100 (not trained).")
    logprobs: list[float] = Field(description="The sampling policy's log-prob of each token (0 for prompt tokens).")
    finish_reason: str
    model_version: int
    prompt_length: int


class Session(BaseModel):
    session_id: str
    nodes: list[TokenRecord] = Field(description="The session's leaves, oldest first.")


class DirectForwardAnswer(BaseModel):
    result: list[str]
    stop_strings: list[str] = Field(description="The stop string each sample ended on ('' when none).")
    finish_reasons: list[str]
    model_version: int
    nonfinite_logits: list[int] | None = Field(
        None, description="With `safe_logits`: how many NaN/inf logits were replaced while each sample was made.")
    records: list[TokenRecord] | None = None
    session_id: str | None = None


class TaskCreated(BaseModel):
    task_id: str


class TaskResult(BaseModel):
    result: list[str]
    prompt: list[str]
    stop_string_found: list[str]
    is_final_step: list[bool]
    model_version: int
    records: list[TokenRecord] | None = None


class TaskPending(BaseModel):
    task_id: str
    status: Literal["pending"]


class ValueAnswer(BaseModel):
    result: list[float]
    model_version: int


# --- OpenAI-compatible ---------------------------------------------------------------------------




"""OpenAI's prompt or stop: one text or a list of them, each valid Unicode."""


































# --- GRPO (the client computes the reward) --------------------------------------------------------






