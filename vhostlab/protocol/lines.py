"""Which way a message went, and one message as one line of text.

Every trace in the kit (the back-end's, the built-in front-end's, the
recording of QEMU 7.2) says a message's direction the same way, by its
sender and receiver as vhost-user.rst names them, whoever recorded it:
``TO_BACKEND`` ("front-end to back-end", requests) or ``TO_FRONTEND``
("back-end to front-end", replies).

:func:`format_message` is the line every narration prints for a message:
``-> SET_LOG_BASE {mmap_size=0x2000, mmap_offset=0x0} + 1 fd``, "->" for
front-end to back-end, "<-" for back-end to front-end. A message a relay
rewrote on purpose (the DPDK negative control) says so at the end:
``[the relay took VHOST_F_LOG_ALL out on the way]``.
"""
from __future__ import annotations

from typing import Any, Mapping

from .constants import FLAG_NEED_REPLY

__all__ = ["TO_BACKEND", "TO_FRONTEND", "format_message", "format_record"]

TO_BACKEND = "front-end to back-end"
TO_FRONTEND = "back-end to front-end"

_HEX_FIELDS = ("addr", "size", "offset")     # addresses and sizes read best in hex


def _value(key: str, v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int) and any(h in key for h in _HEX_FIELDS):
        return hex(v)
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}={_value(str(k), x)}" for k, x in v.items()) + "}"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_value(key, x) for x in v) + "]"
    return str(v)


def format_message(direction: str, request: str, fields: Mapping[str, Any], nfds: int) -> str:
    """One message as a line: arrow, request, decoded payload, need_reply, fds.

    A feature mask that comes with its ``names`` is shown by its names only.
    """
    arrow = "->" if direction == TO_BACKEND else "<-"
    payload = fields.get("payload") or {}
    text = f"{arrow} {request}"
    if isinstance(payload, Mapping):
        shown = {k: v for k, v in payload.items() if not (k == "value" and "names" in payload)}
        if shown:
            text += " " + _value("", shown)
    else:
        text += f" {_value('', payload)}"
    if fields.get("flags", 0) & FLAG_NEED_REPLY:
        text += " (need_reply)"
    if nfds:
        text += f" + {nfds} fd{'s' if nfds > 1 else ''}"
    if "rewritten_from" in fields:
        text += f" [{_rewritten(fields['rewritten_from'], payload)}]"
    return text


def _rewritten(sent: Any, passed: Any) -> str:
    """What a relay changed in a message: the feature names it took out or put in,
    or else the payload as its sender wrote it."""
    if isinstance(sent, Mapping) and isinstance(passed, Mapping) \
            and "names" in sent and "names" in passed:
        out = [n for n in sent["names"] if n not in passed["names"]]
        put = [n for n in passed["names"] if n not in sent["names"]]
        said = ([f"took {', '.join(out)} out"] if out else []) + \
            ([f"put {', '.join(put)} in"] if put else [])
        if said:
            return "the relay " + " and ".join(said) + " on the way"
    return f"the relay rewrote it; the sender wrote {_value('', sent)}"


def format_record(record: Any) -> str:
    """:func:`format_message` for a trace record (direction, request, fields, nfds)."""
    return format_message(record.direction, record.request, record.fields, record.nfds)
