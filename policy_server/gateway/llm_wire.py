"""Request and response models of the LLM endpoints: x1's field names and defaults, plus the
token-record and session extensions, and the OpenAI-compatible subset."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Strategy = Literal["temperature", "beam_search", "diverse_beam_search"]
SESSION_ID = r"^[A-Za-z0-9_.:-]{1,128}$"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Sampling(_Wire):
    num_samples: int = Field(1, ge=1, description="Samples to generate.")
    temperature: float = Field(0.7, ge=0, le=10, description="Sampling temperature (0: greedy).")
    decoding_strategy: Strategy = Field("temperature", description="temperature, beam_search or diverse_beam_search.")
    safe_logits: bool = Field(False, description="Replace NaN/inf logits (and report how many) instead of failing.")
    seed: int | None = Field(None, description="Seed of the sampler (reproducible samples).")
    return_tokens: bool = Field(False, description="Also answer training-ready token records per sample.")


class DirectForward(_Sampling):
    input_string: str = Field(min_length=1, description="The prompt, as text (no template applied).")
    max_input_length: int = Field(1024, ge=1, description="Most prompt tokens (longer: 422, or `truncate`).")
    max_output_length: int | None = Field(
        None, ge=1, description="Most tokens of prompt and completion together; default max_input_length + 256."
    )
    stop_strings: list[str] | None = Field(None, description="Default: the step and end tokens.")
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
    question: str = Field(min_length=1, description="The problem.")
    context: str = Field("", description="The steps so far, as text.")
    full_simulation: bool = Field(False, description="Generate to the end token instead of one step.")
    max_output_length: int | None = Field(None, ge=1, description="Most tokens of prompt and completion together.")


class ValueForward(_Wire):
    messages: list[dict[str, Any]] | list[list[dict[str, Any]]] = Field(
        description="One conversation (a list of {role, content}) or a list of conversations."
    )


class Status(BaseModel):
    status: str
    allow_training: bool
    stop_training_flag: bool
    allow_inference: bool
    model: str
    model_version: int


class DirectForwardAnswer(BaseModel):
    result: list[str]
    stop_strings: list[str] = Field(description="The stop string each sample ended on ('' when none).")
    finish_reasons: list[str]
    model_version: int
    records: list[dict[str, Any]] | None = None
    session_id: str | None = None


class TaskCreated(BaseModel):
    task_id: str


class TaskResult(BaseModel):
    result: list[str]
    prompt: list[str]
    stop_string_found: list[str]
    is_final_step: list[bool]
    model_version: int
    records: list[dict[str, Any]] | None = None


class TaskPending(BaseModel):
    task_id: str
    status: Literal["pending"]


class ValueAnswer(BaseModel):
    result: list[float]
    model_version: int


# --- OpenAI-compatible ---------------------------------------------------------------------------


class _OpenAI(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, ...)

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class CompletionRequest(_OpenAI):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_OpenAI):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
