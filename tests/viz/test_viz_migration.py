"""The migration views, drawn while a real built-in migration runs.

The built-in migration moves a guest between two in-process back-ends over
real sockets, memfd RAM and a real vhost log; it runs in a background thread
while a LiveView redraws the timeline, the round slider and the trace.
"""
from __future__ import annotations

import html
import re
import threading

import numpy as np
import pytest

from vhostlab.frontend import BuiltinMigration
from vhostlab.viz import (CallTimelineView, LogBitmapView, MigrationTimelineView,
                          RoundSlider, decode_png, watch_migration)
from vhostlab.viz.bitmap import NEVER


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


@pytest.fixture(scope="module")
def migrated():
    """One migration, watched live; returns (migration, live view, error or None)."""
    mig = BuiltinMigration(rounds=3, ram_size=16 << 20)
    errors = []

    def run():
        try:
            mig.run()
        except BaseException as exc:  # reported by the tests, not lost in the thread
            errors.append(exc)

    worker = threading.Thread(target=run, name="migration")
    worker.start()
    live = watch_migration(mig, until=worker, trace=lambda: mig.src.server.trace)
    worker.join(120)
    assert not worker.is_alive(), "the migration did not finish"
    assert live.wait(10)
    yield mig, live, errors
    live.close()


def test_migration_ran_and_the_live_view_followed_it(migrated):
    mig, live, errors = migrated
    assert not errors, errors
    assert mig.integrity_ok
    assert live.refreshes >= 2 and not live.running
    final = _text(live.to_html())
    assert f"{len(mig.snapshots)} rounds" in final          # the timeline's last redraw
    # The dirty map followed the syncs up to vhost_log_put's final one, drawn by band.
    last_sync = mig.dirty_rounds[-1]
    assert last_sync.final_sync
    assert f"newest sync: final sync (vhost_log_put), {len(mig.dirty_rounds)} so far" in final
    assert "data-view='dirty-bitmap'" in live.to_html() and "RX buffers" in final
    last = mig.src.server.trace.records()[-1]
    assert last.request == "GET_VRING_BASE" and "GET_VRING_BASE (reply)" in final  # trace pane
    # The QEMU launcher's spawner thread lives for the whole process on purpose
    # (PR_SET_PDEATHSIG follows the thread that forked QEMU); it is not the view's.
    left = [t.name for t in threading.enumerate()
            if t.name.startswith("vhostlab") and t.name != "vhostlab-qemu-spawner"]
    assert not left, left


def test_timeline_table_holds_the_round_snapshots(migrated):
    mig, _live, _ = migrated
    page = MigrationTimelineView(mig).to_html()
    rows = re.findall(r"<tr><td>(\d+)</td><td>([^<]*)</td><td>(\d+)</td><td>(\d*)</td>"
                      r"<td>(\d*)</td><td>(\d*)</td>", page)
    assert len(rows) == len(mig.snapshots) == mig.rounds + 1   # live rounds, then the stop
    for row, snap in zip(rows, mig.snapshots):
        assert int(row[0]) == snap.round and row[1] == snap.phase
        assert int(row[2]) == snap.pages_copied
        assert int(row[3]) == snap.pages_dirtied_by_guest
        assert int(row[4]) == snap.pages_from_vhost_log
    # what is left after a round is what the next round's sync found
    for row, nxt in zip(rows, mig.snapshots[1:]):
        assert int(row[5]) == nxt.pages_copied
    assert rows[-1][5] == "0"                       # nothing left after stop-and-copy
    data = MigrationTimelineView(mig).data()
    assert [r["stopped"] for r in data["rows"]] == [False] * mig.rounds + [True]
    assert data["downtime_s"] == mig.downtime_s > 0
    assert f"downtime {mig.downtime_s * 1e3:.1f} ms" in _text(page)
    assert "dirty sync (QEMU)" not in page          # the built-in has no QEMU sync count
    png = MigrationTimelineView(mig).png()
    img = decode_png(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300


def test_round_bitmaps_show_the_pages_the_vhost_log_named(migrated):
    mig, _live, _ = migrated
    logged = [i for i, s in enumerate(mig.snapshots) if s.pages_from_vhost_log]
    assert logged, "no round found pages in the vhost log"
    r = logged[0]
    snap = mig.snapshots[r]
    pages = np.flatnonzero(np.unpackbits(snap.log_bitmap, bitorder="little"))
    view = LogBitmapView(mig, round=r)
    img = decode_png(view.png())
    per_px = 1 if pages.max() < 65536 else -(-img.size // 65536)
    for p in pages[:50]:
        q = p // per_px
        assert tuple(int(c) for c in img[q // 256, q % 256, :3]) != NEVER
    assert f"<b>{snap.pages_from_vhost_log}</b> of" in view.to_html()
    slider = RoundSlider(mig)
    slider._slider.value = r + 1
    assert f"round {snap.round} ({snap.phase})" in _text(slider._image.value)


def test_call_timeline_shows_the_seeds_calling_sequence(migrated):
    mig, _live, _ = migrated
    text = _text(CallTimelineView(mig.src.dev, limit=0).to_html())
    at = 0
    for step in ("vhost_log_global_start()", "vhost_migration_log()", "SET_LOG_BASE",
                 "vhost_dev_set_log()", "vhost_dev_set_features()", "SET_FEATURES",
                 "VHOST_F_LOG_ALL", "SET_VRING_ADDR", "flags=1", "vhost_dev_stop()",
                 "vhost_virtqueue_stop()", "GET_VRING_BASE", "vhost_log_put()",
                 "vhost_log_sync()"):
        at = text.index(step, at)           # each step after the one before
