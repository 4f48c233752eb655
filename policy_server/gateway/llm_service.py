"""``LLMService`` and ``ValueService``: the LLM endpoints with neither HTTP nor Ray.

The gateway tokenises (it loads only the tokenizer): it checks lengths and stop strings before
anything is queued, builds x1's step prompts and chat prompts, tracks sessions and queued tasks,
and sends token ids to a backend, the Serve deployment or an in-process engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import TypeAdapter, ValidationError

from policy_server.errors import (
    BackendUnavailable,
    FieldError,
    InvalidRequest,
    ModelError,
    NotFound,
    PolicyServerError,
    summary,
)
from policy_server.fields import field_errors
from policy_server.gateway.llm_wire import (
    ChatRequest,
    CompletionRequest,
    DirectForward,
    Forward,
    ValueMessage,
)
from policy_server.llm.generation import GenerationParams, Sample
from policy_server.llm.records import record_from_sample
from policy_server.llm.state import LLMState
from policy_server.schema.llm import LLMPolicySpec, LLMValueSpec

log = logging.getLogger(__name__)

_CONVERSATION = TypeAdapter(list[ValueMessage])


class LLMBackend(Protocol):
    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> tuple[list[Sample], int]: ...

    async def version(self) -> int: ...


class StateLink(Protocol):
    async def call(self, method: str, *args: Any) -> Any: ...


class LocalState:
    """``LLMState`` in the gateway's process (the local backend)."""

    def __init__(self, state: LLMState) -> None:
        self.state = state

    async def call(self, method: str, *args: Any) -> Any:
        result = getattr(self.state, method)(*args)
        return await result if asyncio.iscoroutine(result) else result


class ThreadLink:
    """A plain object with blocking methods, called in a worker thread (the local backend)."""

    def __init__(self, target: Any) -> None:
        self.target = target

    async def call(self, method: str, *args: Any) -> Any:
        return await asyncio.to_thread(getattr(self.target, method), *args)


class Remote:
    """An object of ours reached through a link (a deployment's handle, or a worker thread):
    the GRPO runs, and x1's trainers."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.link: StateLink | None = None

    def attach(self, link: StateLink) -> None:
        self.link = link

    async def call(self, method: str, *args: Any) -> Any:
        if self.link is None:
            raise BackendUnavailable(f"{self.what} is still starting; retry shortly")
        return await self.link.call(method, *args)


class ValueBackend(Protocol):
    async def score(self, conversations: list[list[dict[str, str]]]) -> tuple[list[float], int]: ...

    async def version(self) -> int: ...


class HandleBackend:
    """A Serve deployment, reached through its handle; our own errors come back as themselves."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def call(self, method: str, *args: Any) -> Any:
        from ray import exceptions as ray_errors

        try:
            return await self.handle.options(method_name=method).remote(*args)
        except ray_errors.RayTaskError as exc:
            cause = exc.cause if exc.cause is not None else exc
            if isinstance(cause, PolicyServerError):
                raise cause from None
            raise ModelError(f"the model raised {type(cause).__name__}: {summary(cause)}") from exc
        except ray_errors.RayError as exc:
            raise BackendUnavailable(f"the LLM deployment is unavailable: {summary(exc)}") from exc

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> tuple[list[Sample], int]:
        return await self.call("generate", prompt_ids, params)

    async def score(self, conversations: list[list[dict[str, str]]]) -> tuple[list[float], int]:
        return await self.call("score", conversations)

    async def version(self) -> int:
        return await self.call("version")


class HandleState(HandleBackend):
    """The state deployment (tasks and sessions), whose one entry point is ``call``."""

    async def call(self, method: str, *args: Any) -> Any:
        return await super().call("call", method, *args)


class LocalBackend:
    """An engine in the gateway's process (development and tests without Ray)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> tuple[list[Sample], int]:
        try:
            return await self.engine.generate(prompt_ids, params)
        except PolicyServerError:
            raise
        except Exception as exc:
            raise ModelError(f"the model raised {type(exc).__name__}: {summary(exc)}") from exc

    async def score(self, conversations: list[list[dict[str, str]]]) -> tuple[list[float], int]:
        try:
            return await self.engine.score(conversations)
        except PolicyServerError:
            raise
        except ValueError as exc:
            raise InvalidRequest.at("body.messages", str(exc)) from exc

    async def version(self) -> int:
        return self.engine.version


@dataclass
class Generated:
    """One request's samples with their texts, ready for any of the answer formats."""

    prompt_ids: list[int]
    samples: list[Sample]
    texts: list[str]
    version: int


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class LLMService:
    def __init__(self, spec: LLMPolicySpec, tokenizer: Any) -> None:
        self.spec, self.tokenizer = spec, tokenizer
        self.limits = spec.limits
        self.backend: LLMBackend | None = None
        self.state: StateLink | None = None

    def attach(self, backend: LLMBackend, state: StateLink) -> None:
        self.backend, self.state = backend, state

    def new_state(self, generate: Any) -> LLMState:
        """The tasks and sessions of this model, generating through ``generate``."""
        return LLMState(self.tokenizer, generate, self.spec.end_token, self.limits.task_ttl_s, 4 * self.limits.max_queued)

    async def call_state(self, method: str, *args: Any) -> Any:
        if self.state is None:
            raise BackendUnavailable("the LLM policy is still starting; retry shortly")
        return await self.state.call(method, *args)

    def require_backend(self) -> LLMBackend:
        if self.backend is None:
            raise BackendUnavailable("the LLM policy is still starting; retry shortly")
        return self.backend

    # --- text and tokens ------------------------------------------------------------------------

    def encode(self, text: str, special: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages: list[dict[str, str]], continuation: str = "") -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template error is the request's fault
            raise InvalidRequest.at("body.messages", f"cannot apply the chat template: {summary(exc)}") from exc
        return text + continuation

    def stop_strings(self, given: list[str] | str | None, field: str) -> tuple[str, ...]:
        """The request's stop strings, each one the tokenizer can represent (else a 422)."""
        if given is None:
            return (self.spec.step_token, self.spec.end_token)
        stops = (given,) if isinstance(given, str) else tuple(given)
        bad = [
            FieldError(f"{field}.{i}", "empty" if not s else "the tokenizer cannot represent it")
            for i, s in enumerate(stops)
            if not s or self.decode(self.encode(s, special=False), skip_special_tokens=False) != s
        ]
        if bad:
            raise InvalidRequest(f"{bad[0].field}: {bad[0].message}", bad)
        return stops

    def prompt_ids(self, text: str, max_input_length: int, truncate: bool, field: str, special: bool = True) -> list[int]:
        if max_input_length > self.limits.max_input_length:
            raise InvalidRequest.at(
                "body.max_input_length", f"at most {self.limits.max_input_length}, got {max_input_length}"
            )
        ids = self.encode(text, special)
        if not ids:
            raise InvalidRequest.at(field, "the prompt has no tokens: send some text")
        if len(ids) > max_input_length:
            if not truncate:
                raise InvalidRequest(
                    f"{field}: the prompt has {len(ids)} tokens, more than max_input_length {max_input_length} "
                    "(send truncate=true to keep its end)",
                    [FieldError(field, f"{len(ids)} tokens > {max_input_length}")],
                )
            ids = ids[-max_input_length:]
        return ids

    def params(
        self, prompt_len: int, max_new_tokens: int, num_samples: int, stop: tuple[str, ...],
        names: tuple[str, str] = ("body.num_samples", "body.max_output_length"), **kw: Any,
    ) -> GenerationParams:
        """Generation parameters within the server's limits; ``names`` are the request's fields for
        the number of samples and the length (x1's or OpenAI's), named by a 422."""
        samples_field, length_field = names
        if num_samples > self.limits.max_num_samples:
            raise InvalidRequest.at(samples_field, f"at most {self.limits.max_num_samples}, got {num_samples}")
        if max_new_tokens < 1:
            raise InvalidRequest.at(
                length_field, f"the prompt already has {prompt_len} tokens; nothing is left to generate"
            )
        if max_new_tokens > self.limits.max_new_tokens:
            raise InvalidRequest.at(
                length_field, f"at most {self.limits.max_new_tokens} new tokens, asked for {max_new_tokens}"
            )
        return GenerationParams(num_samples=num_samples, max_new_tokens=max_new_tokens, stop_strings=stop, **kw)

    async def generate(self, prompt_ids: list[int], params: GenerationParams, skip_special: bool = True) -> Generated:
        samples, version = await self.require_backend().generate(prompt_ids, params)
        texts = [self.decode(s.completion_ids, skip_special) for s in samples]
        return Generated(prompt_ids, samples, texts, version)

    # --- x1 -----------------------------------------------------------------------------------

    async def direct_forward(self, body: DirectForward) -> dict[str, Any]:
        stops = self.stop_strings(body.stop_strings, "body.stop_strings")
        prompt = self.prompt_ids(body.input_string, body.max_input_length, body.truncate, "body.input_string")
        parent = None
        if body.session_id is not None:
            prompt, parent = await self.call_state("session_prompt", body.session_id, body.session_mode, body.input_string)
        # x1's default (max_input_length + 256 in all) is capped by the server's limit; an explicit
        # max_output_length beyond it is refused
        new_tokens = (
            body.max_output_length - len(prompt) if body.max_output_length
            else min(body.max_input_length + 256 - len(prompt), self.limits.max_new_tokens)
        )
        params = self.params(
            len(prompt), new_tokens, body.num_samples, stops, temperature=body.temperature,
            strategy=body.decoding_strategy, safe_logits=body.safe_logits, seed=body.seed,
            min_new_tokens=min(body.min_new_tokens, max(new_tokens, 0)),
        )
        out = await self.generate(prompt, params, body.skip_special_tokens)
        if body.session_id is not None:
            await self.call_state(
                "session_add", body.session_id, body.session_mode, parent, body.input_string, out.samples, out.version
            )
        return {
            "result": out.texts,
            "stop_strings": [s.stop_string or "" for s in out.samples],
            "finish_reasons": [s.finish_reason for s in out.samples],
            "model_version": out.version,
            "records": [record_from_sample(s, out.version).to_dict() for s in out.samples] if body.return_tokens else None,
            "session_id": body.session_id,
        }

    def step_prompt(self, body: Forward) -> str:
        return self.chat_prompt([{"role": "user", "content": body.question}], continuation=body.context)

    async def submit_task(self, body: Forward) -> str:
        """Queue x1's `/forward`: one step (or the whole answer) for a question and its context."""
        text = self.step_prompt(body)
        prompt = self.prompt_ids(text, self.limits.max_input_length, False, "body.question", special=False)
        stops = (self.spec.end_token,) if body.full_simulation else (self.spec.step_token, self.spec.end_token)
        total = body.max_output_length or len(prompt) + self.limits.max_new_tokens
        params = self.params(
            len(prompt), min(total - len(prompt), self.limits.max_new_tokens), body.num_samples, stops,
            temperature=body.temperature, strategy=body.decoding_strategy, safe_logits=body.safe_logits,
            seed=body.seed,
        )
        return await self.call_state("start_task", text, prompt, params, body.return_tokens)

    # --- OpenAI ---------------------------------------------------------------------------------

    def _openai_params(self, body: CompletionRequest | ChatRequest, prompt_len: int) -> GenerationParams:
        if body.model is not None and body.model != self.spec.model_id:
            raise NotFound(f"body.model: no model {body.model!r}; this server serves {self.spec.model_id!r}")
        stops = self.stop_strings(body.stop, "body.stop") if body.stop else (self.spec.end_token,)
        max_tokens = body.max_tokens or min(self.limits.max_new_tokens, 256)
        return self.params(
            prompt_len, max_tokens, body.n, stops, ("body.n", "body.max_tokens"),
            temperature=body.temperature, top_p=body.top_p, seed=body.seed,
        )

    async def completions(self, body: CompletionRequest) -> dict[str, Any]:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise InvalidRequest.at("body.prompt", "give at least one prompt")
        outs = []
        for i, text in enumerate(prompts):
            ids = self.prompt_ids(text, self.limits.max_input_length, False, f"body.prompt.{i}" if len(prompts) > 1 else "body.prompt")
            outs.append((text, ids, self._openai_params(body, len(ids))))
        generated = await asyncio.gather(*(self.generate(ids, params, False) for _, ids, params in outs))
        choices = []
        for (text, _, _), out in zip(outs, generated):
            for sample, raw in zip(out.samples, out.texts):
                completion = _before_stop(raw, sample)
                choice: dict[str, Any] = {
                    "index": len(choices),
                    "text": (text + completion) if body.echo else completion,
                    "finish_reason": sample.finish_reason,
                    "logprobs": self._completion_logprobs(sample) if body.logprobs is not None else None,
                }
                choices.append(choice)
        return self._openai_answer("text_completion", "cmpl", choices, generated)

    async def chat(self, body: ChatRequest) -> dict[str, Any]:
        text = self.chat_prompt([m.model_dump() for m in body.messages])
        ids = self.prompt_ids(text, self.limits.max_input_length, False, "body.messages", special=False)
        out = await self.generate(ids, self._openai_params(body, len(ids)))  # special tokens left out
        choices = []
        for i, (sample, text) in enumerate(zip(out.samples, out.texts)):
            content = _before_stop(text, sample)
            choices.append({
                "index": i,
                "message": {"role": "assistant", "content": content},
                "finish_reason": sample.finish_reason,
                "logprobs": {"content": self._chat_logprobs(sample)} if body.logprobs else None,
            })
        return self._openai_answer("chat.completion", "chatcmpl", choices, [out])

    def _tokens(self, sample: Sample) -> list[str]:
        return [self.decode([t], skip_special_tokens=False) for t in sample.completion_ids]

    def _completion_logprobs(self, sample: Sample) -> dict[str, Any]:
        tokens = self._tokens(sample)
        offsets, at = [], 0
        for tok in tokens:
            offsets.append(at)
            at += len(tok)
        return {"tokens": tokens, "token_logprobs": list(sample.logprobs), "top_logprobs": None, "text_offset": offsets}

    def _chat_logprobs(self, sample: Sample) -> list[dict[str, Any]]:
        return [
            {"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": []}
            for tok, lp in zip(self._tokens(sample), sample.logprobs)
        ]

    def _openai_answer(self, kind: str, prefix: str, choices: list[dict[str, Any]], outs: list[Generated]) -> dict[str, Any]:
        prompt_tokens = sum(len(o.prompt_ids) for o in outs)
        completion_tokens = sum(len(s.completion_ids) for o in outs for s in o.samples)
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": self.spec.model_id,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "system_fingerprint": f"policy-server-v{max(o.version for o in outs)}",
        }


def _before_stop(text: str, sample: Sample) -> str:
    """OpenAI leaves the stop sequence out of the answer."""
    if sample.stop_string and sample.stop_string in text:
        return text[: text.index(sample.stop_string)]
    return text


class ValueService:
    def __init__(self, spec: LLMValueSpec) -> None:
        self.spec = spec
        self.backend: ValueBackend | None = None

    def attach(self, backend: ValueBackend) -> None:
        self.backend = backend

    def require_backend(self) -> ValueBackend:
        if self.backend is None:
            raise BackendUnavailable("the value model is still starting; retry shortly")
        return self.backend

    async def score(self, messages: list[Any]) -> dict[str, Any]:
        backend = self.require_backend()
        nested = bool(messages) and isinstance(messages[0], list)  # a list of conversations
        conversations = messages if nested else [messages]
        if not conversations or len(conversations) > self.spec.max_conversations:
            raise InvalidRequest.at(
                "body.messages", f"give 1 to {self.spec.max_conversations} conversations, got {len(conversations)}"
            )
        errors = [
            error
            for i, conv in enumerate(conversations)
            for error in _conversation_errors(conv, f"body.messages.{i}" if nested else "body.messages")
        ]
        if errors:
            raise InvalidRequest(f"invalid messages: {errors[0].field}: {errors[0].message}", errors)
        scores, version = await backend.score(conversations)
        return {"result": scores, "model_version": version}


def _conversation_errors(conversation: list[Any], where: str) -> list[FieldError]:
    """What is wrong with one conversation: a message that is no {role, content} of valid texts."""
    if not conversation:
        return [FieldError(where, "an empty conversation")]
    try:
        _CONVERSATION.validate_python(conversation)
    except ValidationError as exc:
        return field_errors(exc, where, "unknown field; a message has `role` and `content`")
    return []


