"""The VhostOps table: each op, its vhost-user message, its vhost-kernel ioctl.

QEMU's hw/virtio/vhost.c calls every back-end through ``struct VhostOps``;
``kernel_ops`` turns an op into an ioctl on /dev/vhost-net, ``user_ops`` into
a vhost-user message. The rows come from the front-end layer's table
(``VHOST_OPS_TABLE``: one ``OpInfo`` per op of the seed); the view only draws
them, marks the ops live migration uses, and, given a front-end device, counts
how often each op was called so far (its ``ops_called`` list, read live).
Given ``coverage`` (op -> text, e.g. ``vhostlab.qemu.stepper.coverage_column()``)
it adds the column "called by real QEMU here, by which action"; ops in the
coverage that the seed's table lacks (newer QEMU ops) are named under it.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping

from ._common import View, esc, field, resolve, table, wrap


def default_ops_table() -> tuple:
    """The front-end layer's VhostOps table (imported when first needed)."""
    from vhostlab.frontend.optable import VHOST_OPS_TABLE
    return VHOST_OPS_TABLE


def _message_cell(row: Any) -> str:
    user = field(row, "user", default=True)
    messages = tuple(field(row, "messages", "message", default=()) or ())
    if isinstance(messages, str):
        messages = (messages,)
    if not user:
        return "<span class='muted'>none: user_ops leaves it NULL</span>"
    if field(row, "local", default=False) or not messages:
        return "<span class='muted'>none (answered locally)</span>"
    return " / ".join(f"<b>{esc(m)}</b>" for m in messages)


def _ioctl_cell(row: Any) -> str:
    kernel = field(row, "kernel", default=True)
    ioctl = field(row, "kernel_ioctl", "ioctl", default=None)
    if not kernel:
        return "<span class='muted'>none: kernel_ops leaves it NULL</span>"
    if ioctl is None:
        return "<span class='muted'>set, but issues no ioctl</span>"
    return esc(ioctl)


class VhostOpsTableView(View):
    """The seed's VhostOps table, optionally with call counts from a device.

    ``rows``: the table (default: the front-end layer's ``VHOST_OPS_TABLE``);
    ``device``: anything with an ``ops_called`` list of op names (a VhostDev,
    a demo summary dict), read at every render; ``only_migration`` keeps the
    ops migration uses; ``coverage`` (op -> text starting "yes" or "no") adds
    the column :data:`COVERAGE_HEADER`.
    """

    def __init__(self, rows: Iterable[Any] | None = None, device: Any = None,
                 only_migration: bool = False, title: str | None = "VhostOps",
                 coverage: Mapping[str, str] | None = None) -> None:
        self.rows = rows
        self.device = device
        self.only_migration = only_migration
        self.title = title
        self.coverage = coverage

    def _calls(self) -> Counter | None:
        if self.device is None:
            return None
        called = field(resolve(self.device), "ops_called", default=None)
        if called is None:
            return None
        return Counter(str(field(c, "op", "name", default=c)) for c in list(called))

    def to_html(self) -> str:
        rows = list(self.rows if self.rows is not None else default_ops_table())
        if self.only_migration:
            rows = [r for r in rows if field(r, "migration", default=False)]
        calls = self._calls()
        headers = ["op", "vhost-user message", "vhost-kernel ioctl", "live migration", "note"]
        if calls is not None:
            headers.append("called")
        cover = dict(self.coverage) if self.coverage is not None else None
        if cover is not None:
            headers.append(COVERAGE_HEADER)
        cells, classes = [], []
        for row in rows:
            name = str(field(row, "name", "op"))
            mig = bool(field(row, "migration", default=False))
            line = [f"<b>{esc(name)}</b>", _message_cell(row), _ioctl_cell(row),
                    "uses it" if mig else "", esc(field(row, "note", default=""))]
            if calls is not None:
                n = calls.get(name, 0)
                line.append(f"<b>{n}</b>" if n else "<span class='muted'>0</span>")
            if cover is not None:
                line.append(_coverage_cell(cover.get(name)))
            cells.append(line)
            classes.append("mig" if mig else "")
        nmig = sum(1 for c in classes if c)
        caption = (f"{len(rows)} ops; {nmig} used by live migration (highlighted)")
        extra = ""
        if cover is not None:
            names = {str(field(r, "name", "op")) for r in rows}
            called = sum(1 for r in rows if str(cover.get(str(field(r, "name", "op")), ""))
                         .startswith("yes"))
            caption += f"; {called} called by real QEMU here"
            newer = [(op, text) for op, text in cover.items()
                     if op not in names and text.startswith("yes")]
            if newer:
                extra = ("<div class='muted'>Also called, newer than the seed's list: "
                         + "; ".join(f"<b>{esc(op)}</b> ({esc(text[4:].strip())})"
                                     for op, text in newer) + "</div>")
        return wrap(table(headers, cells, caption=caption, row_classes=classes) + extra,
                    self.title, view="vhostops-table")


COVERAGE_HEADER = "called by real QEMU here, by which action"


def _coverage_cell(text: str | None) -> str:
    if not text:
        return "<span class='muted'>not recorded</span>"
    if text.startswith("yes"):
        return f"<b>yes:</b> {esc(text[4:].strip())}" if text.startswith("yes:") \
            else f"<b>{esc(text)}</b>"
    return f"<span class='muted'>{esc(text)}</span>"
