"""``LLMService`` and ``ValueService``: the LLM endpoints with neither HTTP nor Ray.

The gateway tokenises (it loads only the tokenizer): it checks lengths and stop strings before
anything is queued, builds x1's step prompts and chat prompts, tracks sessions and queued tasks,
and sends token ids to the model (a ``serving.api.LLMModel`` the runtime started).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from policy_server.errors import (
    BackendUnavailable,
    FieldError,
    InvalidRequest,
    summary,
)
from policy_server.fields import field_errors
from policy_server.gateway.llm.wire import (
    DirectForward,
    Forward,
    ValueMessage,
)
from policy_server.llm.params import GenerationParams, Sample, SampleChunk
from policy_server.llm.records import record_from_sample
from policy_server.schema.llm import LLMPolicySpec, LLMValueSpec
from policy_server.serving.api import LLMModel, TasksAndSessionsAPI, ValueModel

log = logging.getLogger(__name__)

_CONVERSATION = TypeAdapter(list[ValueMessage])
VLLM_MAX_TEMPERATURE = 2.0
"""vLLM's ``SamplingParams`` refuses a higher temperature; x1's routes allow up to 10."""


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
        self.backend: LLMModel | None = None
        self.tasks: TasksAndSessionsAPI | None = None

    def attach(self, backend: LLMModel, tasks: TasksAndSessionsAPI) -> None:
        self.backend, self.tasks = backend, tasks

    def require_tasks(self) -> TasksAndSessionsAPI:
        """x1's tasks and sessions."""
        if self.tasks is None:
            raise BackendUnavailable("the LLM policy is still starting; retry shortly")
        return self.tasks

    def require_backend(self) -> LLMModel:
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
        except Exception as exc:
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

    def stream(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[SampleChunk]:
        """The samples chunk by chunk (``LLMModel.stream``); closing it cancels the generation."""
        return self.require_backend().stream(prompt_ids, params)

    # --- x1 -----------------------------------------------------------------------------------

    async def direct_forward(self, body: DirectForward) -> dict[str, Any]:
        stops = self.stop_strings(body.stop_strings, "body.stop_strings")
        prompt = self.prompt_ids(body.input_string, body.max_input_length, body.truncate, "body.input_string")
        parent = None
        if body.session_id is not None:
            prompt, parent = await self.require_tasks().session_prompt(body.session_id, body.session_mode, body.input_string)
        # x1's default (max_input_length + 256 in all) is capped by the server's limit; an explicit
        # max_output_length beyond it is refused
        new_tokens = (
            body.max_output_length - len(prompt) if body.max_output_length
            else min(body.max_input_length + 256 - len(prompt), self.limits.max_new_tokens)
        )
        params = self.params(
            len(prompt), new_tokens, body.num_samples, stops, temperature=body.temperature,
            strategy=body.decoding_strategy, safe_logits=body.safe_logits, seed=body.seed,
            min_new_tokens=min(body.min_new_tokens, max(new_tokens, 0)), **_beam_groups(body),
        )
        out = await self.generate(prompt, params, body.skip_special_tokens)
        if body.session_id is not None:
            await self.require_tasks().session_add(
                body.session_id, body.session_mode, parent, body.input_string, out.samples, out.version
            )
        return {
            "result": out.texts,
            "stop_strings": [s.stop_string or "" for s in out.samples],
            "finish_reasons": [s.finish_reason for s in out.samples],
            "model_version": out.version,
            "nonfinite_logits": [s.nonfinite_logits for s in out.samples] if body.safe_logits else None,
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
            seed=body.seed, **_beam_groups(body),
        )
        self._check_engine(params)
        return await self.require_tasks().start_task(text, prompt, params, body.return_tokens)

    def _check_engine(self, params: GenerationParams) -> None:
        """What the vLLM engine would refuse when the queued task runs, refused at submit instead
        (``direct_forward`` gets the engine's own refusal, named the same)."""
        sampled = params.strategy == "temperature"  # the beam strategies ignore it
        if self.spec.engine == "vllm" and sampled and params.temperature > VLLM_MAX_TEMPERATURE:
            raise InvalidRequest.at("body.temperature", f"the vLLM engine refuses it: temperature must be in "
                                                        f"[0, {VLLM_MAX_TEMPERATURE:g}], got {params.temperature:g}")


class ValueService:
    def __init__(self, spec: LLMValueSpec) -> None:
        self.spec = spec
        self.backend: ValueModel | None = None

    def attach(self, backend: ValueModel) -> None:
        self.backend = backend

    def require_backend(self) -> ValueModel:
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


def _beam_groups(body: DirectForward | Forward) -> dict[str, Any]:
    """Diverse beam search's groups and penalty; ``num_beam_groups`` must divide ``num_samples``."""
    groups = body.num_beam_groups
    if groups is not None and body.num_samples % groups:
        raise InvalidRequest.at(
            "body.num_beam_groups", f"must divide num_samples ({body.num_samples}), got {groups}"
        )
    return {"num_beam_groups": groups, "diversity_penalty": body.diversity_penalty}
