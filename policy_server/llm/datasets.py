"""x1 training samples: parse, load from the data folder, subset, store, and encode for the loss.

A policy sample is ``{"messages": [...], "GAE": float}`` (``"advantage"`` is accepted for ``"GAE"``),
optionally with ``"logprobs"``: the generating policy's log-probabilities of the last message's
tokens, which PPO then uses as the old policy instead of the policy at the start of training. A
value sample is ``{"messages": [...], "value_target": float}`` with the target in [-1, 1]. Both
also accept x1's documented form ``{"question", "context", "current_node", "value"}``: the user
asks the question and the assistant's last message is ``context + current_node``, of which only
``current_node`` (the step being judged) is trained; ``value`` is the policy's advantage or the
value model's target.

Every error is an ``InvalidRequest`` naming ``body.dataset.<i>.<field>``; a sample with a key
neither form knows is refused, so a misspelt field never trains silently on a default.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from policy_server.errors import FieldError, Forbidden, InvalidRequest, NotFound

Message = dict[str, str]
Kind = Literal["policy", "value"]
DOCUMENTED_KEYS = frozenset({"question", "context", "current_node", "value"})
POLICY_KEYS = frozenset({"messages", "GAE", "advantage", "logprobs"})
VALUE_KEYS = frozenset({"messages", "value_target"})
T = TypeVar("T")


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


def _invalid(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{field}: {message}", [FieldError(field, message)])


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(field, f"must be a finite number, got {value!r}")
    return float(value)


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _invalid(field, f"must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise _invalid(field, "must be a non-empty list of {role, content} messages")
    messages = []
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            raise _invalid(
                f"{field}.{j}", f"must be an object with role and content, got {type(message).__name__}"
            )
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise _invalid(f"{field}.{j}", f"unknown keys {extra}; a message has role and content")
        messages.append({key: _string(message.get(key), f"{field}.{j}.{key}") for key in ("role", "content")})
    return messages


def _documented(raw: dict[str, Any], where: str) -> tuple[list[Message], float, int]:
    """x1's (question, context, current_node, value) → messages, value, where the judged step starts."""
    question = _string(raw.get("question"), f"{where}.question")
    context = _string(raw.get("context", ""), f"{where}.context")
    node = _string(raw.get("current_node"), f"{where}.current_node")
    if not node:
        raise _invalid(f"{where}.current_node", "must not be empty: it is the step being judged")
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": context + node}]
    return messages, _number(raw.get("value"), f"{where}.value"), len(context)


def _check_keys(raw: Any, allowed: frozenset[str], where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _invalid(where, f"must be an object, got {type(raw).__name__}")
    form = DOCUMENTED_KEYS if "question" in raw or "current_node" in raw else allowed
    extra = sorted(set(raw) - form)
    if extra:
        raise _invalid(
            where, f"unknown keys {extra}; expected {sorted(allowed)} or {sorted(DOCUMENTED_KEYS)}"
        )
    return raw


def parse_policy_sample(raw: Any, where: str) -> PolicySample:
    raw = _check_keys(raw, POLICY_KEYS, where)
    if "question" in raw or "current_node" in raw:
        messages, advantage, judged_from = _documented(raw, where)
        return PolicySample(messages, advantage, judged_from)
    messages = _messages(raw.get("messages"), f"{where}.messages")
    if messages[-1]["role"] != "assistant":
        raise _invalid(
            f"{where}.messages.{len(messages) - 1}.role", "the last message must be the assistant's"
        )
    if ("GAE" in raw) == ("advantage" in raw):
        raise _invalid(f"{where}.GAE", "give the advantage as GAE (or advantage), exactly once")
    key = "GAE" if "GAE" in raw else "advantage"
    advantage = _number(raw[key], f"{where}.{key}")
    logprobs = raw.get("logprobs")
    if logprobs is not None:
        if not isinstance(logprobs, list) or not logprobs:
            raise _invalid(f"{where}.logprobs", "must be a non-empty list of log-probabilities")
        logprobs = [_number(p, f"{where}.logprobs.{k}") for k, p in enumerate(logprobs)]
        if any(p > 0 for p in logprobs):
            raise _invalid(f"{where}.logprobs", "log-probabilities must be <= 0")
    return PolicySample(messages, advantage, 0, logprobs)


def parse_value_sample(raw: Any, where: str) -> ValueSample:
    raw = _check_keys(raw, VALUE_KEYS, where)
    if "question" in raw or "current_node" in raw:
        messages, target, judged_from = _documented(raw, where)
        field = f"{where}.value"
    else:
        messages = _messages(raw.get("messages"), f"{where}.messages")
        target, judged_from, field = (
            _number(raw.get("value_target"), f"{where}.value_target"),
            0,
            f"{where}.value_target",
        )
    if not -1.0 <= target <= 1.0:
        raise _invalid(field, f"must be in [-1, 1] (the value head's range), got {target}")
    return ValueSample(messages, target, judged_from)


def parse_samples(
    raw: Any, kind: Kind, field: str = "body.dataset"
) -> list[PolicySample] | list[ValueSample]:
    """Validate a list of x1 samples for the policy (PPO) or the value model (MSE)."""
    if not isinstance(raw, list) or not raw:
        raise _invalid(field, "must be a non-empty list of samples")
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
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            samples = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _invalid(field, f"{relative} is not valid JSON: {exc}") from exc
    else:
        samples = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise _invalid(field, f"{relative} line {number} is not valid JSON: {exc}") from exc
    if not isinstance(samples, list) or not samples:
        raise _invalid(field, f"{relative} holds no samples (expected a JSON list or JSONL lines)")
    return samples


def subset(samples: Sequence[T], percent_of_data: float, seed: int) -> list[T]:
    """A seeded random ``percent_of_data`` share of the samples (at least one), in their order."""
    if not 0.0 < percent_of_data <= 1.0:
        raise _invalid("body.percent_of_data", f"must be in (0, 1], got {percent_of_data}")
    count = max(1, round(len(samples) * percent_of_data))
    keep = sorted(random.Random(seed).sample(range(len(samples)), count))
    return [samples[i] for i in keep]


def save_samples(samples: Sequence[dict[str, Any]], folder: Path) -> Path:
    """Write the raw samples to a new JSONL file in ``folder`` atomically; returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"samples-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}.jsonl"
    fd, tmp = tempfile.mkstemp(prefix=".samples-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for sample in samples:
                out.write(json.dumps(sample, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    return folder / name


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        raise _invalid(field, f"the chat has {len(ids)} tokens, more than max_length={max_length}")
    if not any(mask):
        raise _invalid(field, "the last message has no tokens to train")
    return ids, mask
