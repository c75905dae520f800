"""The message trace as a table: time, direction, request, decoded fields, bytes.

Each row is one vhost-user message (vhost-user.rst, "Message Specification":
a 12-byte header ``request, flags, size`` then the payload, fds beside it as
SCM_RIGHTS ancillary data). Decoded fields come from the protocol layer's
``Message.fields()`` as the back-end or front-end recorded them; the raw bytes
sit in an HTML ``<details>`` with a hex dump, opened on demand.

Everything here came from a front-end (or a back-end) and is escaped.
"""
from __future__ import annotations

import datetime
from typing import Any, Iterable, Mapping

from vhostlab.protocol.constants import FLAG_REPLY
from vhostlab.protocol import TO_BACKEND, TO_FRONTEND

from ._common import View, esc, field, hexdump, plain, table, wrap


#: How each direction (``vhostlab.protocol.TO_BACKEND`` / ``TO_FRONTEND``,
#: the same in every trace) is shown.
LABELS = {TO_BACKEND: "front-end \u2192 back-end", TO_FRONTEND: "back-end \u2192 front-end"}


def trace_records(source: Any) -> list[Any]:
    """The records a source holds, oldest first, read now.

    Accepts a trace (``records()``), anything with a ``trace`` (a back-end, a
    front-end, a state snapshot), an object with ``state()``/``snapshot()``
    holding one of those, a zero-argument callable returning one, or a plain
    sequence of records, protocol Messages or ``(direction, Message)`` pairs.
    """
    src = source
    for _ in range(5):
        if isinstance(src, (list, tuple)):
            return list(src)
        if callable(src) and not isinstance(src, type) and not any(
                hasattr(src, n) for n in ("records", "trace", "state", "snapshot")):
            src = src()          # a zero-argument callable returning a source
            continue
        method = getattr(src, "records", None)
        if callable(method):
            return list(method())
        inner = field(src, "trace", "message_trace", default=None)
        if inner is not None:
            src = inner() if callable(inner) and not hasattr(inner, "records") else inner
            continue
        for name in ("state", "snapshot"):
            method = getattr(src, name, None)
            if callable(method):
                src = method()
                break
        else:
            return list(src)
    raise TypeError(f"cannot find message records in {type(source).__name__}")


def record_row(item: Any) -> dict:
    """Normalise a trace record, a Message or a (direction, Message) pair."""
    direction, nfds = None, None
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        nfds = getattr(item, "nfds", None)  # a recording says how many fds rode along
        direction, item = item
    if hasattr(item, "to_bytes") and callable(getattr(item, "fields", None)):
        fields = item.fields()
        raw = item.to_bytes()
        nfds = len(field(item, "fds", default=()) or ()) if nfds is None else nfds
        req = field(item, "request")
        return {"time": None, "direction": direction, "request": getattr(req, "name", req),
                "fields": fields, "raw": raw, "nfds": nfds, "error": None,
                "flags": field(item, "flags", default=None)}
    fields = field(item, "fields", default={}) or {}
    raw = field(item, "raw", "data", default=b"") or b""
    if isinstance(raw, str):
        try:
            raw = bytes.fromhex(raw)
        except ValueError:
            raw = raw.encode("utf-8", "replace")
    req = field(item, "request", "name", default="?")
    return {"time": field(item, "time", "timestamp", default=None),
            "direction": field(item, "direction", default=direction),
            "request": getattr(req, "name", req), "fields": fields, "raw": bytes(raw),
            "nfds": field(item, "nfds", "fd_count", "num_fds", default=0),
            "error": field(item, "error", default=None),
            "flags": fields.get("flags") if isinstance(fields, Mapping) else None}


def _is_reply(row: dict) -> bool | None:
    flags = row["flags"]
    if flags is None and len(row["raw"]) >= 8:
        flags = int.from_bytes(row["raw"][4:8], "little")
    try:
        return bool(int(flags) & FLAG_REPLY)
    except (TypeError, ValueError):
        return None


_HEADER_KEYS = ("request", "id", "flags", "reply", "need_reply", "size", "fds")


def _lines(key: str, value: Any, depth: int) -> list[str]:
    pad = "&nbsp;&nbsp;" * depth
    if isinstance(value, Mapping):
        out = [f"{pad}{esc(key)}:"] if key else []
        for k, v in value.items():
            out.extend(_lines(str(k), v, depth + (1 if key else 0)))
        return out
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], Mapping):
        out = [f"{pad}{esc(key)}:"]
        for i, item in enumerate(list(value)[:16]):
            inner = ", ".join(f"{esc(k)}={esc(plain(v, key=str(k)))}" for k, v in item.items())
            out.append(f"{pad}&nbsp;&nbsp;[{i}] {inner}")
        if len(value) > 16:
            out.append(f"{pad}&nbsp;&nbsp;... {len(value) - 16} more")
        return out
    return [f"{pad}{esc(key)} = {esc(plain(value, key=key))}"]


def fields_html(fields: Any) -> str:
    """Decoded fields: the header on one line, then the payload, one field a line.

    Lists of dicts (SET_MEM_TABLE's regions) get one item a line.
    """
    if not isinstance(fields, Mapping):
        return esc(plain(fields))
    head = []
    flags = fields.get("flags")
    if isinstance(flags, int):
        bits = [n for n in ("reply", "need_reply") if fields.get(n)]
        head.append(f"flags {flags:#x}" + (f" ({', '.join(bits)})" if bits else ""))
    for key in ("size",):  # the fd count is shown beside the bytes
        if key in fields:
            head.append(f"{key} {plain(fields[key], key=key)}")
    summary = " \u00b7 ".join(head)
    lines = [f"<span class='muted'>{esc(summary)}</span>"] if head else []
    for key, value in fields.items():
        if key in _HEADER_KEYS:
            continue
        if key == "payload":
            if value is None:
                continue
            lines.extend(_lines("", value, 0) if isinstance(value, Mapping)
                         else _lines("payload", value, 0))
        else:
            lines.extend(_lines(str(key), value, 0))
    return "<br>".join(lines)


class TraceView(View):
    """The vhost-user messages of a trace, newest last.

    ``source``: a back-end, a front-end, a MessageTrace, a list of records or
    of protocol Messages; read again at every render. ``limit`` caps the rows
    (the last ``limit`` are shown), ``requests`` keeps only those request
    names, ``since`` skips records with ``seq`` up to it.
    """

    def __init__(self, source: Any, limit: int = 200, requests: Iterable[str] | None = None,
                 since: int = 0, title: str | None = "vhost-user messages",
                 hexdump_limit: int = 1024) -> None:
        self.source = source
        self.limit = limit
        self.requests = None if requests is None else {str(r) for r in requests}
        self.since = since
        self.title = title
        self.hexdump_limit = hexdump_limit

    def rows(self) -> list[dict]:
        """The normalised rows the table shows, read from the source now."""
        records = [r for r in trace_records(self.source)
                   if field(r, "seq", default=self.since + 1) > self.since]
        rows = [record_row(r) for r in records]
        if self.requests is not None:
            rows = [r for r in rows if str(r["request"]) in self.requests]
        return rows

    def to_html(self) -> str:
        rows = self.rows()
        total = len(rows)
        shown = rows[-self.limit:] if self.limit else rows
        t0 = next((r["time"] for r in rows if isinstance(r["time"], (int, float))), None)
        cells = []
        for row in shown:
            cells.append(self._cells(row, t0))
        note = ""
        if total > len(shown):
            note = f"<div class='muted'>{total - len(shown)} earlier messages not shown</div>"
        caption = f"{total} message{'s' if total != 1 else ''}"
        return wrap(note + table(["time", "direction", "request", "decoded fields",
                                  "bytes"], cells, caption=caption), self.title,
                    view="trace")

    def _cells(self, row: dict, t0: float | None) -> list[str]:
        when = ""
        if isinstance(row["time"], (int, float)) and t0 is not None:
            stamp = datetime.datetime.fromtimestamp(row["time"]).strftime("%H:%M:%S.%f")[:-3]
            when = f"<span title='{esc(stamp)}'>+{(row['time'] - t0) * 1e3:.3f} ms</span>"
        d = row["direction"]
        label = LABELS.get(d, d or "")
        cls = "in" if d == TO_BACKEND else "out"
        reply = " <span class='muted'>(reply)</span>" if _is_reply(row) else ""
        request = f"<b>{esc(row['request'])}</b>{reply}"
        if row["error"]:
            request += f"<br><span class='bad'>{esc(row['error'])}</span>"
        raw = row["raw"]
        nfds = int(row["nfds"] or 0)
        fds = f", {nfds} fd{'s' if nfds != 1 else ''}" if nfds else ""
        dump = (f"<details><summary>{len(raw)} bytes{fds}</summary>"
                f"<pre>{esc(hexdump(raw, self.hexdump_limit))}</pre></details>")
        return [when, f"<span class='{cls}'>{esc(label)}</span>", request,
                fields_html(row["fields"]), dump]
