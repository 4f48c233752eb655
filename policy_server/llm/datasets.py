"""x1 training samples: parse, load from the data folder, subset, store, and encode for the loss.

A policy sample is ``{"messages": [...], "GAE": float}`` (``"advantage"`` is accepted for ``"GAE"``),
optionally with ``"logprobs"``: the generating policy's log-probabilities of the last message's
tokens, which PPO then uses as the old policy instead of the policy at the start of training. A
value sample is ``{"messages": [...], "value_target": float}`` with the target in [-1, 1]. Both
also accept x1's documented form ``{"question", "context", "current_node", "value"}``: the user
asks the question and the assistant's last message is ``context + current_node``, of which only
``current_node`` (the step being judged) is trained; ``value`` is the policy's advantage or the
value model's target.

The accepted forms are pydantic models (``PolicyForm``, ``ValueForm``, ``DocumentedForm``): texts must
be valid Unicode (a tokenizer reads them) and numbers JSON numbers finite as float32 (the loss is
computed in float32). Every error is an ``InvalidRequest`` naming ``<field>.<i>.<key>`` (by default
``body.dataset.<i>.<key>``); a sample with a key its form does not know is refused, so a misspelt
field never trains silently on a default.
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

from pydantic import BaseModel, Field, ValidationError

from policy_server.errors import Forbidden, InvalidRequest, NotFound
from policy_server.fields import STRICT, Float32, Text, field_errors
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


class PolicyForm(_Form):
    """A policy sample: the chat, whose last message (the assistant's) is trained, and its advantage."""

    messages: list[SampleMessage] = Field(min_length=1)
    GAE: Float32 | None = Field(None, description="x1's advantage; give it as GAE or as advantage.")
    advantage: Float32 | None = None
    logprobs: list[LogProb] | None = Field(
        None, min_length=1, description="The generating policy's log-prob of each trained token."
    )


class ValueForm(_Form):
    """A value sample: the chat and the score the value model should give it."""

    messages: list[SampleMessage] = Field(min_length=1)
    value_target: ValueTarget


class DocumentedForm(_Form):
    """x1's documented form: ``context + current_node`` answers ``question``; ``value`` is the
    policy's advantage (for the value model: its target, see ``DocumentedValueForm``)."""

    question: Text
    context: Text = ""
    current_node: Text = Field(min_length=1, description="The step being judged: never empty.")
    value: Float32


class DocumentedValueForm(DocumentedForm):
    value: ValueTarget


_FORMS: dict[Kind, tuple[type[_Form], type[DocumentedForm]]] = {
    "policy": (PolicyForm, DocumentedForm),
    "value": (ValueForm, DocumentedValueForm),
}
_UNKNOWN: dict[Kind, str] = {
    "policy": "unknown field; a policy sample has messages, GAE (or advantage) and logprobs, "
    "or question, context, current_node and value",
    "value": "unknown field; a value sample has messages and value_target, "
    "or question, context, current_node and value",
}


@dataclass(frozen=True)
class PolicySample:
    """One step to reinforce (positive advantage) or discourage (negative)."""

    messages: list[Message]
    """The chat; the last message is the assistant's and is the only one trained."""
    advantage: float
    """x1's ``GAE``: broadcast over the trained tokens."""
    judged_from: int = 0
    """Characters of the last message's content that are context, not trained."""
    logprobs: list[float] | None = None
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




def _validate(raw: Any, kind: Kind, where: str) -> _Form:
    """The sample as its form: x1's documented one when it has a question or a current_node."""
    plain, documented = _FORMS[kind]
    form = documented if isinstance(raw, dict) and ("question" in raw or "current_node" in raw) else plain
    try:
        return form.model_validate(raw)
    except ValidationError as exc:
        errors = field_errors(exc, where, _UNKNOWN[kind])
        raise InvalidRequest(f"{errors[0].field}: {errors[0].message}", errors) from None


def _from_documented(form: DocumentedForm) -> tuple[list[Message], int]:
    """The user asks the question; the assistant answers context + current_node, judged from the node on."""
    answer = form.context + form.current_node
    return [{"role": "user", "content": form.question}, {"role": "assistant", "content": answer}], len(form.context)


def _messages(messages: list[SampleMessage]) -> list[Message]:
    return [m.model_dump() for m in messages]


def parse_policy_sample(raw: Any, where: str) -> PolicySample:
    form = _validate(raw, "policy", where)
    if isinstance(form, DocumentedForm):
        messages, judged_from = _from_documented(form)
        return PolicySample(messages, form.value, judged_from)
    assert isinstance(form, PolicyForm)
    if form.messages[-1].role != "assistant":
        raise InvalidRequest.at(f"{where}.messages.{len(form.messages) - 1}.role", "the last message must be the assistant's")
    if (form.GAE is None) == (form.advantage is None):
        raise InvalidRequest.at(f"{where}.GAE", "give the advantage as GAE (or advantage), exactly once")
    advantage = form.GAE if form.GAE is not None else form.advantage
    assert advantage is not None
    return PolicySample(_messages(form.messages), advantage, 0, form.logprobs)


def parse_value_sample(raw: Any, where: str) -> ValueSample:
    form = _validate(raw, "value", where)
    if isinstance(form, DocumentedForm):
        messages, judged_from = _from_documented(form)
        return ValueSample(messages, form.value, judged_from)
    assert isinstance(form, ValueForm)
    return ValueSample(_messages(form.messages), form.value_target)


def parse_samples(
    raw: Any, kind: Kind, field: str = "body.dataset"
) -> list[PolicySample] | list[ValueSample]:
    """Validate a list of x1 samples for the policy (PPO) or the value model (MSE); the first bad
    sample is refused with an ``InvalidRequest`` naming ``<field>.<i>.<key>``."""
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest.at(field, "must be a non-empty list of samples")
    parse = parse_policy_sample if kind == "policy" else parse_value_sample
    return [parse(sample, f"{field}.{i}") for i, sample in enumerate(raw)]  # type: ignore[return-value]


def resolve_under(data_dir: Path, relative: str, field: str = "body.dataset_path") -> Path:
    """``data_dir / relative`` with every symlink resolved; Forbidden when that leaves ``data_dir``."""
    root = Path(data_dir).resolve()
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root):
        raise Forbidden(f"{field}: {relative!r} is outside the data folder; give a path relative to it")
    return candidate


def load_dataset_file(
    data_dir: Path, relative: str, field: str = "body.dataset_path"
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
        raise InvalidRequest.at("body.percent_of_data", f"must be in (0, 1], got {percent_of_data}")
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
