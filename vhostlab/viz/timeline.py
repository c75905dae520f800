"""The migration timeline: pages per pre-copy round, bytes sent, downtime.

Pre-copy live migration (QEMU migration/ram.c) sends all of RAM in round 1,
then in each later round the pages dirtied meanwhile: by the guest (QEMU's own
dirty bitmap) and by the vhost back-end (the vhost log, read by
vhost_log_sync). When what remains is small enough, the guest is stopped
(vhost_dev_stop: GET_VRING_BASE), the last pages are sent, and the destination
starts: the time the guest did not run is the downtime.

The view reads per-round snapshots from the migration object (or a list of
them) each time it renders, and draws a PNG with matplotlib (Agg, no pyplot)
plus a table of the same numbers. A real QEMU counts the pages the guest
dirtied and the pages the vhost log named as one number, so its table has
no "by the guest" column, and gives QEMU's dirty-sync-count beside each
round; the rounds' notes (several syncs in one round, the stop) go below.
"""
from __future__ import annotations

import time
from typing import Any

from vhostlab.memory import TARGET_PAGE_SIZE

from ._common import View, esc, field, fmt_size, resolve, rounds_of, table, wrap
from .png import data_uri, figure_png, new_figure



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
    round; ``zero``: how many of them were zero pages, if known),
    ``guest_dirty`` and ``log_dirty`` (what the dirty-bitmap sync before
    this round found: pages the guest wrote, pages the vhost log named),
    ``dirty`` (their union), ``remaining`` (pages left to send after this
    round, if the snapshot says; see ``rows_of``), ``bytes``, ``syncs``
    (QEMU's dirty-sync-count of the round, as text), ``stopped`` (the guest
    was stopped for this round: the stop-and-copy) and ``note``. A value the
    snapshot does not carry is None.
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
        "zero": None,
        "guest_dirty": guest,
        "log_dirty": log,
        "dirty": dirty,
        "remaining": _int(snap, "remaining_pages", "pages_remaining"),
        "bytes": nbytes if nbytes is not None else copied * TARGET_PAGE_SIZE,
        "syncs": None,
        "stopped": phase is not None and str(phase).startswith("stop"),
        "note": field(snap, "note", default=None) or None,
    }


def _qemu_round(snap: Any, index: int, previous: Any) -> dict:
    """A real QEMU's round: query-migrate's counters from one dirty-bitmap sync to the next.

    QEMU counts pages sent (``ram.normal`` + ``ram.duplicate``) and bytes
    (``ram.transferred``); the pages the vhost log named come from the
    back-end's log. QEMU's dirty count does not tell the guest's writes
    from the back-end's, so ``guest_dirty`` is None.
    """
    nbytes = _int(snap, "bytes_sent")
    if nbytes is None:                    # a snapshot with the running totals only
        before = (_int(previous, "transferred") or 0) if previous is not None else 0
        nbytes = max(0, (_int(snap, "transferred") or 0) - before)
    after = field(snap, "remaining_after", default=None)
    status = field(snap, "status", "phase", default=None)
    syncs = [int(n) for n in field(snap, "syncs", default=()) or ()]
    label = (f"{syncs[0]}-{syncs[-1]}" if len(syncs) > 1 else str(syncs[0]) if syncs
             else str(_int(snap, "dirty_sync_count")))
    return {
        "round": _int(snap, "round") or index + 1,
        "phase": None if status is None else str(status),
        "copied": _int(snap, "pages_sent"),
        "zero": _int(snap, "zero_pages"),
        "guest_dirty": None,
        "log_dirty": _int(snap, "pages_logged", "pages_from_vhost_log"),
        "dirty": None,
        "remaining": None if after is None else int(after) // TARGET_PAGE_SIZE,
        "bytes": nbytes,
        "syncs": label,
        "stopped": str(status) == "completed",     # the last round: STOP, then its sync
        "note": field(snap, "note", default=None) or None,
    }


def rows_of(rounds: list[Any]) -> list[dict]:
    """``round_numbers`` for every round, with ``remaining`` filled in.

    Without an explicit count, what remains after round r is what the next
    round's sync found dirty; after a stop-and-copy round nothing remains.
    """
    rows = [round_numbers(r, i, rounds[i - 1] if i else None) for i, r in enumerate(rounds)]
    for i, row in enumerate(rows):
        if row["remaining"] is None and row["copied"] is not None and row["syncs"] is None:
            if i + 1 < len(rows):
                row["remaining"] = rows[i + 1]["dirty"]
            elif row["stopped"]:
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
    ax.bar([x - 0.2 for x in xs], [r["copied"] or 0 for r in rows], width=width,
           color="#3584e4", label="pages sent")
    guest = [r["guest_dirty"] or 0 for r in rows]
    log = [r["log_dirty"] or 0 for r in rows]
    if any(r["guest_dirty"] is not None for r in rows):
        ax.bar(right, guest, width=width, color="#f6d32d", label="found dirty: by the guest")
    if any(r["log_dirty"] is not None for r in rows):
        ax.bar(right, log, width=width, bottom=guest, color="#c01c28",
               label="found dirty: in the vhost log")
    values = [v for r in rows for v in (r["copied"], r["dirty"], r["log_dirty"],
                                        r["remaining"]) if v]
    log_scale = bool(values) and max(values) > 50 * min(values)
    if log_scale:
        # Round 1 sends all of RAM; a log scale keeps the later rounds visible.
        ax.set_yscale("log")
    if any(r["remaining"] is not None for r in rows):
        # 0 has no place on a log axis: drawn at the bottom edge instead. An
        # unknown count (nan) breaks the line rather than bridging the gap.
        left = [float("nan") if r["remaining"] is None else
                max(r["remaining"], 0.8) if log_scale else r["remaining"] for r in rows]
        ax.plot(xs, left, "k.-", label="left to send after the round")
    ax.set_xticks(xs)


def _downtime_span(ax: Any, rows: list[dict], downtime_s: float | None) -> None:
    """Shade the rounds sent with the guest stopped, labelled with the downtime."""
    stopped = [r["round"] for r in rows if r["stopped"]]
    if not stopped:
        return
    label = "guest stopped" + ("" if downtime_s is None else
                               f" (downtime {downtime_s * 1e3:.1f} ms)")
    ax.axvspan(min(stopped) - 0.5, max(stopped) + 0.5, color="#77767b", alpha=0.18,
               zorder=0, label=label)


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


def _sent(row: dict) -> str:
    zero = f" ({row['zero']} zero)" if row.get("zero") else ""
    return _cell(row["copied"]) + esc(zero)


#: The table's columns: header, cell, shown only when some row has the key.
_COLUMNS = (
    ("round", lambda r: _cell(r["round"]), None),
    ("dirty sync (QEMU)", lambda r: _cell(r["syncs"]), "syncs"),
    ("phase", lambda r: _cell(r["phase"]), None),
    ("pages sent", _sent, None),
    ("found dirty: by the guest", lambda r: _cell(r["guest_dirty"]), "guest_dirty"),
    ("found dirty: in the vhost log", lambda r: _cell(r["log_dirty"]), "log_dirty"),
    ("left after the round", lambda r: _cell(r["remaining"]), None),
    ("bytes sent", lambda r: esc(fmt_size(r["bytes"])), None),
)
QEMU_NO_GUEST = ("QEMU counts the pages the guest dirtied and those the vhost log named "
                 "together, in one bitmap: there is no \"by the guest\" column. \"In the vhost "
                 "log\": what the source back-end marked before the round's sync.")


def rounds_table(rows: list[dict], all_rows: list[dict] | None = None,
                 explain: bool = True) -> str:
    """The per-round numbers as an HTML table, with the rounds' notes below it.

    Columns that no row of ``all_rows`` (default: ``rows``) has a value for
    are left out: QEMU has no "by the guest" count, the built-in front-end
    no dirty-sync-count; ``explain`` says why below the table.
    """
    every = rows if all_rows is None else all_rows
    cols = [(h, cell) for h, cell, key in _COLUMNS
            if key is None or any(r.get(key) is not None for r in every)]
    body = table([h for h, _ in cols], [[cell(r) for _, cell in cols] for r in rows])
    notes = [f"round {r['round']}: {r['note']}" for r in rows if r.get("note")]
    if explain and any(r.get("syncs") is not None for r in every) and \
            all(r.get("guest_dirty") is None for r in every):
        notes.append(QEMU_NO_GUEST)
    return body + "".join(f"<div class='muted'>{esc(n)}</div>" for n in notes)


class MigrationTimelineView(View):
    """Remaining and dirty pages per round, bytes sent, and the downtime.

    ``source`` is a migration object (with its round snapshots as
    ``snapshots`` or a ``rounds`` list, and optionally ``downtime_s`` /
    ``downtime_ms`` and ``status``) or a list of round snapshots. The rounds
    sent with the guest stopped are shaded in the chart and the downtime is
    given above it.
    """

    #: Seconds between two plots of the same rounds while one of them grows.
    replot_interval = 1.0

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
        # A live view redraws ten times a second and QEMU's running round
        # grows at every reading: plot again on a new round, a new status or
        # the downtime at once, but for a growing round at most once a second.
        key = repr((d["rows"], d["downtime_s"]))
        shape = repr(([(r["round"], r["phase"]) for r in d["rows"]], d["downtime_s"],
                      d["status"]))
        cached = getattr(self, "_cache", None)
        if cached is not None and (cached[0] == key or (
                cached[1] == shape and time.monotonic() - cached[2] < self.replot_interval)):
            return cached[3]
        png = self._plot(d)
        self._cache = (key, shape, time.monotonic(), png)
        return png

    @staticmethod
    def _plot(d: dict) -> bytes:
        rows = d["rows"]
        fig = new_figure(7.0, 3.2)
        ax = fig.add_subplot(1, 1, 1)
        if rows:
            _bars(ax, rows)
            _downtime_span(ax, rows, d["downtime_s"])
            ax2 = _bytes_axis(ax, rows)
            handles, labels = ax.get_legend_handles_labels()
            more = ax2.get_legend_handles_labels()
            ax.legend(handles + more[0], labels + more[1], loc="upper center", ncol=3,
                      bbox_to_anchor=(0.5, -0.2), fontsize=7, frameon=False)
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
        return wrap(f"<div>{esc(', '.join(facts))}</div>{img}{tab}", self.title,
                    view="migration-timeline")
