"""Request and response models of the OpenAI-compatible routes, as OpenAI's API reference names them
(plus vLLM's extensions ``min_tokens`` and ``return_token_ids``, with vLLM's field names)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from policy_server.fields import Float32, Text, check_text


def _check_texts(value: str | list[str]) -> str | list[str]:
    """``check_text`` on one string or on each of a list. One check after the union, so that a bad
    text is named ``prompt`` (with its index), not once per union member."""
    if isinstance(value, str):
        return check_text(value)
    for i, text in enumerate(value):
        try:
            check_text(text)
        except ValueError as exc:
            raise ValueError(f"item {i}: {exc}") from None
    return value


TextOrTexts = Annotated[str | list[str], AfterValidator(_check_texts)]
Penalty = Annotated[Float32, Field(ge=-2, le=2)]
Bias = Annotated[Float32, Field(ge=-100, le=100)]
SEED_MAX = 2**63 - 1


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field we do not implement is refused, never ignored


class StreamOptions(_Forbid):
    include_usage: bool = False
    """A last chunk with the request's usage and no choices."""


class TextFormat(_Forbid):
    type: Literal["text"]


class JsonObjectFormat(_Forbid):
    type: Literal["json_object"]


class JsonSchema(_Forbid):
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class JsonSchemaFormat(_Forbid):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class _OpenAI(_Forbid):
    """OpenAI's lax types (``"4"`` is 4), but unknown fields refused, numbers finite as float32 and
    texts valid Unicode: they reach the model."""

    model: str | None = Field(None, description="The policy's model id or one of its adapters' (`/v1/models`); none: the policy.")
    n: int = Field(1, ge=1)
    temperature: Float32 = Field(1.0, ge=0, le=2)
    top_p: Float32 = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0, description="vLLM's: no stop ends a completion before this many tokens.")
    stop: TextOrTexts | None = None
    seed: int | None = Field(None, ge=-SEED_MAX - 1, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, Bias] | None = Field(None, description="Token id (as a string) → bias added to its logit.")
    response_format: ResponseFormat | None = None
    return_token_ids: bool = Field(
        True, description="vLLM's: each choice's `token_ids` and the prompt's `prompt_token_ids`."
    )
    skip_special_tokens: bool = Field(
        True, description="vLLM's: leave special tokens (such as the model's end token) out of the text; "
                          "token ids and log-prob tokens keep them.",
    )
    user: str | None = Field(None, description="Accepted and ignored (OpenAI's end-user id).")


class CompletionRequest(_OpenAI):
    prompt: TextOrTexts
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


class ChatMessage(_Forbid):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text


class ChatRequest(_OpenAI):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name of `max_tokens`.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = Field(None, description="vLLM's: for a LoRA adapter (`llm.policy.adapters`), the base model's id.")


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
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: CompletionLogprobs | None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class Completion(_Completion):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


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
    token_ids: list[int] | None = None


class ChatCompletion(_Completion):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    prompt_token_ids: list[int] | None = None


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="The request's field at fault, as the request named it (`messages.0.content`).")
    code: str


class OpenAIError(BaseModel):
    """Every error on `/v1`: OpenAI's shape."""

    error: OpenAIErrorBody
