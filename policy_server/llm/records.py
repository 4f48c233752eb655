"""Training-ready token records (Atropos ManagedServer's contract) and multi-turn sessions.

A ``TokenRecord`` is one sequence as a trainer wants it: the token ids, the same ids with every
position that is not to be trained replaced by ``MASK`` (-100), and per-position logprobs with
``PROMPT_LOG_PROB`` (1.0) on those positions.

A ``SessionStore`` tracks conversations. Each node of a session is a full sequence (prompt +
completion) and the text it decodes to. A later prompt whose text starts with a node's text
continues that node's exact token ids (only the new suffix is tokenised), and the node it makes
keeps the earlier turns' completions trainable. Nodes are stored as a trie: each holds only the
segment it adds to its parent, so a long conversation costs memory linear in its length.

- ``"linear"`` mode (default): a node that extends a parent replaces it, and the parent's other
  continuations are dropped; a session holds one path per starting prompt.
- ``"tree"`` mode: every branch is kept (a parent keeps all its children).

``nodes`` returns the leaves, ready for training.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

from policy_server.errors import Conflict, NotFound, QueueFull

MASK = -100
"""``masked_tokens`` value on positions that are not trained (prompts)."""
PROMPT_LOG_PROB = 1.0
"""``logprobs`` value on positions that are not trained."""

SessionMode = Literal["linear", "tree"]
Encode = Callable[[str], list[int]]


class SampleLike(Protocol):
    """What a record needs of ``policy_server.llm.generation.Sample``."""

    @property
    def prompt_ids(self) -> list[int]: ...

    @property
    def completion_ids(self) -> list[int]: ...

    @property
    def log_probs(self) -> list[float]: ...

    @property
    def finish_reason(self) -> str: ...


@dataclass(frozen=True)
class TokenRecord:
    """One training-ready sequence; the three lists have one entry per token."""

    tokens: list[int]
    """Prompt + completion token ids."""
    masked_tokens: list[int]
    """``tokens`` with ``MASK`` on every position that is not trained."""
    log_probs: list[float]
    """The sampling logprob of each trained token, ``PROMPT_LOG_PROB`` elsewhere."""
    finish_reason: str
    """Why the last completion ended: ``"stop"`` or ``"length"``."""
    model_version: int
    """The model version that generated the completion (in a session: the oldest of its turns)."""
    prompt_length: int
    """Positions before the last completion; earlier completions in a session stay trainable."""

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.masked_tokens) != n or len(self.log_probs) != n:
            raise ValueError(
                f"a token record needs one mask and one logprob per token: {n} tokens, "
                f"{len(self.masked_tokens)} masked tokens, {len(self.log_probs)} logprobs"
            )
        if not 0 <= self.prompt_length <= n:
            raise ValueError(f"prompt_length {self.prompt_length} is outside 0..{n}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": list(self.tokens),
            "masked_tokens": list(self.masked_tokens),
            "logprobs": list(self.log_probs),
            "finish_reason": self.finish_reason,
            "model_version": self.model_version,
            "prompt_length": self.prompt_length,
        }


def record_from_sample(sample: SampleLike, model_version: int) -> TokenRecord:
    """The record of one generated sample: prompt masked, completion trainable."""
    prompt, completion = list(sample.prompt_ids), list(sample.completion_ids)
    if len(sample.log_probs) != len(completion):
        raise ValueError(f"{len(sample.log_probs)} logprobs for {len(completion)} completion tokens")
    return TokenRecord(
        tokens=prompt + completion,
        masked_tokens=[MASK] * len(prompt) + completion,
        log_probs=[PROMPT_LOG_PROB] * len(prompt) + [float(lp) for lp in sample.log_probs],
        finish_reason=sample.finish_reason,
        model_version=model_version,
        prompt_length=len(prompt),
    )


class Prefix(NamedTuple):
    prompt_ids: list[int]
    parent_node_id: str | None
    """The node the prompt continues; pass it to ``SessionStore.add``."""


@dataclass(eq=False)
class _Node:
    parent: str | None
    tokens: list[int]  # the segment this node adds to its parent's sequence (and likewise below)
    masked_tokens: list[int]
    log_probs: list[float]
    text: str
    finish_reason: str
    model_version: int
    prompt_length: int
    children: list[str] = field(default_factory=list)


@dataclass(eq=False)
class _Session:
    expires_at: float
    nodes: dict[str, _Node] = field(default_factory=dict)  # insertion order: parents before children


class SessionStore:
    """Thread-safe sessions of token-tracked nodes, expiring ``ttl_s`` after their last use."""

    def __init__(
        self,
        mode: SessionMode = "linear",
        *,
        max_sessions: int = 1024,
        max_nodes: int = 256,
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in ("linear", "tree"):
            raise ValueError(f"mode must be 'linear' or 'tree', not {mode!r}")
        if max_sessions < 1 or max_nodes < 1 or ttl_s <= 0:
            raise ValueError(
                f"max_sessions, max_nodes and ttl_s must be positive: {max_sessions}, {max_nodes}, {ttl_s}"
            )
        self.mode: SessionMode = mode
        self.max_sessions, self.max_nodes, self.ttl_s = max_sessions, max_nodes, ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently used first

    def prefix_for(self, session_id: str, prompt_text: str, encode: Encode, encode_suffix: Encode) -> Prefix:
        """The prompt's token ids, continuing the longest node whose full text starts the prompt.

        ``encode`` tokenises a whole prompt (special tokens such as bos included); ``encode_suffix``
        tokenises the text after a node's and must add no special tokens.
        """
        with self._lock:
            session = self._touch(session_id)
            match = self._longest_prefix(session, prompt_text) if session is not None else None
            if session is None or match is None:
                node_id, text_end, tokens = None, 0, []
            else:
                node_id, text_end = match
                tokens = self._full(session, node_id).record.tokens
        if node_id is None:
            return Prefix(list(encode(prompt_text)), None)
        suffix = prompt_text[text_end:]
        return Prefix(tokens + list(encode_suffix(suffix)) if suffix else tokens, node_id)

    def add(self, session_id: str, parent_node_id: str | None, record: TokenRecord, text: str) -> str:
        """Store ``record`` (decoding to the full ``text``) as a node; returns its id.

        With a parent, ``record.tokens`` and ``text`` must start with the parent's; the parent's
        masks and logprobs are kept, and the new prompt suffix stays masked as ``record`` has it.
        Raises ``NotFound`` if the parent is gone (replaced in linear mode, reset, or expired).
        """
        with self._lock:
            session = self._touch(session_id)
            parent = self._parent(session, session_id, parent_node_id)
            if parent is not None:
                _check_extends(parent, parent_node_id, record, text)
            session = session or self._create(session_id)
            dropped = self._replaced(session, parent_node_id)
            if len(session.nodes) - len(dropped) >= self.max_nodes:
                raise Conflict(
                    f"session {session_id} holds {len(session.nodes)} nodes (max_nodes={self.max_nodes}): "
                    "read its records and reset it, or start a new session"
                )
            for dropped_id in dropped:
                del session.nodes[dropped_id]
            start, text_start, version = 0, 0, record.model_version
            if parent is not None:
                start, text_start = len(parent.record.tokens), len(parent.text)
                version = min(version, parent.record.model_version)
            node_id = uuid.uuid4().hex
            session.nodes[node_id] = _Node(
                parent=parent_node_id,
                tokens=record.tokens[start:],
                masked_tokens=record.masked_tokens[start:],
                log_probs=record.log_probs[start:],
                text=text[text_start:],
                finish_reason=record.finish_reason,
                model_version=version,
                prompt_length=record.prompt_length,
            )
            if parent_node_id is not None:
                siblings = session.nodes[parent_node_id].children
                siblings[:] = [c for c in siblings if c not in dropped] + [node_id]
            return node_id

    def nodes(self, session_id: str) -> list[dict[str, Any]]:
        """The session's leaves as ``TokenRecord.to_dict()`` dicts, oldest first."""
        with self._lock:
            session = self._require(session_id)
            return [
                self._full(session, node_id).record.to_dict()
                for node_id, node in session.nodes.items()
                if not node.children
            ]

    def reset(self, session_id: str) -> None:
        """Forget every node of the session (the session itself stays, empty)."""
        with self._lock:
            self._require(session_id).nodes.clear()

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._require(session_id)
            del self._sessions[session_id]

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._sessions)

    def _parent(self, session: _Session | None, session_id: str, parent_node_id: str | None) -> _Full | None:
        if parent_node_id is None:
            return None
        if session is None or parent_node_id not in session.nodes:
            raise NotFound(
                f"node {parent_node_id} is no longer in session {session_id}: it was replaced by a newer "
                "turn, or the session was reset or expired; send the prompt again"
            )
        return self._full(session, parent_node_id)

    def _replaced(self, session: _Session, parent_id: str | None) -> set[str]:
        """The nodes a new child of ``parent_id`` replaces: in linear mode, its siblings' subtrees."""
        if self.mode == "tree" or parent_id is None:
            return set()
        dropped: set[str] = set()
        stack = list(session.nodes[parent_id].children)
        while stack:
            node_id = stack.pop()
            dropped.add(node_id)
            stack.extend(session.nodes[node_id].children)
        return dropped

    @staticmethod
    def _longest_prefix(session: _Session, text: str) -> tuple[str, int] | None:
        """The node with the longest full text that starts ``text`` (the newest on ties), and its length."""
        ends: dict[str, int] = {}
        best: tuple[str, int] | None = None
        for node_id, node in session.nodes.items():
            start = 0 if node.parent is None else ends.get(node.parent)
            if start is None or not text.startswith(node.text, start):
                continue
            ends[node_id] = start + len(node.text)
            if best is None or ends[node_id] >= best[1]:
                best = (node_id, ends[node_id])
        return best

    @staticmethod
    def _full(session: _Session, node_id: str | None) -> _Full:
        """The node's whole sequence, joined from the segments on its path from the root."""
        path: list[_Node] = []
        while node_id is not None:
            node = session.nodes[node_id]
            path.append(node)
            node_id = node.parent
        path.reverse()
        leaf = path[-1]
        return _Full(
            text="".join(n.text for n in path),
            record=TokenRecord(
                tokens=[t for n in path for t in n.tokens],
                masked_tokens=[t for n in path for t in n.masked_tokens],
                log_probs=[lp for n in path for lp in n.log_probs],
                finish_reason=leaf.finish_reason,
                model_version=leaf.model_version,
                prompt_length=leaf.prompt_length,
            ),
        )

    def _touch(self, session_id: str) -> _Session | None:
        now = self._purge()
        session = self._sessions.get(session_id)
        if session is not None:
            session.expires_at = now + self.ttl_s
            self._sessions.move_to_end(session_id)
        return session

    def _require(self, session_id: str) -> _Session:
        session = self._touch(session_id)
        if session is None:
            raise NotFound(f"no session {session_id!r}: it never held a node, was deleted, or expired")
        return session

    def _create(self, session_id: str) -> _Session:
        if len(self._sessions) >= self.max_sessions:
            oldest = next(iter(self._sessions.values()))
            retry = max(1, math.ceil(oldest.expires_at - self._clock()))
            raise QueueFull(
                f"{len(self._sessions)} sessions are open (max_sessions={self.max_sessions}); delete finished "
                f"sessions or retry when the oldest expires in {retry} s",
                retry_after_s=retry,
            )
        session = self._sessions[session_id] = _Session(self._clock() + self.ttl_s)
        return session

    def _purge(self) -> float:
        now = self._clock()
        while self._sessions:
            session_id, session = next(iter(self._sessions.items()))
            if session.expires_at > now:
                break
            del self._sessions[session_id]
        return now


class _Full(NamedTuple):
    text: str
    record: TokenRecord


def _check_extends(parent: _Full, parent_id: str | None, record: TokenRecord, text: str) -> None:
    n = len(parent.record.tokens)
    if record.tokens[:n] != parent.record.tokens or record.prompt_length < n:
        raise ValueError(f"the record does not continue the tokens of its parent node {parent_id}")
    if not text.startswith(parent.text):
        raise ValueError(f"the text does not continue the text of its parent node {parent_id}")
