"""Shared pieces of the views: reading duck-typed state, escaping, hex dumps.

Every view in this package draws from a state object of a lower layer (a
back-end, a front-end, a ring, a dirty log, or a snapshot dataclass of one of
them) and reads it again each time it renders, so a view never shows a copy
the notebook made up. ``field()`` reads one value from such an object whether
it is a dataclass, a plain object or a dict, so the views stay loosely tied to
the classes of the lower layers.

Text that came from a front-end or a guest (request names, decoded fields,
raw bytes) is hostile: every string that goes into HTML or SVG passes through
``esc()`` (html.escape with quotes).
"""
from __future__ import annotations

import html
from typing import Any, Iterable

_MISSING = object()

#: The style sheet every HTML view carries (scoped under ``.vhl``), so that the
#: views look the same in JupyterLab, Voila, nbconvert HTML and GitHub.
CSS = """
<style>
.vhl {font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
      font-size: 12px; color: #222;}
.vhl table {border-collapse: collapse; margin: 4px 0;}
.vhl th, .vhl td {border: 1px solid #ccc; padding: 1px 6px; text-align: left;
                  vertical-align: top;}
.vhl th {background: #eee;}
.vhl caption {text-align: left; font-weight: bold; padding: 2px 0;}
.vhl .in {color: #1a5fb4;} .vhl .out {color: #26a269;}
.vhl .muted {color: #888;}
.vhl .bad {color: #c01c28; font-weight: bold;}
.vhl pre {margin: 2px 0; font-size: 11px;}
.vhl details summary {cursor: pointer; color: #555;}
.vhl .ptr {font-weight: bold; color: #c01c28;}
.vhl table.ring td {text-align: right; padding: 1px 3px; min-width: 2.2em;}
.vhl table.ring th {padding: 1px 3px; font-weight: normal; color: #666; text-align: right;}
.vhl table.ring .ptr {font-size: 10px; white-space: nowrap; text-align: left;}
.vhl table.ring .muted {font-size: 10px;}
.vhl .mig {background: #fff3cd;}
</style>
"""


def esc(value: Any) -> str:
    """Escape any value for HTML text or an attribute (quotes included)."""
    return html.escape(str(value), quote=True)


def field(obj: Any, *names: str, default: Any = _MISSING) -> Any:
    """Return the first of ``names`` that ``obj`` has, as attribute or key.

    Raises:
        AttributeError: none of the names exists and no default was given.
    """
    record_names = getattr(getattr(obj, "dtype", None), "names", None)
    for name in names:
        if isinstance(obj, dict):
            if name in obj:
                return obj[name]
        elif record_names is not None:
            # A numpy structured record (the ring layer keeps ring state so).
            if name in record_names:
                return obj[name]
        elif hasattr(obj, name):
            return getattr(obj, name)
    if default is _MISSING:
        raise AttributeError(
            f"{type(obj).__name__} has none of the fields {', '.join(names)}")
    return default


def as_int(value: Any) -> int:
    """An int from an int, a numpy scalar or a one-element array (a live u16 view)."""
    if hasattr(value, "reshape") and getattr(value, "ndim", 0) > 0:
        value = value.reshape(-1)[0]
    return int(value)


def resolve(source: Any, *methods: str) -> Any:
    """Read a live source: call the first snapshot-like method it has.

    A back-end, front-end or dirty log hands out a consistent copy of its state
    through a method (``snapshot()``, ``state()``...). Snapshot dataclasses and
    plain data have none and are returned as they are. A zero-argument callable
    is called, so a view may also take ``lambda: backend.state().rings[0]``.
    """
    for name in methods:
        method = getattr(source, name, None)
        if callable(method):
            return method()
    if callable(source) and not isinstance(source, type) and not hasattr(source, "__len__"):
        return source()
    return source


def rounds_of(source: Any) -> list[Any]:
    """The per-round snapshots of a migration, read now.

    ``source``: a list of them, or a migration object holding them as
    ``snapshots`` or as a ``rounds`` list (a ``rounds`` int, the number of
    rounds asked for, is not taken for the list), directly or in what its
    ``snapshot()`` or ``progress()`` returns.
    """
    src = resolve(source, "snapshot", "progress")
    if isinstance(src, (list, tuple)):
        return list(src)
    for name in ("snapshots", "rounds", "round_snapshots"):
        value = field(src, name, default=None)
        value = value() if callable(value) else value
        if isinstance(value, (list, tuple)):
            return list(value)
    return []


def hexdump(data: bytes, limit: int = 4096) -> str:
    """Classic 16-bytes-a-line hex dump (offset, hex, ASCII), capped at ``limit``."""
    data = bytes(data)
    shown = data[:limit]
    lines = []
    for off in range(0, len(shown), 16):
        chunk = shown[off:off + 16]
        hexpart = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:08x}  {hexpart:<47}  {text}")
    if len(data) > limit:
        lines.append(f"... {len(data) - limit} more bytes")
    return "\n".join(lines)


def fmt_hex(value: Any) -> str:
    """Format an integer as 0x..., anything else as its str()."""
    try:
        return f"{int(value):#x}"
    except (TypeError, ValueError):
        return str(value)


def fmt_size(n: int) -> str:
    """Human size in binary units: 4096 -> '4 KiB', 0xff00000 -> '255 MiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    value, i = float(int(n)), 0
    while abs(value) >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{value:.0f} {units[i]}" if value == int(value) else f"{value:.1f} {units[i]}"


#: Fields that count things read better in decimal; addresses, sizes of
#: mappings and feature masks read better in hex.
DECIMAL_KEYS = frozenset({"num", "index", "nregions", "size", "fds", "id", "len", "queue",
                          "count", "status", "num_queues", "queue_size", "padding", "round"})


def plain(value: Any, depth: int = 0, key: str | None = None) -> str:
    """Render a decoded field value (ints, strings, lists, dicts) as short text.

    Integers are hex (as in QEMU's traces) unless ``key`` names a count.
    """
    if depth > 3:
        return "..."
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value) if value <= 9 or key in DECIMAL_KEYS else f"{value:#x}"
    if isinstance(value, (list, tuple)):
        items = [plain(v, depth + 1, key) for v in list(value)[:32]]
        more = ", ..." if len(value) > 32 else ""
        return "[" + ", ".join(items) + more + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {plain(v, depth + 1, str(k))}"
                               for k, v in value.items()) + "}"
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return data[:32].hex() + ("..." if len(data) > 32 else "")
    return str(value)


def wrap(body: str, title: str | None = None, view: str | None = None) -> str:
    """Put a view's body inside the scoped ``.vhl`` container with the CSS;
    ``view`` names it in ``data-view`` (so tests and browsers can find it)."""
    head = f"<div class='vhl-title'><b>{esc(title)}</b></div>" if title else ""
    data = f" data-view='{esc(view)}'" if view else ""
    return f"{CSS}<div class='vhl'{data}>{head}{body}</div>"


def table(headers: Iterable[str], rows: Iterable[Iterable[str]],
          caption: str | None = None, row_classes: Iterable[str] | None = None) -> str:
    """An HTML table; cells are given already escaped (they may hold markup)."""
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    classes = list(row_classes) if row_classes is not None else None
    body = []
    for i, row in enumerate(rows):
        cls = f" class='{esc(classes[i])}'" if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class View:
    """Base of every static view: renders HTML from its source on each call.

    Subclasses implement ``to_html()``. Jupyter (Lab, Voila, nbconvert,
    GitHub's preview) calls ``_repr_html_``, which renders afresh, so the same
    view object shows the current state each time it is displayed.
    """

    def to_html(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _repr_html_(self) -> str:
        return self.to_html()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: display in a notebook to see it>"
