"""VhostDev and the built-in guest against the real back-end: sequences, frames, the log."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from vhostlab.backend import BackendServer
from vhostlab.frontend import (BuiltinMigration, BuiltinVirtioNetGuest, CaptureWire, VhostDev,
                               VhostOps)
from vhostlab.frontend.frames import RX, TX, frame_id, make_frame
from vhostlab.frontend.guest import RX_QUEUE, TX_QUEUE
from vhostlab.memory import GuestMemory
from vhostlab.protocol import TO_BACKEND

PAGE = 4096


@pytest.fixture
def rig():
    wire = CaptureWire()
    server = BackendServer(None, wire=wire).start()
    guest = BuiltinVirtioNetGuest(8 << 20, 64)
    dev = VhostDev(VhostOps.connect(server.socket_path, timeout=5.0))
    try:
        yield server, wire, guest, dev
    finally:
        dev.vhost_dev_cleanup()
        guest.close()
        server.stop()


def _out(dev):
    return [r for r in dev.vhost_ops.trace.records() if r.direction == TO_BACKEND]


def _start(dev, guest):
    dev.vhost_dev_init()
    guest.negotiate(dev.features)
    dev.vhost_net_start(guest)
    guest.post_rx_buffers()


def test_init_and_start_send_qemus_sequence(rig):
    server, _, guest, dev = rig
    _start(dev, guest)
    ring = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
            "SET_VRING_CALL"]
    assert [r.request for r in _out(dev)] == (
        ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
         "SET_OWNER", "GET_FEATURES", "SET_VRING_CALL", "SET_VRING_CALL",
         "SET_FEATURES", "SET_MEM_TABLE"] + ring + ring
        + ["SET_VRING_ENABLE", "SET_VRING_ENABLE"])
    addr = [r.fields["payload"] for r in _out(dev) if r.request == "SET_VRING_ADDR"]
    for a, q in zip(addr, guest.queues):
        # user addresses for the ring, a GPA for the log (FACTS: "log = used ring GPA")
        assert a["desc_user_addr"] == guest.memory.gpa_to_uva(q.desc)
        assert a["used_user_addr"] == guest.memory.gpa_to_uva(q.used)
        assert a["log_guest_addr"] == q.used and a["flags"] == 0
    assert server.wait_for(lambda s: all(v.started and v.enabled for v in s.vrings), 5)
    assert dev.ops_called[:3] == ["vhost_backend_init", "vhost_set_owner", "vhost_get_features"]


def test_frames_both_ways_byte_for_byte(rig):
    server, wire, guest, dev = rig
    _start(dev, guest)
    tx = [make_frame(TX, i, 60 + 97 * i) for i in range(6)]
    rx = [make_frame(RX, i, 1514 - 131 * i) for i in range(6)]
    assert guest.transmit(tx) == 6
    server.inject(rx)
    assert server.wait_for(lambda s: s.counters["guest_tx_frames"] == 6
                           and s.counters["guest_rx_frames"] == 6, 5)
    assert wire.captured == tx
    got = guest.receive()
    assert got == rx and all(frame_id(f) == (RX, i) for i, f in enumerate(got))
    done = guest.reap(TX_QUEUE)                   # the device returned every TX buffer
    assert len(done) == 6 and all(gpa >= 0 for _, _, gpa in done)
    assert len(guest.queues[TX_QUEUE].free) == guest.queues[TX_QUEUE].num
    assert guest.queues[RX_QUEUE].interrupts > 0                 # the call eventfd fired


def test_vhost_log_has_exactly_the_pages_the_backend_wrote(rig):
    server, _, guest, dev = rig
    _start(dev, guest)
    dev.vhost_log_global_start()
    assert dev.log_enabled and dev.log is not None
    guest.take_guest_dirty()
    server.inject([make_frame(RX, i, 1400) for i in range(3)])
    assert server.wait_for(lambda s: s.counters["guest_rx_frames"] == 3, 5)
    logged = set(dev.vhost_log_sync().tolist())
    used = guest.reap(RX_QUEUE)
    expected = {guest.queues[RX_QUEUE].used // PAGE}
    for _, length, gpa in used:
        expected |= set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))
    assert len(used) == 3 and logged == expected
    # the guest wrote none of those pages itself: only the vhost log knows them
    assert not set(guest.take_guest_dirty().tolist()) & logged
    assert dev.vhost_log_sync().size == 0          # the sync cleared what it took


def test_stop_returns_last_avail_idx_and_syncs_last(rig):
    server, _, guest, dev = rig
    _start(dev, guest)
    guest.transmit([make_frame(TX, i, 100) for i in range(5)])
    server.inject([make_frame(RX, i, 100) for i in range(7)])
    assert server.wait_for(lambda s: s.counters["guest_rx_frames"] == 7
                           and s.counters["guest_tx_frames"] == 5, 5)
    dev.vhost_log_global_start()
    server.inject([make_frame(RX, 7, 200)])
    assert server.wait_for(lambda s: s.counters["guest_rx_frames"] == 8, 5)
    found = []
    dev.dirty_sink = found.append
    bases = dev.vhost_dev_stop(guest)
    assert bases == {RX_QUEUE: 8, TX_QUEUE: 5}
    assert guest.virtio_queue_get_last_avail_idx(RX_QUEUE) == 8
    assert found and (guest.queues[RX_QUEUE].used // PAGE) in np.concatenate(found)
    names = [e.name for e in dev.timeline if e.kind in ("call", "message")]
    tail = names[names.index("vhost_dev_stop"):]
    assert [n for n in tail if n in ("GET_VRING_BASE", "vhost_log_put", "vhost_log_sync")] == [
        "GET_VRING_BASE", "GET_VRING_BASE", "GET_VRING_BASE", "GET_VRING_BASE",
        "vhost_log_put", "vhost_log_sync"]
    assert dev.log is None and not dev.started


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _our_mappings() -> tuple[int, int]:
    """memfd mappings (guest RAM, logs) and >= 1 GiB reservations (GuestMemory)."""
    memfd = big = 0
    with open("/proc/self/maps") as f:
        for line in f:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            memfd += "memfd:" in line
            big += end - start >= 1 << 30
    return memfd, big


def test_migration_leaves_no_fd_thread_or_mapping_behind():
    BuiltinMigration(frames_per_round=2, rounds=2).run()      # warm caches and imports
    fds, threads, maps = _fds(), threading.active_count(), _our_mappings()
    summary = BuiltinMigration(frames_per_round=4, rounds=2).run()
    assert summary["integrity"] == "ok"
    assert (_fds(), threading.active_count(), _our_mappings()) == (fds, threads, maps)


def test_logging_on_before_start_sends_set_log_base_from_vhost_dev_start(rig):
    """The seed's step 1 literally: vhost_dev_start()->vhost_set_log_base()."""
    server, _, guest, dev = rig
    dev.vhost_dev_init()
    guest.negotiate(dev.features)
    before = len(_out(dev))
    dev.vhost_log_global_start()            # not started yet: only remembered
    assert dev.log_enabled and len(_out(dev)) == before
    dev.vhost_dev_start(guest)
    names = [r.request for r in _out(dev)[before:]]
    assert names[0] == "SET_FEATURES" and names[-1] == "SET_LOG_BASE"
    assert "VHOST_F_LOG_ALL" in _out(dev)[before].fields["payload"]["names"]
    addrs = [r for r in _out(dev) if r.request == "SET_VRING_ADDR"]
    assert len(addrs) == 2 and all(r.fields["payload"]["flags"] == 1 for r in addrs)
    calls = [e.name for e in dev.timeline if e.kind in ("call", "op")]
    start = calls.index("vhost_dev_start")
    assert calls[start:].index("vhost_set_log_base") > calls[start:].index("vhost_virtqueue_start")
    assert server.wait_for(lambda s: s.logging, 5)


def test_the_guests_ring_writes_are_in_its_dirty_set_and_survive_a_move():
    guest = BuiltinVirtioNetGuest(8 << 20, 64)
    try:
        assert not guest.guest_dirty.any()               # fresh RAM: nothing written yet
        assert guest.transmit([make_frame(TX, i, 100) for i in range(3)]) == 3
        q = guest.queues[TX_QUEUE]
        dirty = set(guest.take_guest_dirty().tolist())
        # descriptors, avail ring and the buffers: the guest's own writes, via the driver
        assert {q.desc // PAGE, q.avail // PAGE, q.slot(63) // PAGE} <= dirty
        assert q.used // PAGE not in dirty and sorted(q.inflight) == [61, 62, 63]
        dst = GuestMemory.allocate(8 << 20, reserve=32 << 20)
        for r in guest.memory.regions:
            dst.write(r.guest_phys_addr, guest.memory.read(r.guest_phys_addr, r.memory_size))
        src = guest.memory
        guest.move_to(dst)
        src.close()
        assert sorted(q.inflight) == [61, 62, 63] and len(q.free) == 61
        assert guest.transmit([make_frame(TX, 3, 100)]) == 1
        assert int(q.driver.views.avail_idx[0]) == 4 and guest.guest_dirty.any()
    finally:
        guest.close()
