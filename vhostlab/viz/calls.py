"""The calling sequence: vhost.c functions, nested, with the messages each sent.

The seed describes live migration as calling sequences, e.g.
``vhost_log_global_start() -> vhost_migration_log() -> vhost_dev_set_log()
-> vhost_dev_set_features() -> vhost_set_features()``. The built-in
front-end records the same thing as it runs: a timeline of entries, each a
function entered (``kind`` "call", with its nesting ``depth``), a message on
the wire ("message", with the trace record) or a step of the caller's own
("event"). This view draws that timeline as an indented tree, so a learner
sees which function sent which message.
"""
from __future__ import annotations

from typing import Any, Mapping

from ._common import View, esc, field, plain, resolve, wrap
from .trace import FLAG_REPLY


def timeline_entries(source: Any) -> list[Any]:
    """The timeline of a front-end device (its ``timeline``), or a list, read now."""
    src = resolve(source, "snapshot")
    if isinstance(src, (list, tuple)):
        return list(src)
    return list(field(src, "timeline"))


def brief(fields: Any, limit: int = 120) -> str:
    """A one-line summary of a message's payload fields."""
    payload = fields.get("payload") if isinstance(fields, Mapping) else None
    if payload is None:
        return ""
    if isinstance(payload, Mapping):
        parts = []
        for k, v in payload.items():
            if isinstance(v, (list, tuple)) and v and isinstance(v[0], Mapping):
                parts.append(f"{k}: {len(v)}")
            else:
                parts.append(f"{k}={plain(v, key=str(k))}")
        text = ", ".join(parts)
    else:
        text = plain(payload)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class CallTimelineView(View):
    """A front-end device's timeline as an indented call tree with messages.

    ``source``: a VhostDev (anything with ``timeline``) or a list of entries;
    ``since``: skip the first entries (to show one step's calls); ``limit``
    caps the lines (the last ones are shown).
    """

    def __init__(self, source: Any, since: int = 0, limit: int = 400,
                 title: str | None = "Calls and messages", note: str | None = None) -> None:
        self.source = source
        self.since = since
        self.limit = limit
        self.title = title
        self.note = note

    @classmethod
    def inferred(cls, trace: Any, title: str | None = "Calls and messages (inferred)",
                 **kwargs: Any) -> "CallTimelineView":
        """A real QEMU's calls, inferred from a back-end's trace (``inferred_timeline``)."""
        note = ("Inferred: QEMU does not report which vhost.c function sent a message; "
                "this nesting is read from the message sequence by hw/virtio/vhost.c's "
                "calling sequences.")
        return cls(inferred_timeline(trace), title=title, note=note, **kwargs)

    def lines(self) -> list[tuple[int, str, str]]:
        """``(depth, kind, html)`` per entry, read from the source now."""
        out = []
        for entry in timeline_entries(self.source)[self.since:]:
            kind = str(field(entry, "kind", default="call"))
            name = str(field(entry, "name", default="?"))
            depth = int(field(entry, "depth", default=0))
            if kind == "message":
                record = field(entry, "record", default=None)
                fields = field(record, "fields", default={}) if record is not None else {}
                flags = fields.get("flags", 0) if isinstance(fields, Mapping) else 0
                reply = isinstance(flags, int) and bool(flags & FLAG_REPLY)
                arrow = "\u2190" if reply else "\u2192"
                cls = "out" if reply else "in"
                text = (f"<span class='{cls}'>{arrow} {esc(name)}"
                        f"{' reply' if reply else ''}</span> "
                        f"<span class='muted'>{esc(brief(fields))}</span>")
            elif kind == "event":
                detail = field(entry, "detail", default={}) or {}
                extra = ", ".join(f"{k}={plain(v, key=str(k))}" for k, v in dict(detail).items())
                text = f"<i>{esc(name)}</i> <span class='muted'>{esc(extra)}</span>"
            else:
                text = f"<b>{esc(name)}()</b>"
            out.append((depth, kind, text))
        return out

    def to_html(self) -> str:
        lines = self.lines()
        shown = lines[-self.limit:] if self.limit else lines
        note = ""
        if len(lines) > len(shown):
            note = f"<div class='muted'>{len(lines) - len(shown)} earlier lines not shown</div>"
        body = "".join(f"<div style='padding-left:{1.5 * d:.1f}em'>{t}</div>"
                       for d, _k, t in shown)
        calls = sum(1 for _d, k, _t in lines if k == "call")
        msgs = sum(1 for _d, k, _t in lines if k == "message")
        head = f"<div class='muted'>{calls} calls, {msgs} messages</div>"
        if self.note:
            head = f"<div><i>{esc(self.note)}</i></div>" + head
        return wrap(head + note + body, self.title, view="call-timeline")


# -- a real QEMU: the nesting inferred from the back-end's trace ---------------------
_LOG = ("vhost_log_global_start", "vhost_migration_log", "vhost_dev_set_log")
_OP = {"SEND_RARP": "vhost_migration_done", "GET_PROTOCOL_FEATURES": "vhost_backend_init",
       "SET_PROTOCOL_FEATURES": "vhost_backend_init", "GET_QUEUE_NUM": "vhost_backend_init",
       "GET_MAX_MEM_SLOTS": "vhost_backend_init", "SET_BACKEND_REQ_FD": "vhost_backend_init",
       "GET_STATUS": "vhost_user_get_status", "SET_STATUS": "vhost_user_set_status"}
VHOST_F_LOG_ALL = 1 << 26


def _payload(record: Any) -> dict:
    fields = field(record, "fields", default={}) or {}
    p = fields.get("payload") if isinstance(fields, Mapping) else None
    return p if isinstance(p, Mapping) else {}


def _path(req: str, payload: dict, nxt: str | None, prev: str | None, phase: str) -> tuple:
    """The vhost.c calls (outermost first) that send ``req``, and the phase after it."""
    op = _OP.get(req, "vhost_" + req.lower())
    if req == "GET_VRING_BASE":
        return ("vhost_dev_stop", "vhost_virtqueue_stop", op), "stop"
    if req == "SET_STATUS" and payload.get("value", payload.get("status")) == 0 and \
            "GET_VRING_BASE" in (nxt, prev):
        who = ("vhost_user_dev_start(dev, false)" if nxt == "GET_VRING_BASE"
               else "vhost_user_reset_status")
        return ("vhost_dev_stop", who, op), "stop"
    if phase in ("log", "unlog") and req in ("SET_FEATURES", "GET_STATUS", "SET_STATUS"):
        return (*_LOG, "vhost_dev_set_features", "vhost_set_features"), phase
    if phase in ("log", "unlog") and req == "SET_VRING_ADDR":
        return (*_LOG, "vhost_virtqueue_set_addr", op), phase
    if req == "SET_LOG_BASE" and phase != "start":
        return (*_LOG, "vhost_dev_log_resize", op), "log"
    if req == "SET_FEATURES" and nxt in ("SET_MEM_TABLE", "ADD_MEM_REG", "GET_STATUS"):
        if nxt != "GET_STATUS" or phase in ("init", "ready"):
            return ("vhost_dev_start", "vhost_dev_set_features", op), "start"
    if req == "SET_FEATURES" and phase == "logging" and not payload.get("value", 0) & \
            VHOST_F_LOG_ALL:
        return ("vhost_log_global_stop", *_LOG[1:], "vhost_dev_set_features", op), "unlog"
    if phase == "start" and req in ("GET_STATUS", "SET_STATUS") and prev == "SET_FEATURES":
        return ("vhost_dev_start", "vhost_dev_set_features", "vhost_set_features"), phase
    if phase == "start" and req in ("SET_MEM_TABLE", "ADD_MEM_REG", "SET_LOG_BASE"):
        return ("vhost_dev_start", "vhost_set_mem_table" if req != "SET_LOG_BASE" else op), phase
    if phase == "start" and req in ("SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR",
                                    "SET_VRING_KICK", "SET_VRING_CALL"):
        return ("vhost_dev_start", "vhost_virtqueue_start", op), phase
    if req == "SEND_RARP":
        return ("vhost_net_notify_migration_done", op), phase
    if phase == "init":
        return ("vhost_dev_init", op), phase
    return (op,), ("logging" if phase == "log" else "ready")


def inferred_timeline(records: Any) -> list[dict]:
    """Timeline entries (as ``CallTimelineView`` draws them) inferred from a back-end's
    trace of a real QEMU: which vhost.c function sent each message, by the
    calling sequences of hw/virtio/vhost.c. QEMU does not say; this is a reading."""
    records = list(resolve(records, "trace") if not isinstance(records, (list, tuple))
                   else records)
    ins = [r for r in records if field(r, "direction", default="in") == "in"]
    names = [str(field(r, "request")) for r in ins]
    out: list[dict] = []
    open_path: tuple = ()
    phase, logged, i = "init", False, -1
    for r in records:
        req = str(field(r, "request"))
        if field(r, "direction", default="in") != "in":
            out.append({"kind": "message", "name": req, "depth": len(open_path), "record": r})
            continue
        i += 1
        nxt = names[i + 1] if i + 1 < len(names) else None
        prev = names[i - 1] if i else None
        was = phase
        path, phase = _path(req, _payload(r), nxt, prev, phase)
        logged = logged or phase == "log"
        if was == "stop" and phase != "stop" and logged:
            out.append(_final_sync())
        if path[:-1] != open_path[:-1] or path[-1] != (open_path[-1] if open_path else None):
            common = 0
            while common < min(len(path), len(open_path)) and path[common] == open_path[common]:
                common += 1
            out += [{"kind": "call", "name": n, "depth": d}
                    for d, n in enumerate(path) if d >= common]
        open_path = path
        out.append({"kind": "message", "name": req, "depth": len(path), "record": r})
    if phase == "stop" and logged:
        out.append(_final_sync())
    return out


def _final_sync() -> dict:
    return {"kind": "event", "name": "vhost_log_put(dev, true): the final log sync",
            "depth": 1, "detail": {"message": "none: QEMU reads the shared log itself"}}
