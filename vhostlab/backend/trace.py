"""The message trace: every vhost-user message in and out, for the labs and `--trace FILE`.

Each record holds the time, the direction (``TO_BACKEND``, "front-end to
back-end", or ``TO_FRONTEND``: named by sender and receiver, so a front-end's
trace says it the same way), the decoded fields (the protocol layer's
`Message.fields()`), the raw bytes and the number of fds that rode with
them. Records are frozen: fields are turned into tuples and read-only
mappings, so a notebook can keep and draw them while the server runs.
The in-process view keeps the last `maxlen` records in a bounded deque;
`--trace FILE` also appends every record to FILE as one JSON line.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from types import MappingProxyType
from typing import IO, Any, Mapping

DEFAULT_MAXLEN = 10000


def freeze(value: Any) -> Any:
    """A read-only deep copy of JSON-like data: dicts become mappingproxies, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return value


def thaw(value: Any) -> Any:
    """The JSON-ready form of frozen data (bytes as hex strings)."""
    if isinstance(value, Mapping):
        return {str(k): thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value


@dataclass(frozen=True)
class TraceRecord:
    """One message on the wire: when, which way, what it said, its bytes and fd count."""

    seq: int
    time: float
    connection: int
    direction: str
    request: str
    fields: Mapping[str, Any]
    raw: bytes
    nfds: int
    error: str | None = None

    def to_dict(self) -> dict:
        return {"seq": self.seq, "time": self.time, "connection": self.connection,
                "direction": self.direction, "request": self.request,
                "fields": thaw(self.fields), "raw": self.raw.hex(), "nfds": self.nfds,
                "error": self.error}


class MessageTrace:
    """A bounded, thread-safe record of messages; optionally mirrored to a JSON-lines file."""

    def __init__(self, maxlen: int = DEFAULT_MAXLEN, path: str | None = None):
        self._records: deque[TraceRecord] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._seq = 0
        self._file: IO[str] | None = open(path, "a", encoding="utf-8") if path else None

    def record(self, direction: str, request: str, fields: Mapping[str, Any], raw: bytes,
               nfds: int = 0, connection: int = 0, error: str | None = None) -> TraceRecord:
        """Add one record and return it."""
        with self._lock:
            self._seq += 1
            rec = TraceRecord(self._seq, time.time(), connection, direction, request,
                              freeze(fields), bytes(raw), nfds, error)
            self._records.append(rec)
            if self._file is not None:
                self._file.write(json.dumps(rec.to_dict()) + "\n")
                self._file.flush()
        return rec

    def records(self, since: int = 0) -> tuple[TraceRecord, ...]:
        """The kept records with seq > `since`, oldest first (an immutable copy)."""
        with self._lock:
            return tuple(r for r in self._records if r.seq > since)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
