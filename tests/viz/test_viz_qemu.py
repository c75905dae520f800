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

from vhostlab.viz import (DirtyBitmapView, MemoryMapView, MigrationTimelineView, TraceView,
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
    assert [r["round"] for r in data["rows"]] == [r.dirty_sync_count for r in rounds]
    assert [r["remaining"] for r in data["rows"]] == [r.remaining // 4096 for r in rounds]
    assert [r["log_dirty"] for r in data["rows"]] == [r.pages_logged for r in rounds]
    assert sum(r["bytes"] for r in data["rows"]) == rounds[-1].transferred
    downtime = result.final_query["downtime"]
    assert f"downtime {downtime:.1f} ms" in _text(MigrationTimelineView(mig).to_html())
    logged = [i for i, r in enumerate(rounds) if r.pages_logged]
    assert logged, "the source back-end logged no page during the migration"
    r = logged[0]
    pages = np.flatnonzero(np.unpackbits(np.frombuffer(rounds[r].log_bitmap, np.uint8),
                                         bitorder="little"))
    img = decode_png(DirtyBitmapView(mig, round=r).png())
    for p in pages:
        assert tuple(int(c) for c in img[p // 256, p % 256, :3]) != NEVER
    assert f"<b>{rounds[r].pages_logged}</b> of" in DirtyBitmapView(mig, round=r).to_html()
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
