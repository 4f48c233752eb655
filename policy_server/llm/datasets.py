"""x1 training samples: parse, load from the data folder, subset, store, and encode for the loss.

A policy sample is ``{"messages": [...], "GAE": float}`` (``"advantage"`` is accepted for ``"GAE"``),
optionally with ``"logprobs"``: the generating policy's log-probabilities of the last message's
tokens, which PPO then uses as the old policy instead of the policy at the start of training. A
value sample is ``{"messages": [...], "value_target": float}`` with the target in [-1, 1]. Both
also accept x1's documented form ``{"question", "context", "current_node", "value"}``: the user
asks the question and the assistant's last message is ``context + current_node``, of which only
``current_node`` (the step being judged) is trained; ``value`` is the policy's advantage or the
value model's target.

The accepted forms are pydantic models (``PolicyForm``, ``ValueForm``, ``DocumentedForm``), one
discriminated union per kind, which validates a whole dataset at once, whether it came in a request
or from a file: texts must be valid Unicode (a tokenizer reads them) and numbers JSON numbers finite
as float32 (the loss is computed in float32). Every error is an ``InvalidRequest`` naming
``<where>.<i>.<key>`` (by default ``dataset.<i>.<key>``: the gateway names it from the body); a
sample with a key its form does not know is refused, so a misspelt field never trains silently on a
default.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, Discriminator, Field, Tag, TypeAdapter, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from policy_server.errors import FieldError, Forbidden, InvalidRequest, NotFound
from policy_server.fields import STRICT, Float32, Text, error_message
from policy_server.files import atomic_file

Message = dict[str, str]
Kind = Literal["policy", "value"]
T = TypeVar("T")

LogProb = Annotated[Float32, Field(le=0, description="A log-probability: <= 0.")]
ValueTarget = Annotated[Float32, Field(ge=-1, le=1, description="In [-1, 1], the range of the value head's tanh.")]


class _Form(BaseModel):
    model_config = STRICT


class SampleMessage(_Form):
    role: Text
    content: Text


@dataclass(frozen=True)
class PolicySample:
    """One step to reinforce (positive advantage) or discourage (negative)."""

    messages: list[Message]
    """The chat; the last message is the assistant's and is the only one trained."""
    advantage: float
    """x1's ``GAE``: broadcast over the trained tokens."""
    judged_from: int = 0
    """Characters of the last message's content that are context, not trained."""
    log_probs: list[float] | None = None
    """The generating policy's log-prob of each trained token (else the starting policy's)."""


@dataclass(frozen=True)
class ValueSample:
    """One conversation and the score the value model should give it."""

    messages: list[Message]
    value_target: float
    """In [-1, 1], the range of the value head's tanh."""
    judged_from: int = 0
    """Characters of the last message's content that are context (kept for symmetry; the score is
    read at the last token)."""


Sample = PolicySample | ValueSample


def _refuse(loc: tuple[str | int, ...], message: str, value: Any) -> ValidationError:
    """A validation error at ``loc`` inside the model being validated: pydantic nests it under the
    sample's own location, as it does a field's."""
    error = InitErrorDetails(type=PydanticCustomError("invalid_sample", message), loc=loc, input=value)
    return ValidationError.from_exception_data("sample", [error])


def _messages(messages: list[SampleMessage]) -> list[Message]:
    return [m.model_dump() for m in messages]


class PolicyForm(_Form):
    """A policy sample: the chat, whose last message (the assistant's) is trained, and its advantage."""

    messages: list[SampleMessage] = Field(min_length=1)
    GAE: Float32 | None = Field(None, description="x1's advantage; give it as GAE or as advantage.")
    advantage: Float32 | None = None
    log_probs: list[LogProb] | None = Field(
        None, alias="logprobs", min_length=1, description="The generating policy's log-prob of each trained token."
    )

    @model_validator(mode="after")
    def _one_trained_answer(self) -> PolicyForm:
        last = len(self.messages) - 1
        if self.messages[last].role != "assistant":
            raise _refuse(("messages", last, "role"), "the last message must be the assistant's", self.messages[last].role)
        if (self.GAE is None) == (self.advantage is None):
            raise _refuse(("GAE",), "give the advantage as GAE (or advantage), exactly once", self.GAE)
        return self

    def sample(self) -> PolicySample:
        advantage = self.GAE if self.GAE is not None else self.advantage
        assert advantage is not None  # checked above
        return PolicySample(_messages(self.messages), advantage, 0, self.log_probs)


class ValueForm(_Form):
    """A value sample: the chat and the score the value model should give it."""

    messages: list[SampleMessage] = Field(min_length=1)
    value_target: ValueTarget

    def sample(self) -> ValueSample:
        return ValueSample(_messages(self.messages), self.value_target)


class DocumentedForm(_Form):
    """x1's documented form: ``context + current_node`` answers ``question``; ``value`` is the
    policy's advantage (for the value model: its target, see ``DocumentedValueForm``). The user
    asks the question; the assistant answers context + current_node, judged from the node on."""

    question: Text
    context: Text = ""
    current_node: Text = Field(min_length=1, description="The step being judged: never empty.")
    value: Float32

    def chat(self) -> list[Message]:
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.context + self.current_node}]

    def sample(self) -> PolicySample:
        return PolicySample(self.chat(), self.value, len(self.context))


class DocumentedValueForm(DocumentedForm):
    value: ValueTarget

    def sample(self) -> ValueSample:  # type: ignore[override]
        return ValueSample(self.chat(), self.value, len(self.context))


def _form(raw: Any) -> str:
    """Which form a sample is in: x1's documented one when it has a question or a current_node."""
    return "documented" if isinstance(raw, dict) and ("question" in raw or "current_node" in raw) else "messages"


_TAGS = ("messages", "documented")
PolicySampleForm = Annotated[
    Annotated[PolicyForm, Tag("messages")] | Annotated[DocumentedForm, Tag("documented")], Discriminator(_form)
]
ValueSampleForm = Annotated[
    Annotated[ValueForm, Tag("messages")] | Annotated[DocumentedValueForm, Tag("documented")], Discriminator(_form)
]
_DATASETS: dict[Kind, TypeAdapter[Any]] = {
    "policy": TypeAdapter(list[PolicySampleForm]),
    "value": TypeAdapter(list[ValueSampleForm]),
}
_UNKNOWN: dict[Kind, str] = {
    "policy": "unknown field; a policy sample has messages, GAE (or advantage) and logprobs, "
    "or question, context, current_node and value",
    "value": "unknown field; a value sample has messages and value_target, "
    "or question, context, current_node and value",
}


def _sample_errors(exc: ValidationError, kind: Kind, where: str) -> list[FieldError]:
    """pydantic's errors named ``<where>.<i>.<key>``: the form's tag (``(i, tag, key)``) left out."""
    errors = []
    for err in exc.errors():
        loc = list(err["loc"])
        if len(loc) > 1 and loc[1] in _TAGS:
            del loc[1]
        message = _UNKNOWN[kind] if err["type"] == "extra_forbidden" else error_message(err)
        errors.append(FieldError(".".join([where, *map(str, loc)]), message))
    return errors


def parse_samples(raw: Any, kind: Kind, where: str = "dataset") -> list[PolicySample] | list[ValueSample]:
    """Validate a list of x1 samples for the policy (PPO) or the value model (MSE), request bodies
    and files alike; every bad sample is refused in one ``InvalidRequest`` naming ``<where>.<i>.<key>``."""
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest.at(where, "must be a non-empty list of samples")
    try:
        forms = _DATASETS[kind].validate_python(raw)
    except ValidationError as exc:
        errors = _sample_errors(exc, kind, where)
        raise InvalidRequest(f"{errors[0].field}: {errors[0].message}", errors) from None
    return [form.sample() for form in forms]


def resolve_under(data_dir: Path, relative: str, field: str = "dataset_path") -> Path:
    """``data_dir / relative`` with every symlink resolved; Forbidden when that leaves ``data_dir``."""
    root = Path(data_dir).resolve()
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root):
        raise Forbidden(f"{field}: {relative!r} is outside the data folder; give a path relative to it")
    return candidate


def load_dataset_file(
    data_dir: Path, relative: str, field: str = "dataset_path"
) -> list[dict[str, Any]]:
    """Samples from a JSON file (a list) or a JSONL file (one object a line) under ``data_dir``."""
    path = resolve_under(data_dir, relative, field)
    if not path.is_file():
        raise NotFound(f"{field}: no file {relative!r} in the data folder")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest.at(field, f"{relative} is not UTF-8 text: {exc}") from exc
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            samples = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequest.at(field, f"{relative} is not valid JSON: {exc}") from exc
    else:
        samples = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InvalidRequest.at(field, f"{relative} line {number} is not valid JSON: {exc}") from exc
    if not isinstance(samples, list) or not samples:
        raise InvalidRequest.at(field, f"{relative} holds no samples (expected a JSON list or JSONL lines)")
    return samples


def subset(samples: Sequence[T], percent_of_data: float, seed: int) -> list[T]:
    """A seeded random ``percent_of_data`` share of the samples (at least one), in their order."""
    if not 0.0 < percent_of_data <= 1.0:
        raise InvalidRequest.at("percent_of_data", f"must be in (0, 1], got {percent_of_data}")
    count = max(1, round(len(samples) * percent_of_data))
    keep = sorted(random.Random(seed).sample(range(len(samples)), count))
    return [samples[i] for i in keep]


def save_samples(samples: Sequence[dict[str, Any]], folder: Path) -> Path:
    """Write the raw samples to a new JSONL file in ``folder`` atomically; returns its path."""
    name = f"samples-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}.jsonl"
    path = Path(folder) / name
    with atomic_file(path, "w") as out:
        for sample in samples:
            out.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return path


_SENTINEL = "\u2063x1-last-message\u2063"


def last_message_span(tokenizer: Any, messages: list[Message]) -> tuple[str, int, int]:
    """The rendered chat and the character span of the last message's content plus its end token."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    probe = [*messages[:-1], {**messages[-1], "content": _SENTINEL}]
    start = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=False).find(_SENTINEL)
    if start < 0:
        raise ValueError("the chat template does not write the last message's content")
    end = start + len(messages[-1]["content"])
    eos = tokenizer.eos_token
    if eos and text.startswith(eos, end):
        end += len(eos)
    return text, start, end


def encode_last_message(
    tokenizer: Any, messages: list[Message], max_length: int, judged_from: int = 0, field: str = "messages"
) -> tuple[list[int], list[int]]:
    """Token ids of the chat and a loss mask that is 1 only on the last message (and its end token).

    The chat template writes the special tokens itself, so the text is tokenized with
    ``add_special_tokens=False``. ``judged_from`` skips that many characters of the last message's
    content (x1's context). A token straddling a span edge counts as inside.
    """
    text, start, end = last_message_span(tokenizer, messages)
    start += judged_from
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = encoded["input_ids"]
    mask = [int(e > start and s < end) for s, e in encoded["offset_mapping"]]
    if len(ids) > max_length:
        raise InvalidRequest.at(field, f"the chat has {len(ids)} tokens, more than max_length={max_length}")
    if not any(mask):
        raise InvalidRequest.at(field, "the last message has no tokens to train")
    return ids, mask
