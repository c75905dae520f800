"""The migration timeline: pages per pre-copy round, bytes sent, downtime.

Pre-copy live migration (QEMU migration/ram.c) sends all of RAM in round 1,
then in each later round the pages dirtied meanwhile: by the guest (QEMU's own
dirty bitmap) and by the vhost back-end (the vhost log, read by
vhost_log_sync). When what remains is small enough, the guest is stopped
(vhost_dev_stop: GET_VRING_BASE), the last pages are sent, and the destination
starts: the time the guest did not run is the downtime.

The view reads per-round snapshots from the migration object (or a list of
them) each time it renders, and draws a PNG with matplotlib (Agg, no pyplot)
plus a table of the same numbers.
"""
from __future__ import annotations

from typing import Any

from ._common import View, esc, field, fmt_size, resolve, rounds_of, table, wrap
from .png import data_uri, figure_png, new_figure

PAGE = 4096


def _int(obj: Any, *names: str) -> int | None:
    value = field(obj, *names, default=None)
    if value is None:
        return None
    try:
        return len(value) if isinstance(value, (set, frozenset, list, tuple)) else int(value)
    except (TypeError, ValueError):
        return None


def round_numbers(snap: Any, index: int, previous: Any = None) -> dict:
    """The numbers of one round, whatever the snapshot calls them.

    Returns a dict with ``round``, ``phase``, ``copied`` (pages sent this
    round), ``guest_dirty`` and ``log_dirty`` (what the dirty-bitmap sync
    before this round found: pages the guest wrote, pages the vhost log
    named), ``dirty`` (their union), ``remaining`` (pages left to send after
    this round, if the snapshot says; see ``rows_of``) and ``bytes``. A
    value the snapshot does not carry is None.
    """
    if field(snap, "dirty_sync_count", default=None) is not None:
        return _qemu_round(snap, index, previous)
    number = _int(snap, "round", "number", "index")
    copied = _int(snap, "pages_copied", "copied", "pages_sent", "sent_pages") or 0
    guest = _int(snap, "pages_dirtied_by_guest", "guest_dirty_pages", "guest_dirty",
                 "pages_guest")
    log = _int(snap, "pages_from_vhost_log", "pages_from_log", "log_dirty_pages",
               "log_dirty", "pages_logged", "pages_log")
    both = _int(snap, "pages_from_both", "pages_both") or 0
    dirty = _int(snap, "dirty_pages", "pages_dirty", "dirty")
    if dirty is None:
        dirty = (guest or 0) + (log or 0) - both
    nbytes = _int(snap, "bytes_sent", "bytes")
    phase = field(snap, "phase", default=None)
    return {
        "round": number if number is not None else index + 1,
        "phase": None if phase is None else str(phase),
        "copied": copied,
        "guest_dirty": guest,
        "log_dirty": log,
        "dirty": dirty,
        "remaining": _int(snap, "remaining_pages", "pages_remaining"),
        "bytes": nbytes if nbytes is not None else copied * PAGE,
    }


def _qemu_round(snap: Any, index: int, previous: Any) -> dict:
    """A real QEMU's round: query-migrate's counters at one dirty-bitmap sync.

    QEMU reports ``ram.transferred`` (bytes so far, zero pages nearly free)
    and ``ram.remaining`` (dirty pages left times the page size); the
    pages the vhost log named come from the back-end's log.
    """
    transferred = _int(snap, "transferred") or 0
    before = _int(previous, "transferred") or 0 if previous is not None else 0
    remaining = _int(snap, "remaining")
    status = field(snap, "status", "phase", default=None)
    return {
        "round": _int(snap, "dirty_sync_count") or index + 1,
        "phase": None if status is None else str(status),
        "copied": None,
        "guest_dirty": None,
        "log_dirty": _int(snap, "pages_logged", "pages_from_vhost_log"),
        "dirty": None,
        "remaining": None if remaining is None else remaining // PAGE,
        "bytes": max(0, transferred - before),
    }


def rows_of(rounds: list[Any]) -> list[dict]:
    """``round_numbers`` for every round, with ``remaining`` filled in.

    Without an explicit count, what remains after round r is what the next
    round's sync found dirty; after a stop-and-copy round nothing remains.
    """
    rows = [round_numbers(r, i, rounds[i - 1] if i else None) for i, r in enumerate(rounds)]
    for i, row in enumerate(rows):
        if row["remaining"] is None and row["copied"] is not None:
            if i + 1 < len(rows):
                row["remaining"] = rows[i + 1]["dirty"]
            elif row["phase"] and "stop" in row["phase"]:
                row["remaining"] = 0
    return rows


def _seconds(source: Any, *names: str) -> float | None:
    """A duration in seconds from fields named ..._s, ..._ms or bare."""
    for name in names:
        for suffix, scale in (("_s", 1.0), ("_ms", 1e-3), ("", 1.0)):
            value = field(source, name + suffix, default=None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value) * scale
    return None


def _bars(ax: Any, rows: list[dict]) -> None:
    """Pages sent per round beside the pages the sync found (guest, vhost log)."""
    xs = [r["round"] for r in rows]
    right, width = [x + 0.2 for x in xs], 0.4
    if any(r["copied"] is not None for r in rows):
        ax.bar([x - 0.2 for x in xs], [r["copied"] or 0 for r in rows], width=width,
               color="#3584e4", label="pages sent")
    else:
        right, width = xs, 0.6             # QEMU does not say pages per round
    guest = [r["guest_dirty"] or 0 for r in rows]
    log = [r["log_dirty"] or 0 for r in rows]
    if any(r["guest_dirty"] is not None for r in rows):
        ax.bar(right, guest, width=width, color="#f6d32d", label="found dirty: by the guest")
    if any(r["log_dirty"] is not None for r in rows):
        ax.bar(right, log, width=width, bottom=guest, color="#c01c28",
               label="found dirty: in the vhost log")
    if not any(guest) and not any(log) and any(r["dirty"] for r in rows):
        ax.bar(right, [r["dirty"] or 0 for r in rows], width=width, color="#e66100",
               label="dirty pages")
    values = [v for r in rows for v in (r["copied"], r["dirty"], r["log_dirty"],
                                        r["remaining"]) if v]
    log_scale = bool(values) and max(values) > 50 * min(values)
    if log_scale:
        # Round 1 sends all of RAM; a log scale keeps the later rounds visible.
        ax.set_yscale("log")
    known = [(r["round"], r["remaining"]) for r in rows if r["remaining"] is not None]
    if known:
        # 0 has no place on a log axis: drawn at the bottom edge instead.
        ax.plot([k[0] for k in known], [max(k[1], 0.8) if log_scale else k[1] for k in known],
                "k.-", label="left to send after the round")
    ax.set_xticks(xs)


def _bytes_axis(ax: Any, rows: list[dict]) -> Any:
    """A second axis: MiB sent so far, round by round."""
    ax2 = ax.twinx()
    total, cum = 0, []
    for r in rows:
        total += r["bytes"]
        cum.append(total / 2**20)
    ax2.plot([r["round"] for r in rows], cum, "--", color="#613583", label="MiB sent (total)")
    ax2.set_ylim(bottom=0, top=max(cum) * 1.1 if max(cum) > 0 else 1)
    ax2.set_ylabel("MiB sent (total)")
    return ax2


def _cell(value: Any) -> str:
    return "" if value is None else esc(value)


def rounds_table(rows: list[dict]) -> str:
    """The per-round numbers as an HTML table."""
    cells = [[_cell(r["round"]), _cell(r["phase"]), _cell(r["copied"]),
              _cell(r["guest_dirty"]), _cell(r["log_dirty"]), _cell(r["remaining"]),
              esc(fmt_size(r["bytes"]))] for r in rows]
    return table(["round", "phase", "pages sent", "found dirty: by the guest",
                  "found dirty: in the vhost log", "left after the round", "bytes sent"],
                 cells)


class MigrationTimelineView(View):
    """Remaining and dirty pages per round, bytes sent, and the downtime.

    ``source`` is a migration object (with its round snapshots as
    ``snapshots`` or a ``rounds`` list, and optionally ``downtime_s`` /
    ``downtime_ms`` and ``status``) or a list of round snapshots.
    """

    def __init__(self, source: Any, title: str | None = "Live migration, round by round",
                 downtime_s: float | None = None) -> None:
        self.source = source
        self.title = title
        self.downtime_s = downtime_s

    def data(self) -> dict:
        """Read the source now: per-round numbers, downtime, status."""
        src = resolve(self.source, "snapshot", "progress")
        rows = rows_of(rounds_of(src))
        downtime = self.downtime_s
        status = None
        if not isinstance(src, (list, tuple)):
            if downtime is None:
                downtime = _seconds(src, "downtime")
            if downtime is None:          # QEMU's query-migrate: "downtime" in ms
                query = field(src, "final_query", "last_query", default=None) or {}
                ms = query.get("downtime") if isinstance(query, dict) else None
                downtime = None if ms is None else float(ms) / 1e3
            status = field(src, "status", default=None)
        return {"rows": rows, "downtime_s": downtime,
                "status": None if status is None else str(getattr(status, "name", status))}

    def png(self) -> bytes:
        """The chart alone, as PNG bytes."""
        return self._png(self.data())

    def _png(self, d: dict) -> bytes:
        # A live view redraws ten times a second; plot again only on change.
        key = repr((d["rows"], d["downtime_s"]))
        cached = getattr(self, "_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        png = self._plot(d)
        self._cache = (key, png)
        return png

    @staticmethod
    def _plot(d: dict) -> bytes:
        rows = d["rows"]
        fig = new_figure(7.0, 3.2)
        ax = fig.add_subplot(1, 1, 1)
        if rows:
            _bars(ax, rows)
            ax2 = _bytes_axis(ax, rows)
            handles, labels = ax.get_legend_handles_labels()
            more = ax2.get_legend_handles_labels()
            fig.legend(handles + more[0], labels + more[1], loc="lower center", ncol=3,
                       fontsize=7, frameon=False)
            fig.subplots_adjust(bottom=0.32)
        ax.set_xlabel("round")
        ax.set_ylabel("pages (4 KiB)")
        title = "pre-copy rounds"
        if d["downtime_s"] is not None:
            title += f"; downtime {d['downtime_s'] * 1e3:.1f} ms"
        ax.set_title(title, fontsize=9)
        return figure_png(fig)

    def to_html(self) -> str:
        d = self.data()
        rows = d["rows"]
        img = f"<img src='{data_uri(self._png(d))}' alt='migration timeline'>"
        tab = rounds_table(rows)
        total = sum(r["bytes"] for r in rows)
        facts = [f"{len(rows)} round{'s' if len(rows) != 1 else ''}",
                 f"{fmt_size(total)} sent"]
        if d["downtime_s"] is not None:
            facts.append(f"downtime {d['downtime_s'] * 1e3:.1f} ms")
        if d["status"]:
            facts.append(f"status {d['status']}")
        return wrap(f"<div>{esc(', '.join(facts))}</div>{img}{tab}", self.title)
