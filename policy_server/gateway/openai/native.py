"""vLLM's native ``POST /generate`` (its demo API server's, as RL trainers call it: Atropos's
``VLLMServer``): a prompt as text or token ids and vLLM's sampling parameters; per completion its
text, finish reason, token ids and, with ``logprobs: k``, per token ``{token_id: logprob}`` of the
sampled token first, then the k most likely."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from policy_server.errors import FieldError, InvalidRequest
from policy_server.fields import STRICT, Float32, Text
from policy_server.gateway.auth import Auth
from policy_server.gateway.llm.service import LLMService
from policy_server.gateway.openai.wire import SEED_MAX, Penalty, TextOrTexts
from policy_server.gateway.openapi import error_docs
from policy_server.llm.params import Sample

DEFAULT_MAX_TOKENS = 16  # vLLM's SamplingParams default


class TokenPrompt(BaseModel):
    model_config = STRICT

    prompt_token_ids: list[int] = Field(min_length=1)


class GenerateRequest(BaseModel):
    """vLLM's ``SamplingParams`` fields that the engines implement; another field is refused, and
    JSON types are taken strictly, as on our own routes (`"stream": 0` is no boolean)."""

    model_config = STRICT

    prompt: Text | TokenPrompt
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=1)
    min_tokens: int = Field(0, ge=0)
    temperature: Float32 = Field(1.0, ge=0, le=2)  # vLLM's own bounds
    top_p: Float32 = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=-SEED_MAX - 1, le=SEED_MAX)
    stop: TextOrTexts | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logprobs: int | None = Field(None, ge=0, le=20, description="Per token the sampled token's and the k most likely.")
    stream: bool = Field(False, description="Only `false`: answers come whole.")


class GenerateAnswer(BaseModel):
    text: list[str]
    prompt: str
    finish_reasons: list[str]
    logprobs: list[list[list[dict[str, float]]]] | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[list[int]] | None = None


def native_router(llm: LLMService, auth: Auth, prefix: str) -> APIRouter:
    router = APIRouter(prefix=prefix, tags=["vLLM-native"], dependencies=[Depends(auth)], responses=error_docs({
        401: "Missing or wrong api key: send `Authorization: Bearer <key>`.",
        422: "Invalid request: the envelope names each bad field.",
        429: "Too much work queued: retry after `Retry-After` seconds.",
        500: "The model failed.",
        503: "The model's deployment is not available.",
    }))

    @router.post("/generate", response_model=GenerateAnswer, response_model_exclude_none=True)
    async def generate(body: GenerateRequest) -> Any:
        """vLLM's native generate: `prompt` (text or `{"prompt_token_ids": [...]}`), `n`, `max_tokens`,
        `temperature`, `logprobs`, ... → `text`, `finish_reasons`, and with `logprobs` the tokens."""
        return await _generate(llm, body)

    return router


async def _generate(llm: LLMService, body: GenerateRequest) -> dict[str, Any]:
    if body.stream:
        raise InvalidRequest.at("body.stream", "not streamed here; send stream=false (or use /v1 with stream=true)")
    prompt_text, ids = _prompt(llm, body.prompt)
    stop = (body.stop,) if isinstance(body.stop, str) else body.stop
    stops = llm.stop_strings(list(stop), "body.stop") if stop else (llm.spec.end_token,)
    max_tokens = body.max_tokens or llm.limits.max_new_tokens
    if body.min_tokens > max_tokens:
        raise InvalidRequest.at("body.min_tokens", f"at most max_tokens ({max_tokens})")
    params = llm.params(
        len(ids), max_tokens, body.n, stops, ("body.n", "body.max_tokens"), temperature=body.temperature,
        top_p=body.top_p, seed=body.seed, min_new_tokens=body.min_tokens, top_logprobs=body.logprobs or 0,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
    )
    samples, _ = await llm.require_backend().generate(ids, params)
    answer: dict[str, Any] = {
        "text": [llm.decode(s.completion_ids) for s in samples],
        "prompt": prompt_text,
        "finish_reasons": [s.finish_reason for s in samples],
    }
    if body.logprobs is not None or not isinstance(body.prompt, str):  # a trainer's call: the tokens
        answer |= {"prompt_token_ids": ids, "token_ids": [s.completion_ids for s in samples]}
    if body.logprobs is not None:
        answer["logprobs"] = [_token_logprobs(s, body.logprobs) for s in samples]
    return answer


def _prompt(llm: LLMService, prompt: str | TokenPrompt) -> tuple[str, list[int]]:
    """The prompt's text and token ids (ids checked against the vocabulary and the length limit)."""
    if isinstance(prompt, str):
        return prompt, llm.prompt_ids(prompt, llm.limits.max_input_length, False, "body.prompt")
    ids, vocab = prompt.prompt_token_ids, len(llm.tokenizer)
    bad = [FieldError(f"body.prompt.prompt_token_ids.{i}", f"not a token id in [0, {vocab})")
           for i, t in enumerate(ids) if not 0 <= t < vocab]
    if bad:
        raise InvalidRequest(f"{bad[0].field}: {bad[0].message}", bad)
    if len(ids) > llm.limits.max_input_length:
        raise InvalidRequest.at(
            "body.prompt.prompt_token_ids", f"{len(ids)} tokens, more than max_input_length {llm.limits.max_input_length}"
        )
    return llm.decode(ids, skip_special_tokens=False), ids


def _token_logprobs(sample: Sample, k: int) -> list[list[dict[str, float]]]:
    """Per token ``[{sampled id: logprob, then up to k alternatives}]`` (vLLM's demo server's shape;
    JSON keys are strings)."""
    tops = sample.top_logprobs or [{} for _ in sample.completion_ids]
    out = []
    for token, lp, top in zip(sample.completion_ids, sample.log_probs, tops):
        entry = {str(token): lp}
        for alt, alt_lp in list(top.items())[:k]:
            entry.setdefault(str(alt), alt_lp)
        out.append([entry])
    return out
