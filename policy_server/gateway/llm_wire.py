"""Request and response models of the LLM endpoints: x1's field names and defaults, plus the
token-record and session extensions, and the OpenAI-compatible subset.

The bodies that are a domain's own input are that domain's model, under the wire's component name:
``TrainFromDataset`` is ``llm.x1_config.X1TrainingConfig``, ``LoraRequest`` its ``LoraSettings``,
``GRPOStart`` is ``llm.grpo_settings.GRPOSettings``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from policy_server.fields import STRICT, Float32, Text, check_text
from policy_server.llm.grpo_settings import GRPOSettings, StopString
from policy_server.llm.x1_config import LoraSettings, X1TrainingConfig

Strategy = Literal["temperature", "beam_search", "diverse_beam_search"]
SESSION_ID = r"^[A-Za-z0-9_.:-]{1,128}$"


class _Wire(BaseModel):
    """Our own request models: unknown fields refused, JSON types taken strictly ("5" is no int)."""

    model_config = STRICT


class _Sampling(_Wire):
    num_samples: int = Field(1, ge=1, description="Samples to generate.")
    temperature: Float32 = Field(0.7, ge=0, le=10, description="Sampling temperature (0: greedy).")
    decoding_strategy: Strategy = Field("temperature", description="temperature, beam_search or diverse_beam_search.")
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


class LoraRequest(LoraSettings):
    """Train a new LoRA adapter on a policy served without one (merged into the served weights)."""


class TrainFromDataset(X1TrainingConfig):
    """x1's `/train_from_dataset`: PPO for the policy, MSE for the value model."""

    # the same field as X1TrainingConfig's, under the wire's component name
    lora: LoraRequest | None = Field(
        None, description="Policy without an adapter: train a new LoRA adapter instead of every weight. "
        "A policy with an adapter always trains its adapter."
    )


class Message(BaseModel):
    message: str


class Status(BaseModel):
    status: str
    allow_training: bool
    stop_training_flag: bool
    allow_inference: bool
    model: str
    model_version: int
    training: dict[str, Any] | None = Field(None, description="Progress of the running or last training run.")


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


def _check_texts(value: str | list[str]) -> str | list[str]:
    """``check_text`` on one string or on each of a list. One check after the union, so that a bad
    text is named ``body.prompt`` (with its index), not once per union member."""
    if isinstance(value, str):
        return check_text(value)
    for i, text in enumerate(value):
        try:
            check_text(text)
        except ValueError as exc:
            raise ValueError(f"item {i}: {exc}") from None
    return value


TextOrTexts = Annotated[str | list[str], AfterValidator(_check_texts)]
"""OpenAI's prompt or stop: one text or a list of them, each valid Unicode."""


class _OpenAI(BaseModel):
    """OpenAI's leniency (unknown fields ignored, lax types), but numbers still finite as float32
    and texts valid Unicode: both reach the model."""

    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, ...)

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: Float32 = Field(1.0, ge=0, le=2)
    top_p: Float32 = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: TextOrTexts | None = None
    seed: int | None = None
    stream: bool = False


class CompletionRequest(_OpenAI):
    prompt: TextOrTexts
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text


class ChatRequest(_OpenAI):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[OpenAIModel]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Completion(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage
    system_fingerprint: str = Field(description="`policy-server-v<model version>`.")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None


class Completion(_Completion):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[Any]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChatLogprobs | None


class ChatCompletion(_Completion):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]


# --- GRPO (the client computes the reward) --------------------------------------------------------


class GRPOStart(GRPOSettings):
    """A run's settings; every field has a default (see GRPOSettings)."""


class GRPOPrompt(_Wire):
    prompt: Text = Field(min_length=1)


class GRPORewards(_Wire):
    group_id: str = Field(min_length=1, max_length=64)
    rewards: list[Float32] = Field(
        min_length=1, description="One reward per completion of the group, in order: JSON numbers, finite as float32."
    )
