"""``LLMService`` and ``ValueService``: the LLM endpoints with neither HTTP nor Ray.

The gateway tokenises (it loads only the tokenizer): it checks lengths and stop strings before
anything is queued, builds x1's step prompts and chat prompts, tracks sessions and queued tasks,
and sends token ids to a backend, the Serve deployment or an in-process engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import TypeAdapter, ValidationError

from policy_server.errors import (
    BackendUnavailable,
    FieldError,
    InvalidRequest,
    ModelError,
    PolicyServerError,
    summary,
)
from policy_server.fields import field_errors
from policy_server.gateway.llm.wire import (
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
T = TypeVar("T")


def under_body(exc: InvalidRequest) -> InvalidRequest:
    """A domain's ``InvalidRequest``, whose fields are named from its own input (``prompt``,
    ``dataset.3.GAE``, ``""`` for the whole input), named from the request body instead
    (``body.prompt``, ``body.dataset.3.GAE``, ``body``); the message's leading field too."""
    fields = [FieldError(".".join(filter(None, ("body", f.field))), f.message) for f in exc.fields]
    head = f"{exc.fields[0].field}: " if exc.fields[0].field else ""
    message = exc.message
    if message.startswith(head):
        message = f"{fields[0].field}: {message[len(head):]}"
    return type(exc)(message, fields)


async def in_body(pending: Awaitable[T]) -> T:
    """``await pending``, its ``InvalidRequest`` named from the request body (``under_body``)."""
    try:
        return await pending
    except InvalidRequest as exc:
        raise under_body(exc) from exc


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


