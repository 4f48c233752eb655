"""Decisions and the outcomes sent later, joined into episodes: a pure function of the records.

**Outcome → decision.** An outcome with a ``ref`` (``/train/experience``'s ``request_ids``)
belongs to the decision of that request id and row. An outcome without one (``/collect_experience``)
belongs to the same client's latest decision before it, unless that decision's own call ended an
episode (``done``): the action answered for a terminal observation is never taken, as Pathmind's
protocol has it, so the reward sent with the next call belongs to no step. A decision keeps its
first outcome.

**Streams.** A decision's stream is its episode id when the client gave one (``X-Episode-ID``;
row ``i`` of a batch: ``<id>/<i>``), else its client id (``/collect_experience``), else the
decision alone. In each stream, by time, consecutive decisions that all have outcomes form a run;
a run ends at an outcome that says ``terminated`` or ``truncated`` (its next observation is the
one the outcome carries), or before a decision without an outcome (whose observation is then the
run's last). Runs whose end the client never reported (the stream's last) lose their last step,
whose next observation is unknown.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from policy_server.experience_log.records import LogRecord, parse_ref

Key = tuple[str, str, int]  # policy, request id, row


@dataclass(frozen=True)
class Episode:
    """A run of ``T`` steps of one stream.

    observations    (T+1, *shape) of the logged dtype: the last one is after the last step
    actions         float64 (T, k): the logged actions (an index, indices, or a vector)
    rewards         float64 (T,)
    log_probs       float64 (T,)
    model_versions  int64 (T,)
    """

    stream: str
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    log_probs: np.ndarray
    model_versions: np.ndarray
    request_ids: tuple[str, ...]
    terminated: bool
    truncated: bool

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def ended(self) -> bool:
        """The client reported the episode's end (terminated or truncated)."""
        return self.terminated or self.truncated


def _key(r: LogRecord) -> Key:
    return (r.policy, r.request_id, r.row)


def stream_of(d: LogRecord) -> str:
    if d.episode_id is not None:
        return f"{d.policy}/episode/{d.episode_id}"
    if d.client_id is not None:
        return f"{d.policy}/client/{d.client_id}"
    return f"{d.policy}/request/{d.request_id}/{d.row}"


def attach(records: Iterable[LogRecord]) -> tuple[list[LogRecord], dict[Key, LogRecord]]:
    """The decisions, and each one's outcome (by the decision's key), as the module describes."""
    records = sorted(records, key=lambda r: (r.time_ns, r.row))
    decisions = [r for r in records if r.kind == "decision"]
    outcomes = [r for r in records if r.kind == "outcome"]
    by_key = {_key(d): d for d in decisions}
    by_client: dict[tuple[str, str], list[LogRecord]] = defaultdict(list)
    for d in decisions:
        if d.client_id is not None:
            by_client[(d.policy, d.client_id)].append(d)
    times = {client: [d.time_ns for d in ds] for client, ds in by_client.items()}
    ended_calls = {(o.policy, o.request_id) for o in outcomes if o.ref is None and (o.terminated or o.truncated)}
    attached: dict[Key, LogRecord] = {}
    for o in outcomes:
        if o.ref is not None:
            request_id, row = parse_ref(o.ref)
            target = by_key.get((o.policy, request_id, row))
        else:
            client = (o.policy, o.client_id or "")
            i = bisect.bisect_left(times.get(client, []), o.time_ns)  # the latest decision before it
            target = by_client[client][i - 1] if i else None
            if target is not None and (target.policy, target.request_id) in ended_calls:
                target = None
        if target is not None:
            attached.setdefault(_key(target), o)
    return decisions, attached


def episodes(records: Iterable[LogRecord]) -> list[Episode]:
    """Every run of every stream, ended or not, ordered by stream then time."""
    decisions, attached = attach(records)
    streams: dict[str, list[LogRecord]] = defaultdict(list)
    for d in decisions:
        streams[stream_of(d)].append(d)
    found = []
    for stream, ds in streams.items():
        run: list[tuple[LogRecord, LogRecord]] = []
        for d in ds:
            o = attached.get(_key(d))
            if o is None:
                if run:
                    found.append(_episode(stream, run, d.obs, False, False))
                run = []
                continue
            run.append((d, o))
            if (o.terminated or o.truncated) and o.obs is not None:
                found.append(_episode(stream, run, o.obs, bool(o.terminated), bool(o.truncated and not o.terminated)))
                run = []
        if len(run) > 1:  # the last step's next observation is unknown
            found.append(_episode(stream, run[:-1], run[-1][0].obs, False, False))
    return found


def _episode(stream: str, run: list[tuple[LogRecord, LogRecord]], last: np.ndarray | None,
             terminated: bool, truncated: bool) -> Episode:
    assert last is not None, "decisions always hold their observation"
    return Episode(
        stream=stream,
        observations=np.stack([d.obs for d, _ in run] + [last]),
        actions=np.stack([d.action for d, _ in run]),
        rewards=np.array([o.reward for _, o in run], dtype=np.float64),
        log_probs=np.array([d.log_prob for d, _ in run], dtype=np.float64),
        model_versions=np.array([d.model_version for d, _ in run], dtype=np.int64),
        request_ids=tuple(d.request_id for d, _ in run),
        terminated=terminated,
        truncated=truncated,
    )
