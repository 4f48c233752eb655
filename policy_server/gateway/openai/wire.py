"""Request and response models of the OpenAI-compatible routes, as OpenAI's API reference names them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from policy_server.fields import Float32, Text, check_text


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
