"""The server around the device: peer credentials, client mode, multiqueue, memory slots,
device reset, and the read-only view the labs draw while it runs."""
from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time

import pytest

from test_backend_protocol import Guest, frames_of, make_server, wait_until  # noqa: F401
from test_backend_scripted import ScriptedFrontend
from vhostlab.backend import BackendServer
from vhostlab.protocol import (Feature, MemoryRegion, ProtocolFeature, Request,
                               SingleMemoryRegion, VringState)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_a_front_end_of_another_uid_is_refused():
    srv = BackendServer().start()          # its own private directory under the temp dir
    try:
        _refuses_another_uid(srv)
    finally:
        srv.stop()


def _refuses_another_uid(srv: BackendServer) -> None:
    nobody = 65534
    # Open the way on purpose (a permissions mistake): SO_PEERCRED must still refuse.
    os.chmod(os.path.dirname(srv.socket_path), 0o711)
    os.chmod(srv.socket_path, 0o666)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(nobody)
            os.setuid(nobody)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(srv.socket_path)
            code = 0 if s.recv(1) == b"" else 3          # closed without a word
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    errors = srv.snapshot().counters["errors"]
    assert any("uid 65534" in e and "SO_PEERCRED" in e for e in errors), errors
    assert srv.snapshot().counters["connections"] == 0
    with ScriptedFrontend(srv.socket_path) as fe:         # our own uid is still served
        fe.negotiate()


def test_client_mode_connects_to_a_listening_front_end(tmp_path):
    d = tmp_path / "qemu"
    d.mkdir(mode=0o700)
    path = str(d / "chr0.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(10)
    with BackendServer(path, client=True) as srv:
        for round_ in range(2):                           # and reconnects after a drop
            conn, _ = listener.accept()
            conn.settimeout(5)
            with ScriptedFrontend(None, sock=conn) as fe:
                guest = Guest(fe)
                guest.transmit(frames_of(3))
                assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"]
                                  == 3 * (round_ + 1))
                del guest
            assert wait_until(lambda: not srv.connected)
    listener.close()


def test_multiqueue_pairs_are_independent(make_server):
    srv = make_server(queue_pairs=2, wire="loopback")
    with ScriptedFrontend(srv.socket_path) as fe:
        offered, _ = fe.negotiate()
        assert offered & Feature.VIRTIO_NET_F_MQ
        assert fe.send(Request.GET_QUEUE_NUM).payload.value == 2
        guest = Guest(fe, pairs=2)
        guest.post_rx(8, pair=0)
        guest.post_rx(8, pair=1)
        guest.transmit(frames_of(3, 80), pair=1)
        got: list[bytes] = []
        assert wait_until(lambda: got.extend(guest.receive(pair=1)) or len(got) == 3)
        assert got == frames_of(3, 80) and guest.receive(pair=0) == []
        srv.inject([b"p0" * 30], queue_pair=0)
        got0: list[bytes] = []
        assert wait_until(lambda: got0.extend(guest.receive(pair=0)) or got0 == [b"p0" * 30])
        vr = srv.snapshot().vrings
        assert [v.frames for v in vr] == [1, 0, 3, 3]
        bad = fe.send(Request.SET_VRING_ENABLE, VringState(4, 1), need_reply=True)
        assert bad.payload.value != 0                     # 4 vrings: index 4 is out of range
        del guest


def test_add_and_remove_memory_regions(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate()
        table = fe.memory.memory_table()
        for region, fd in table:
            reply = fe.send(Request.ADD_MEM_REG, SingleMemoryRegion(MemoryRegion(*region)),
                            fds=[fd], need_reply=True)
            assert reply.payload.value == 0
        assert [r.guest_phys_addr for r in srv.snapshot().memory] == [0, 0xE0000, 0x100000]
        small = MemoryRegion(*table[1][0])
        assert fe.send(Request.REM_MEM_REG, SingleMemoryRegion(small),
                       need_reply=True).payload.value == 0
        assert [r.guest_phys_addr for r in srv.snapshot().memory] == [0, 0x100000]
        again = fe.send(Request.REM_MEM_REG, SingleMemoryRegion(small), need_reply=True)
        assert again.payload.value != 0                   # no such region any more
        overlap = MemoryRegion(0x100000, 0x1000, 0x10, 0)
        assert fe.send(Request.ADD_MEM_REG, SingleMemoryRegion(overlap), fds=[table[0][1]],
                       need_reply=True).payload.value != 0


def test_reset_device_stops_the_rings_and_keeps_the_memory_table(make_server):
    # QEMU 10 sends RESET_DEVICE when the guest writes status 0, then at the next
    # DRIVER_OK only the rings again: an unchanged memory table is never re-sent.
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = Guest(fe)
        guest.transmit(frames_of(2))
        assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 2)
        before = srv.snapshot()
        assert fe.send(Request.RESET_DEVICE, need_reply=True).payload.value == 0
        snap = srv.snapshot()
        assert snap.memory == before.memory and snap.memory
        assert not any(v.started or v.kick or v.enabled for v in snap.vrings)
        assert snap.protocol_features & ProtocolFeature.RESET_DEVICE
        # The rings start again, as vhost_dev_start does, without SET_MEM_TABLE.
        guest.restart()
        guest.transmit(frames_of(3))
        assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 5)
        assert srv.snapshot().counters["errors"] == ()


def test_snapshot_is_immutable_and_consistent_while_traffic_flows(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = Guest(fe)
        stop = threading.Event()

        def traffic():
            while not stop.is_set():
                guest.drivers[1].get_used()
                if guest.drivers[1].num_free >= 16:
                    guest.transmit(frames_of(16))
        t = threading.Thread(target=traffic)
        t.start()
        try:
            checked, deadline = 0, time.monotonic() + 10
            # At least 200 snapshots, and on until traffic has really flowed: under
            # load the guest thread may not have run before the first 200 are done.
            while checked < 200 or (snap.counters["guest_tx_frames"] == 0
                                    and time.monotonic() < deadline):
                snap = srv.snapshot(descriptors=True)
                assert snap.counters["guest_tx_frames"] == snap.vrings[1].frames
                assert snap.counters["guest_tx_bytes"] == snap.vrings[1].bytes
                checked += 1
        finally:
            stop.set()
            t.join()
        assert snap.counters["guest_tx_frames"] > 0
        with pytest.raises(dataclasses.FrozenInstanceError):
            snap.features = 0
        with pytest.raises(TypeError):
            snap.counters["dropped"] = 1
        with pytest.raises(dataclasses.FrozenInstanceError):
            snap.trace[0].request = "x"
        assert len(snap.vrings[1].descriptors) == 256 and isinstance(snap.memory, tuple)
        del guest
