"""The experience a trainer acknowledged and no checkpoint holds yet, on disk (``experience.journal``).

A trainer appends each batch it accepts, and the append is on disk (fsynced) before the client
gets its answer. A checkpoint records the journal's sequence number that it covers and the
journal forgets what came before; a trainer that restarts after its process died resumes the
newest checkpoint and adds the batches journaled after it. So no acknowledged step is lost.

One file of records, each ``uint64 seq | uint32 length | safetensors``: the batch's arrays in
safetensors (no pickle: reading a journal runs no code), its client id in the metadata. A record
that a crash cut short ends the journal; the next append writes over it. safetensors is the
library; the framing around it is ours (no kept library appends records with fsync).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import numpy as np
from safetensors.numpy import load, save

from policy_server.files import atomic_file, write_durably_at
from policy_server.training.experience import ExperienceBatch

FILE = "experience.journal"
_HEADER = struct.Struct("<QI")


def encode(seq: int, batch: ExperienceBatch) -> bytes:
    """One record: ``seq``, then the batch as safetensors (arrays contiguous, client id as metadata)."""
    arrays = {f.name: np.ascontiguousarray(getattr(batch, f.name)) for f in fields(batch)
              if f.name != "client_id" and getattr(batch, f.name) is not None}  # masks may be None
    data = save(arrays, metadata={"client_id": batch.client_id})
    return _HEADER.pack(seq, len(data)) + data


def decode(data: bytes) -> ExperienceBatch:
    """The batch of a record's safetensors bytes. safetensors' numpy API returns no metadata, so
    the client id is read from the format's header (8-byte little-endian length, then JSON)."""
    header_length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + header_length]).get("__metadata__", {})
    return ExperienceBatch(**load(data), client_id=metadata.get("client_id", ""))


class ExperienceJournal:
    """The journal of one trainer, in ``folder`` (its checkpoint folder)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records = list(self._records())
        self.last_seq = records[-1][0] if records else 0
        self._end = sum(_HEADER.size + len(data) for _, data in records)  # a torn tail is written over

    def append(self, batch: ExperienceBatch) -> int:
        """Write ``batch`` and fsync it; returns its sequence number (1, 2, ...)."""
        self.last_seq += 1
        record = encode(self.last_seq, batch)
        self._end = write_durably_at(self.path, self._end, record)  # over a record a crash cut short, if any
        return self.last_seq

    def since(self, seq: int) -> Iterator[tuple[int, ExperienceBatch]]:
        """The batches journaled after ``seq``, oldest first."""
        for record_seq, data in self._records():
            if record_seq > seq:
                yield record_seq, decode(data)

    def forget_through(self, seq: int) -> None:
        """Drop the records up to ``seq`` (a checkpoint holds them now); the rest is rewritten atomically."""
        keep = [_HEADER.pack(s, len(d)) + d for s, d in self._records() if s > seq]
        with atomic_file(self.path) as f:
            f.write(b"".join(keep))
        self._end = sum(len(r) for r in keep)

    def _records(self) -> Iterator[tuple[int, bytes]]:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        offset = 0
        while offset + _HEADER.size <= len(data):
            seq, length = _HEADER.unpack_from(data, offset)
            end = offset + _HEADER.size + length
            if end > len(data):
                return  # cut short by a crash
            yield seq, data[offset + _HEADER.size:end]
            offset = end
