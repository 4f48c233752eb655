"""``OpenAIService``: OpenAI's completions and chat completions on the LLM policy, answered whole or
streamed as server-sent events, with neither HTTP nor Ray. It shares the policy's tokenizer, limits
and backend through ``LLMService``."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from policy_server.errors import FieldError, InvalidRequest, ModelNotFound
from policy_server.gateway.errors import under_body
from policy_server.gateway.llm.service import LLMService
from policy_server.gateway.openai.wire import (
    ChatRequest,
    CompletionRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    ResponseFormat,
)
from policy_server.llm.params import GenerationParams, Sample, SampleChunk, StructuredOutput

T = TypeVar("T")
DEFAULT_MAX_TOKENS = 256  # when the request gives none (capped by the server's limit)
OPENAI_NAMES = {"structured": "response_format", "max_new_tokens": "max_tokens", "num_samples": "n",
                "min_new_tokens": "min_tokens", "stop_strings": "stop", "prompt_logprobs": "echo"}
"""``GenerationParams``' names, as an engine's ``InvalidRequest`` names them, → OpenAI's."""


@dataclass
class Prompt:
    """One prompt of a request: as the client gave it, as token ids, and how to continue it."""

    text: str
    ids: list[int]
    params: GenerationParams


@dataclass
class _Answer:
    """What one request's answer (or stream) needs besides its samples."""

    kind: str
    id: str
    model: str
    """The model id the request named (the policy's when it named none)."""
    created: int = field(default_factory=lambda: int(time.time()))


class OpenAIService:
    def __init__(self, llm: LLMService) -> None:
        self.llm = llm
        self.spec = llm.spec

    # --- models -------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """The policy, then each of its adapters (``parent``: the policy), as OpenAI's model objects."""
        base = self.spec.model_id
        return [{"id": model_id, "object": "model", "created": 0, "owned_by": "policy-server",
                 "parent": None if model_id == base else base}
                for model_id in (base, *self.spec.adapters)]

    def model(self, model_id: str, field: str = "model") -> dict[str, Any]:
        """The model object of ``model_id``; ``ModelNotFound`` naming ``field`` (OpenAI's ``param``)
        for an id this server does not serve."""
        for model in self.models():
            if model["id"] == model_id:
                return model
        served = ", ".join(repr(m) for m in (self.spec.model_id, *self.spec.adapters))
        message = f"the model {model_id!r} does not exist; this server serves {served}"
        raise ModelNotFound(message, [FieldError(field, message)])

    def _adapter(self, model_id: str | None) -> str | None:
        """The adapter a request's ``model`` names (None: the policy itself); ``ModelNotFound`` for another id."""
        if model_id is None:
            return None
        self.model(model_id, "body.model")
        return model_id if model_id in self.spec.adapters else None

    # --- requests → prompts -------------------------------------------------------------------

    def completion_prompts(self, body: CompletionRequest) -> list[Prompt]:
        """The request's prompts with their parameters; ``InvalidRequest``/``NotFound`` before anything runs."""
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise InvalidRequest.at("body.prompt", "give at least one prompt")
        top = body.logprobs or 0
        prompts = []
        for i, text in enumerate(texts):
            where = f"body.prompt.{i}" if len(texts) > 1 else "body.prompt"
            ids = self.llm.prompt_ids(text, self.llm.limits.max_input_length, False, where)
            params = self._params(body, len(ids), body.max_tokens, "body.max_tokens", top,
                                  body.echo and body.logprobs is not None)
            prompts.append(Prompt(text, ids, params))
        return prompts

    def chat_prompt(self, body: ChatRequest) -> Prompt:
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequest.at("body.top_logprobs", "needs logprobs: true")
        text = self.llm.chat_prompt([m.model_dump() for m in body.messages])
        ids = self.llm.prompt_ids(text, self.llm.limits.max_input_length, False, "body.messages", special=False)
        given, name = ((body.max_completion_tokens, "body.max_completion_tokens") if body.max_completion_tokens
                       else (body.max_tokens, "body.max_tokens"))
        top = (body.top_logprobs or 0) if body.logprobs else 0
        return Prompt(text, ids, self._params(body, len(ids), given, name, top, False))

    def _params(
        self, body: CompletionRequest | ChatRequest, prompt_len: int, max_tokens: int | None, length_field: str,
        top_logprobs: int, prompt_logprobs: bool,
    ) -> GenerationParams:
        adapter = self._adapter(body.model)
        new_tokens = max_tokens or min(self.llm.limits.max_new_tokens, DEFAULT_MAX_TOKENS)
        if body.min_tokens > new_tokens:
            raise InvalidRequest.at("body.min_tokens", f"at most the completion's length ({new_tokens})")
        return self.llm.params(
            prompt_len, new_tokens, body.n, self._stops(body.stop), ("body.n", length_field),
            temperature=body.temperature, top_p=body.top_p, seed=body.seed, min_new_tokens=body.min_tokens,
            top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            logit_bias=self._logit_bias(body.logit_bias or {}), structured=_structured(body.response_format),
            adapter=adapter,
        )

    def _stops(self, stop: str | list[str] | None) -> tuple[str, ...]:
        """OpenAI's ``stop`` (string or list, none empty); none given: the model's end token."""
        if stop is None:
            return (self.spec.end_token,)
        if isinstance(stop, str):
            if not stop:
                raise InvalidRequest.at("body.stop", "empty: give a non-empty stop string")
            return self.llm.stop_strings([stop], "body.stop")  # one string: its index is no part of its name
        return self.llm.stop_strings(stop, "body.stop")

    def _logit_bias(self, bias: dict[str, float]) -> tuple[tuple[int, float], ...]:
        vocab = len(self.llm.tokenizer)
        bad = [FieldError(f"body.logit_bias.{key}", f"not a token id (an integer in [0, {vocab}))")
               for key in bias if not key.isdigit() or int(key) >= vocab]
        if bad:
            raise InvalidRequest(f"{bad[0].field}: {bad[0].message}", bad)
        return tuple((int(key), value) for key, value in bias.items())

    # --- whole answers ------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, prompts: list[Prompt]) -> dict[str, Any]:
        outs = await _named(asyncio.gather(*(self.llm.require_backend().generate(p.ids, p.params) for p in prompts)))
        choices = []
        for prompt, (samples, _) in zip(prompts, outs):
            for sample in samples:
                completion = _before_stop(self.llm.decode(sample.completion_ids, body.skip_special_tokens),
                                          sample.stop_string)
                choice: dict[str, Any] = {
                    "index": len(choices),
                    "text": (prompt.text + completion) if body.echo else completion,
                    "finish_reason": sample.finish_reason,
                    "logprobs": self._completion_logprobs(prompt, sample, body) if body.logprobs is not None else None,
                }
                if body.return_token_ids:
                    choice |= {"token_ids": sample.completion_ids, "prompt_token_ids": prompt.ids}
                choices.append(choice)
        samples = [s for group, _ in outs for s in group]
        answer = self._answer("text_completion", "cmpl", body)
        return self._whole(answer, choices, sum(len(p.ids) for p in prompts), samples, max(v for _, v in outs))

    async def chat(self, body: ChatRequest, prompt: Prompt) -> dict[str, Any]:
        samples, version = await _named(self.llm.require_backend().generate(prompt.ids, prompt.params))
        choices = []
        for i, sample in enumerate(samples):
            content = _before_stop(self.llm.decode(sample.completion_ids, body.skip_special_tokens), sample.stop_string)
            choice: dict[str, Any] = {
                "index": i,
                "message": {"role": "assistant", "content": content},
                "finish_reason": sample.finish_reason,
                "logprobs": {"content": self._chat_logprobs(sample.completion_ids, sample.log_probs, sample.top_logprobs, body.top_logprobs or 0)}
                if body.logprobs else None,
            }
            if body.return_token_ids:
                choice["token_ids"] = sample.completion_ids
            choices.append(choice)
        answer = self._whole(self._answer("chat.completion", "chatcmpl", body), choices, len(prompt.ids),
                             samples, version)
        return answer | ({"prompt_token_ids": prompt.ids} if body.return_token_ids else {})

    def _answer(self, kind: str, prefix: str, body: CompletionRequest | ChatRequest) -> _Answer:
        return _Answer(kind, f"{prefix}-{uuid.uuid4().hex}", body.model or self.spec.model_id)

    def _whole(self, answer: _Answer, choices: list[dict[str, Any]], prompt_tokens: int, samples: list[Sample],
               version: int) -> dict[str, Any]:
        return self._head(answer, version) | {
            "choices": choices, "usage": _usage(prompt_tokens, sum(len(s.completion_ids) for s in samples)),
        }

    def _head(self, answer: _Answer, version: int) -> dict[str, Any]:
        return {"id": answer.id, "object": answer.kind, "created": answer.created, "model": answer.model,
                "system_fingerprint": f"policy-server-v{version}"}

    # --- log-probs ----------------------------------------------------------------------------

    def _token(self, token_id: int) -> str:
        return self.llm.decode([token_id], skip_special_tokens=False)

    def _top(self, top: dict[int, float] | None) -> dict[str, float] | None:
        return None if top is None else {self._token(t): lp for t, lp in top.items()}

    def _offsets(self, ids: Sequence[int], start: int, skip_special: bool, before: Sequence[int] = ()) -> list[int]:
        """Where each token's text starts in the answer's text: ``start`` + the length of the text
        of the tokens before it (``before``: the same choice's earlier tokens)."""
        prefix = list(before)
        offsets = []
        for token in ids:
            offsets.append(start + len(self.llm.decode(prefix, skip_special)))
            prefix.append(token)
        return offsets

    def _completion_logprobs(self, prompt: Prompt, sample: Sample, body: CompletionRequest) -> dict[str, Any]:
        """OpenAI's completion logprobs; with echo the prompt's tokens come first (the first with
        no log-prob and no alternatives)."""
        echoed = self._echo_logprobs(prompt, sample) if body.echo else None
        tokens, logprobs, tops, offsets = (
            [echoed[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")] if echoed
            else ([], [], [], []))
        start = len(prompt.text) if body.echo else 0
        top = sample.top_logprobs or [None] * len(sample.completion_ids)
        tokens += [self._token(t) for t in sample.completion_ids]
        logprobs += sample.log_probs
        tops += [self._top(t) for t in top]
        offsets += self._offsets(sample.completion_ids, start, body.skip_special_tokens)
        return {"tokens": tokens, "token_logprobs": logprobs,
                "top_logprobs": tops if sample.top_logprobs is not None or body.echo else None, "text_offset": offsets}

    def _echo_logprobs(self, prompt: Prompt, sample: Sample) -> dict[str, Any]:
        """OpenAI's completion logprobs of an echoed prompt: the first token with no log-prob, each
        other token's ``logprobs`` most likely alternatives (then itself if it is not among them; itself
        alone for ``logprobs: 0``), offsets from the start of the prompt's text."""
        lps = sample.prompt_logprobs or [None] * len(prompt.ids)
        tokens = [self._token(t) for t in prompt.ids]
        tops = sample.prompt_top_logprobs or [None if lp is None else {t: lp} for t, lp in zip(prompt.ids, lps)]
        return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": [self._top(t) for t in tops],
                "text_offset": self._offsets(prompt.ids, 0, True)}

    async def _echo_events(self, answer: _Answer, body: CompletionRequest, prompts: list[Prompt]) -> AsyncIterator[dict[str, Any]]:
        """A stream's first chunk per choice with echo and logprobs: the prompt's text and log-probs
        (as the whole answer gives them), from a one-token request of the same prompt and model."""
        for which, prompt in enumerate(prompts):
            one = replace(prompt.params, num_samples=1, max_new_tokens=1, min_new_tokens=0, temperature=0.0,
                          prompt_logprobs=True, structured=None, seed=None)
            (sample, *_), version = await _named(self.llm.require_backend().generate(prompt.ids, one))
            logprobs = self._echo_logprobs(prompt, sample)
            for i in range(body.n):
                choice = {"index": which * body.n + i, "text": prompt.text, "finish_reason": None, "logprobs": logprobs}
                yield self._head(answer, version) | {"choices": [choice]}

    def _chat_logprobs(
        self, ids: list[int], logprobs: list[float], tops: list[dict[int, float]] | None, k: int
    ) -> list[dict[str, Any]]:
        """OpenAI's chat logprobs: per token, its ``k`` most likely alternatives (the engines add
        the chosen token to them, as vLLM does; chat leaves it out unless it is among them)."""

        def best(top: dict[int, float] | None) -> list[tuple[int, float]]:
            return sorted((top or {}).items(), key=lambda item: -item[1])[:k]

        def entry(token_id: int, lp: float) -> dict[str, Any]:
            token = self._token(token_id)
            return {"token": token, "logprob": lp, "bytes": list(token.encode())}

        return [
            entry(t, lp) | {"top_logprobs": [entry(a, alp) for a, alp in best(top)]}
            for t, lp, top in zip(ids, logprobs, tops or [None] * len(ids))
        ]

    # --- streams ------------------------------------------------------------------------------

    async def completion_events(self, body: CompletionRequest, prompts: list[Prompt]) -> AsyncIterator[dict[str, Any]]:
        """OpenAI's ``text_completion`` chunks (then the usage chunk, if asked for)."""
        answer = self._answer("text_completion", "cmpl", body)
        n = body.n
        texts: dict[int, _TextStream] = {}
        echoed = body.echo and body.logprobs is not None  # the prompt goes first, in chunks of its own
        if echoed:
            async for event in self._echo_events(answer, body, prompts):
                yield event
        streams = [self.llm.stream(p.ids, replace(p.params, prompt_logprobs=False)) for p in prompts]
        async for which, chunk in _merged([_named_stream(s) for s in streams]):
            prompt, index = prompts[which], which * n + chunk.index
            first = index not in texts
            text = texts.setdefault(index, _TextStream(self.llm, prompt.params, body.skip_special_tokens))
            offsets = (self._offsets(chunk.token_ids, len(prompt.text) if body.echo else 0, body.skip_special_tokens, text.ids)
                       if body.logprobs is not None else [])
            delta = text.add(chunk)
            choice: dict[str, Any] = {
                "index": index,
                "text": (prompt.text + delta) if body.echo and first and not echoed else delta,
                "finish_reason": chunk.finish_reason,
                "logprobs": {
                    "tokens": [self._token(t) for t in chunk.token_ids], "token_logprobs": chunk.log_probs,
                    "top_logprobs": [self._top(t) for t in chunk.top_logprobs] if chunk.top_logprobs is not None else None,
                    "text_offset": offsets,
                } if body.logprobs is not None else None,
            }
            if body.return_token_ids:
                choice["token_ids"] = chunk.token_ids
                if first:
                    choice["prompt_token_ids"] = prompt.ids
            yield self._head(answer, chunk.model_version) | {"choices": [choice]}
        if body.stream_options is not None and body.stream_options.include_usage:
            used = sum(len(t.ids) for t in texts.values())
            yield self._head(answer, 0) | {"choices": [], "usage": _usage(sum(len(p.ids) for p in prompts), used)}

    async def chat_events(self, body: ChatRequest, prompt: Prompt) -> AsyncIterator[dict[str, Any]]:
        """OpenAI's ``chat.completion.chunk`` chunks (then the usage chunk, if asked for)."""
        answer = self._answer("chat.completion.chunk", "chatcmpl", body)
        texts: dict[int, _TextStream] = {}
        async for _, chunk in _merged([_named_stream(self.llm.stream(prompt.ids, prompt.params))]):
            first = chunk.index not in texts
            text = texts.setdefault(chunk.index, _TextStream(self.llm, prompt.params, body.skip_special_tokens))
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            delta["content"] = text.add(chunk)
            choice: dict[str, Any] = {
                "index": chunk.index, "delta": delta, "finish_reason": chunk.finish_reason,
                "logprobs": {"content": self._chat_logprobs(chunk.token_ids, chunk.log_probs, chunk.top_logprobs, body.top_logprobs or 0)}
                if body.logprobs else None,
            }
            head = self._head(answer, chunk.model_version)
            if body.return_token_ids:
                choice["token_ids"] = chunk.token_ids
                if first:
                    head["prompt_token_ids"] = prompt.ids
            yield head | {"choices": [choice]}
        if body.stream_options is not None and body.stream_options.include_usage:
            used = sum(len(t.ids) for t in texts.values())
            yield self._head(answer, 0) | {"choices": [], "usage": _usage(len(prompt.ids), used)}


class _TextStream:
    """One choice's text as its tokens arrive. What it hands out is final: it holds back the end of
    the text while that could still become a stop string (OpenAI leaves stop strings out of the
    answer) or is half a UTF-8 character."""

    def __init__(self, llm: LLMService, params: GenerationParams, skip_special: bool) -> None:
        self.llm, self.skip_special = llm, skip_special
        self.stops = (*(params.stop_strings or ()), llm.spec.end_token)
        self.ids: list[int] = []
        self.sent = 0

    def add(self, chunk: SampleChunk) -> str:
        """The text that ``chunk`` makes final."""
        self.ids += chunk.token_ids
        text = self.llm.decode(self.ids, self.skip_special)
        if chunk.finish_reason is not None:
            ready = len(_before_stop(text, chunk.stop_string))
        else:
            ready = len(text.rstrip("\ufffd")) - self._partial_stop(text)
        out = text[self.sent:ready]
        self.sent = max(self.sent, ready)
        return out

    def _partial_stop(self, text: str) -> int:
        """The length of the longest end of ``text`` that begins a stop string."""
        return max((k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)


async def _merged(streams: list[AsyncIterator[T]]) -> AsyncGenerator[tuple[int, T], None]:
    """The items of several streams as they come, each with its stream's index. Closing this
    (a client that disconnected) cancels every stream's task, which closes the stream."""
    queue: asyncio.Queue[tuple[int, T | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            await queue.put((i, exc))
            return
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _openai_named(exc: InvalidRequest) -> InvalidRequest:
    """An engine's refusal, its fields named as the request named them (``body.response_format``)."""
    return under_body(exc, OPENAI_NAMES)


async def _named(pending: Awaitable[T]) -> T:
    try:
        return await pending
    except InvalidRequest as exc:
        raise _openai_named(exc) from exc


async def _named_stream(chunks: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    try:
        async for chunk in chunks:
            yield chunk
    except InvalidRequest as exc:
        raise _openai_named(exc) from exc
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


def _structured(fmt: ResponseFormat | None) -> StructuredOutput | None:
    if isinstance(fmt, JsonObjectFormat):
        return StructuredOutput("json_object")
    if isinstance(fmt, JsonSchemaFormat):
        return StructuredOutput("json_schema", json.dumps(fmt.json_schema.schema_))
    return None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _before_stop(text: str, stop_string: str | None) -> str:
    """OpenAI leaves the stop sequence out of the answer."""
    if stop_string and stop_string in text:
        return text[: text.index(stop_string)]
    return text

