"""The migration views on a live migration between two real QEMUs.

The QEMU layer's migration runs in its own thread; ``watch_migration``
redraws from its ``progress()`` while it runs; afterwards the views must hold
exactly the numbers QEMU's query-migrate and the source back-end's log gave.
"""
from __future__ import annotations

import html
import re
import threading

import numpy as np
import pytest

from vhostlab.viz import (LogBitmapView, MemoryMapView, MigrationTimelineView, TraceView,
                          VirtqueueView, decode_png, watch_migration)
from vhostlab.viz.bitmap import NEVER

pytestmark = pytest.mark.qemu


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


@pytest.fixture
def qemu_migration(requires_qemu):
    from vhostlab.qemu.migration import MigrationConfig, QemuMigration

    mig = QemuMigration(MigrationConfig(qemu=requires_qemu, busy_syncs=3))
    try:
        yield mig
    finally:
        mig.close()


def test_views_follow_a_real_qemu_migration(qemu_migration):
    mig = qemu_migration.start()
    live = watch_migration(mig, until=lambda: mig.progress().done, trace=None)
    try:
        result = mig.wait(150)
        assert live.wait(10)
    finally:
        live.close()
    assert result.status == "completed", result.error
    assert live.refreshes >= 2
    rounds = result.rounds
    assert rounds
    data = MigrationTimelineView(mig).data()
    rows, ram = data["rows"], result.final_query["ram"]
    assert [r["round"] for r in rows] == list(range(1, len(rounds) + 1))
    # Every dirty sync QEMU announced (MIGRATION_PASS) is in exactly one round.
    passes = [e["data"]["pass"] for e in result.events if e["event"] == "MIGRATION_PASS"]
    assert [n for r in rounds for n in r.syncs] == passes == \
        list(range(1, result.dirty_sync_count + 1))
    assert [r["syncs"] for r in rows] == [
        str(r.syncs[0]) if len(r.syncs) == 1 else f"{r.syncs[0]}-{r.syncs[-1]}" for r in rounds]
    # Pages and bytes sent per round add up to query-migrate's totals.
    assert [r["copied"] for r in rows] == [r.pages_sent for r in rounds]
    assert sum(r["copied"] for r in rows) == ram["normal"] + ram["duplicate"]
    assert sum(r["bytes"] for r in rows) == ram["transferred"]
    assert [r["log_dirty"] for r in rows] == [r.pages_logged for r in rounds]
    assert [r["guest_dirty"] for r in rows] == [None] * len(rounds)
    # What was left after a round is what QEMU still had to send at the next sync.
    for row, nxt in zip(rows[:-2], rounds[1:]):
        assert row["remaining"] == nxt.remaining // 4096
    assert rows[-1]["remaining"] == 0 and rows[-1]["phase"] == "completed"
    assert len(rows) < 2 or rows[-2]["remaining"] is None   # QEMU's last sync is not readable
    # query-migrate has downtime-bytes in QEMU 7.2 and 10.0; 5.2 leaves it out.
    assert rows[-1]["stopped"] and rounds[-1].downtime_bytes == ram.get("downtime-bytes")
    page = _text(MigrationTimelineView(mig).to_html())
    downtime = result.final_query["downtime"]
    assert f"downtime {downtime:.1f} ms" in page
    assert "by the guest" not in page.split("QEMU counts the pages the guest dirtied")[0]
    if "downtime-bytes" in ram:
        assert f"{ram['downtime-bytes']} bytes went out with the guest stopped" in page
    else:
        assert "bytes went out with the guest stopped" not in page
    assert "QEMU counts the pages the guest dirtied and those the vhost log named" in page
    logged = [i for i, r in enumerate(rounds) if r.pages_logged]
    assert logged, "the source back-end logged no page during the migration"
    r = logged[0]
    pages = np.flatnonzero(np.unpackbits(np.frombuffer(rounds[r].log_bitmap, np.uint8),
                                         bitorder="little"))
    img = decode_png(LogBitmapView(mig, round=r).png())
    for p in pages:
        assert tuple(int(c) for c in img[p // 256, p % 256, :3]) != NEVER
    assert f"<b>{rounds[r].pages_logged}</b> of" in LogBitmapView(mig, round=r).to_html()
    assert not [t.name for t in threading.enumerate()
                if t.name in ("vhostlab-liveview", "vhostlab-qemu-migration")]


def test_ring_memory_and_trace_views_of_a_real_qemu(requires_qemu):
    from vhostlab.qemu.host import VhostUserHost

    with VhostUserHost("viz", ram_size=64 << 20, qemu=requires_qemu) as host:
        guest = host.init_guest()
        server = host.server
        heads = guest.transmit([bytes([0xAB]) * 60, bytes([0xCD]) * 70])
        assert server.wait_for(lambda s: s.counters["guest_tx_frames"] >= 2, 10)
        tx = VirtqueueView(lambda: guest.ring_state(1),
                           state=lambda: server.snapshot(trace=False).vrings[1])
        text = _text(tx.to_html())
        assert "virtqueue 1" in text and "avail.idx 2" in text and "used.idx 2" in text
        assert "last_avail_idx 2 (0 waiting for the device)" in text
        snap = guest.ring_state(1)
        for head in heads:
            d = snap.desc[head]
            assert f"{int(d['addr']):#x}" in text and f" {int(d['len'])} " in text
        listed = re.findall(r"<tr[^>]*><td><span[^>]*>(\d+)</span></td>", tx.to_html())
        assert [int(i) for i in listed] == sorted(heads)        # only the two in use
        assert f"{guest.queue_size(1) - 2} unused descriptors not shown" in text   # 256 or 1024 entries
        # QEMU's memory table as the back-end mapped it: the pc machine's regions
        rows = _text(MemoryMapView(server).to_html())
        assert "0x0 0xbffff 0xc0000 (768 KiB)" in rows
        assert "0xe0000 0xeffff 0x10000 (64 KiB)" in rows
        trace = _text(TraceView(server, limit=0).to_html())
        # QEMU sends the table whole, or (with CONFIGURE_MEM_SLOTS) one region a message
        memory = (("SET_MEM_TABLE", "3 fds") if "SET_MEM_TABLE" in trace
                  else ("ADD_MEM_REG", "1 fd", "ADD_MEM_REG", "ADD_MEM_REG"))
        at = 0
        for step in ("GET_FEATURES", "SET_OWNER", *memory, "SET_VRING_NUM", "SET_VRING_ADDR",
                     "SET_VRING_KICK"):
            at = trace.index(step, at)      # each after the one before
