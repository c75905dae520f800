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
_STOP_CALLS = ("vhost_net_stop", "vhost_dev_stop")


def inferred_timeline(records: Any) -> list[dict]:
    """Timeline entries (as ``CallTimelineView`` draws them) inferred from a back-end's
    trace of a real QEMU: which vhost.c function sent each message
    (:func:`vhostlab.qemu.inference.infer_calls`), with ``vhost_log_put``'s final
    sync after a stop that came with logging on. QEMU does not say; this is a reading."""
    from vhostlab.qemu.inference import infer_calls

    records = list(resolve(records, "trace") if not isinstance(records, (list, tuple))
                   else records)
    out: list[dict] = []
    logged, stop_depth = False, None
    for e in infer_calls(records):
        if e["kind"] == "call" and e["name"] in _STOP_CALLS:
            stop_depth = e["depth"] if stop_depth is None else min(stop_depth, e["depth"])
        elif e["kind"] == "call" and stop_depth is not None and e["depth"] <= stop_depth:
            if logged:
                out.append(_final_sync(stop_depth + 2))
            stop_depth = None
        if e["kind"] == "message" and e["name"] == "SET_LOG_BASE":
            logged = True
        out.append(e)
    if stop_depth is not None and logged:
        out.append(_final_sync(stop_depth + 2))
    return out


def _final_sync(depth: int) -> dict:
    return {"kind": "event", "name": "vhost_log_put(dev, true): the final log sync",
            "depth": depth, "detail": {"message": "none: QEMU reads the shared log itself"}}
