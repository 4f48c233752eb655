"""Which api keys admit which routes: the schema's, the environment's and a keys file's, the file
re-read when it changes (rotation without a restart).

A *scope* is what a key may open: ``policies/<name>`` for one policy's routes (acting, training,
model download), ``llm`` for the ``llm`` section's routes (x1, GRPO, OpenAI, value). A server-wide
key opens every scope. Keys are kept as SHA-256 digests only, and compared with
``hmac.compare_digest`` against every candidate, digests of equal length, so neither the time a
check takes nor a log line or ``repr`` tells anything about a key.

The keys file (``POLICY_SERVER_API_KEYS_FILE``), YAML or JSON::

    server: [key-a, key-b]          # admit every route
    policies:
      cartpole: [key-c]             # admits only /policies/cartpole/... (and the plain paths when
                                    # cartpole is the default policy)
    llm: [key-d]                    # admits the LLM, GRPO, value and OpenAI routes

``KeysFile.current`` checks the file's identity (inode, size, mtime) with one ``stat`` per call
and re-reads it when it changed; a file written less than a second before it was read is re-read
(at most every 50 ms) until it is older, since a second write within the file system's timestamp
granularity may leave size and mtime as they were. A file that becomes unreadable or invalid
keeps the keys read before, and the error is logged once per change, naming where the file is
wrong, never a key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

log = logging.getLogger(__name__)

LLM_SCOPE = "llm"
RACY_NS = 1_000_000_000  # a file this much younger than its reading may change without a new mtime
RACY_REREAD_NS = 50_000_000
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's: a re-read costs ~0.1 ms, not ~1 ms


def policy_scope(name: str) -> str:
    """The scope of policy ``name``'s routes: ``policies/<name>``, as its paths are named."""
    return f"policies/{name}"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class KeySet:
    """Digests of the keys that admit requests: ``server`` ones every route, ``scoped`` ones only
    their scope's routes."""

    server: frozenset[bytes] = frozenset()
    scoped: Mapping[str, frozenset[bytes]] = field(default_factory=dict)

    @classmethod
    def of(cls, server: Iterable[str] = (), scoped: Mapping[str, Iterable[str]] | None = None) -> KeySet:
        """The set of these plain keys (empty strings are no keys)."""
        return cls(
            frozenset(_digest(k) for k in server if k),
            {scope: frozenset(_digest(k) for k in keys if k) for scope, keys in (scoped or {}).items()},
        )

    def __or__(self, other: KeySet) -> KeySet:
        scopes = set(self.scoped) | set(other.scoped)
        return KeySet(
            self.server | other.server,
            {s: self.scoped.get(s, frozenset()) | other.scoped.get(s, frozenset()) for s in scopes},
        )

    def __len__(self) -> int:
        return len(self.server) + sum(len(keys) for keys in self.scoped.values())

    def admits(self, given: Sequence[str], scope: str | None) -> bool:
        """Whether one of the ``given`` keys opens ``scope`` (None: any scope, as ``/clients`` asks).

        Every given key is compared with every candidate (no early exit).
        """
        if scope is None:
            candidates = self.server.union(*self.scoped.values())
        else:
            candidates = self.server | self.scoped.get(scope, frozenset())
        digests = [_digest(k) for k in given]
        matches = [hmac.compare_digest(d, c) for d in digests for c in candidates]  # all of them, then any
        return any(matches)


class KeysFileError(ValueError):
    """A keys file that cannot be read or is not valid; the message never holds a key."""


class _KeysFileFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    server: list[StrictStr] = []
    policies: dict[StrictStr, list[StrictStr]] = {}
    llm: list[StrictStr] = []


def parse_keys(text: str, policies: Iterable[str], has_llm: bool) -> KeySet:
    """The keys of a keys file's ``text`` (see the module docstring), for a schema with these
    ``policies`` and (``has_llm``) an ``llm`` section.

    Raises KeysFileError naming the place (line and column, or the entry) of what is wrong: not
    YAML, not a mapping, an unknown entry or policy, a key that is not text or is empty.
    """
    try:
        raw = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as exc:  # str(exc) quotes the offending line, which may hold a key
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise KeysFileError(f"not valid YAML{where}: {getattr(exc, 'problem', None) or 'unreadable'}") from None
    try:
        parsed = _KeysFileFormat.model_validate({} if raw is None else raw)
    except ValidationError as exc:  # the messages only: pydantic's str() shows the input values
        problems = [f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}" for e in exc.errors()]
        raise KeysFileError("; ".join(problems[:5])) from None
    unknown = sorted(set(parsed.policies) - set(policies))
    if unknown:
        raise KeysFileError(f"policies.{unknown[0]}: the schema has no such policy (it has {sorted(policies)})")
    if parsed.llm and not has_llm:
        raise KeysFileError("llm: the schema has no llm section")
    entries = [("server", parsed.server), ("llm", parsed.llm),
               *((f"policies.{name}", keys) for name, keys in parsed.policies.items())]
    for where, keys in entries:
        for i, key in enumerate(keys):
            if not key.strip() or key != key.strip():
                raise KeysFileError(f"{where}.{i}: a key must be non-empty, without spaces around it")
    scoped = {policy_scope(name): keys for name, keys in parsed.policies.items()}
    return KeySet.of(parsed.server, scoped | ({LLM_SCOPE: parsed.llm} if parsed.llm else {}))


Signature = tuple[int, int, int, int]  # device, inode, size, mtime (ns)


class KeysFile:
    """A keys file's current keys, re-read when the file changes (see the module docstring).

    Raises KeysFileError at construction when the file cannot be read or is invalid: at start-up,
    a bad file is refused rather than served without its keys.
    """

    def __init__(self, path: Path, parse: Callable[[str], KeySet], clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.path, self._parse, self._clock_ns = path, parse, clock_ns
        self._seen, self._read_at = self._signature(), clock_ns()
        self._keys, self._failed = self._read(), ""

    @property
    def keys(self) -> KeySet:
        """The keys last read successfully (no check of the file)."""
        return self._keys

    def current(self) -> KeySet:
        """The file's keys now: re-read when it changed (one ``stat`` when it did not)."""
        signature, now = self._signature(), self._clock_ns()
        racy = signature is not None and self._read_at - signature[3] < RACY_NS
        if signature != self._seen or (racy and now - self._read_at >= RACY_REREAD_NS):
            self._reload(signature, now)
        return self._keys

    def _reload(self, signature: Signature | None, now: int) -> None:
        self._seen, self._read_at = signature, now
        try:
            keys = self._read()
        except KeysFileError as exc:
            if str(exc) != self._failed:  # once per change, not once per request
                log.error("api keys file %s: %s; keeping the %d keys read before", self.path, exc, len(self._keys))
                self._failed = str(exc)
            return
        if self._failed or keys != self._keys:
            log.info("api keys file %s re-read: %d keys", self.path, len(keys))
        self._keys, self._failed = keys, ""

    def _read(self) -> KeySet:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            raise KeysFileError(f"cannot read it ({reason})") from None
        return self._parse(text)

    def _signature(self) -> Signature | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
