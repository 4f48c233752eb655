"""What the experience log holds: decisions and outcomes, as rows of one table.

A **decision** is one served action: the model input it was chosen for (``obs``, any shape and
dtype), the action, its log-probability, the model version and variant, and who asked (request
id, row of a batch, episode id, client id, policy id). An **outcome** is what a client reported
later about a decision: its reward and whether the episode ended there (and then the
observation after it). Outcomes are rows of their own; ``join`` pairs them with decisions at
read time.

An outcome names its decision by ``ref``: ``<request id>`` (row 0) or ``<request id>/<row>`` (a
row of a batch answer); a ``/collect_experience`` outcome has no ref: it belongs to the same
client's previous decision (Pathmind's protocol), which ``join`` finds by time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # the log's writer process need not import the policies (torch)
    from policy_server.policies.spaces import ActionSample

Kind = Literal["decision", "outcome"]

SCHEMA = pa.schema([
    ("kind", pa.string()),
    ("time_ns", pa.int64()),  # UTC, nanoseconds since the epoch
    ("policy", pa.string()),
    ("policy_id", pa.string()),
    ("request_id", pa.string()),  # the HTTP request that wrote the row
    ("row", pa.int32()),  # the row of a batch request (0 for one observation)
    ("endpoint", pa.string()),
    ("episode_id", pa.string()),
    ("client_id", pa.string()),
    ("model_version", pa.int64()),
    ("variant", pa.string()),
    ("obs", pa.binary()),  # decision: the model input; outcome: the observation after an episode's end
    ("obs_dtype", pa.string()),
    ("obs_shape", pa.list_(pa.int32())),
    ("action", pa.list_(pa.float64())),  # the action as a flat list (an index, indices, or a vector)
    ("log_prob", pa.float64()),
    ("reward", pa.float64()),
    ("terminated", pa.bool_()),
    ("truncated", pa.bool_()),
    ("ref", pa.string()),  # outcome: the decision it belongs to, `<request id>[/<row>]`
])
COLUMNS = tuple(SCHEMA.names)


@dataclass(frozen=True)
class Asker:
    """Who a request came from: its request id, endpoint, and the ids the client gave."""

    request_id: str
    endpoint: str
    episode_id: str | None = None
    client_id: str | None = None
    policy_id: str | None = None


@dataclass(frozen=True)
class Decisions:
    """The rows one request was answered: ``obs`` ``(B, *shape)`` of the model's input dtype."""

    time_ns: int
    policy: str
    asker: Asker
    obs: np.ndarray
    samples: Sequence[ActionSample]
    model_version: int
    variant: str

    def __len__(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class Outcomes:
    """Rewards of ``n`` earlier decisions: ``refs`` names each (None: the client's previous decision);
    ``next_obs`` ``(n, *shape)`` or None, kept only where an episode ends."""

    time_ns: int
    policy: str
    asker: Asker
    refs: Sequence[str | None]
    rewards: Sequence[float]
    terminated: Sequence[bool]
    truncated: Sequence[bool]
    next_obs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rewards)


Entry = Decisions | Outcomes


def parse_ref(ref: str) -> tuple[str, int]:
    """``"abc/3"`` → ``("abc", 3)``; ``"abc"`` → ``("abc", 0)`` (request ids hold no ``/``)."""
    head, _, tail = ref.rpartition("/")
    return (head, int(tail)) if head and tail.isdigit() else (ref, 0)


def episode_of(asker: Asker, row: int, batch: bool) -> str | None:
    """A batch's row ``i`` is episode ``<episode id>/<i>`` (one environment of a vector); one
    observation is the episode id itself."""
    if asker.episode_id is None:
        return None
    return f"{asker.episode_id}/{row}" if batch else asker.episode_id


def _obs_fields(obs: np.ndarray | None, binary: bool) -> dict[str, Any]:
    if obs is None:
        return {"obs": None, "obs_dtype": None, "obs_shape": None}
    return {"obs": obs.tobytes() if binary else obs.tolist(), "obs_dtype": obs.dtype.str, "obs_shape": list(obs.shape)}


def rows(entry: Entry, binary: bool) -> Iterator[dict[str, Any]]:
    """The entry's rows as dicts of ``COLUMNS``; ``obs`` as its bytes (``binary``, for Parquet) or
    nested lists (JSON)."""
    a = entry.asker
    common = {"time_ns": entry.time_ns, "policy": entry.policy, "policy_id": a.policy_id, "request_id": a.request_id,
              "endpoint": a.endpoint, "client_id": a.client_id}
    batch = a.endpoint.endswith("/batch")
    if isinstance(entry, Decisions):
        for i, sample in enumerate(entry.samples):
            action = sample.action if isinstance(sample.action, list) else [sample.action]
            yield {**common, "kind": "decision", "row": i, "episode_id": episode_of(a, i, batch),
                   "model_version": entry.model_version, "variant": entry.variant, **_obs_fields(entry.obs[i], binary),
                   "action": [float(v) for v in action], "log_prob": sample.log_prob, "reward": None,
                   "terminated": None, "truncated": None, "ref": None}
        return
    for i, ref in enumerate(entry.refs):
        ended = entry.terminated[i] or entry.truncated[i]
        next_obs = entry.next_obs[i] if entry.next_obs is not None and ended else None
        yield {**common, "kind": "outcome", "row": i, "episode_id": a.episode_id, "model_version": None,
               "variant": None, **_obs_fields(next_obs, binary), "action": None, "log_prob": None,
               "reward": float(entry.rewards[i]), "terminated": bool(entry.terminated[i]),
               "truncated": bool(entry.truncated[i]), "ref": ref}


def to_table(entries: Sequence[Entry]) -> pa.Table:
    """The entries' rows as one Arrow table of ``SCHEMA``."""
    table = [r for e in entries for r in rows(e, binary=True)]
    # from_pydict, not from_pylist: the latter imports pandas (seconds, in the writer's first flush)
    return pa.Table.from_pydict({c: [r[c] for r in table] for c in COLUMNS}, schema=SCHEMA)


def to_lines(entries: Sequence[Entry]) -> str:
    """The entries' rows as JSON lines (each ending in a newline)."""
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for e in entries for r in rows(e, binary=False))


@dataclass(frozen=True)
class LogRecord:
    """One row read back: ``obs`` as an array of its logged shape and dtype, ``action`` float64."""

    kind: Kind
    time_ns: int
    policy: str
    request_id: str
    row: int
    endpoint: str
    policy_id: str | None = None
    episode_id: str | None = None
    client_id: str | None = None
    model_version: int | None = None
    variant: str | None = None
    obs: np.ndarray | None = None
    action: np.ndarray | None = None
    log_prob: float | None = None
    reward: float | None = None
    terminated: bool | None = None
    truncated: bool | None = None
    ref: str | None = None


def from_row(row: dict[str, Any]) -> LogRecord:
    """A row of ``COLUMNS`` (from Parquet: ``obs`` bytes; from JSON: nested lists) as a record."""
    fields = {k: v for k, v in row.items() if k not in ("obs", "obs_dtype", "obs_shape", "action")}
    obs = row.get("obs")
    if obs is not None:
        dtype, shape = np.dtype(row["obs_dtype"]), tuple(row["obs_shape"])
        obs = np.frombuffer(obs, dtype=dtype).reshape(shape) if isinstance(obs, bytes) else np.asarray(obs, dtype).reshape(shape)
    action = None if row.get("action") is None else np.asarray(row["action"], dtype=np.float64)
    return LogRecord(**fields, obs=obs, action=action)
