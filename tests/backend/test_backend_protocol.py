"""The back-end over a real socket: QEMU's start-up, frames both ways, GET_VRING_BASE,
dirty logging, REPLY_ACK, refused requests and malformed messages."""
from __future__ import annotations

import os
import struct
import time

import pytest

from test_backend_scripted import RING_NUM, ScriptedFrontend
from vhostlab.backend import BackendServer
from vhostlab.dirtylog import DirtyLog
from vhostlab.protocol import ConfigSpace, Feature, IotlbMsg, Request, U64, VringState
from vhostlab.ring import VirtqueueDriver
from vhostlab.protocol import TO_BACKEND, TO_FRONTEND

HDR = 12                        # VERSION_1 is acked: 12-byte virtio-net header
TX_BUF_GPA = 0x2000000
RX_BUF_GPA = 0x3000000
RX_BUF_SIZE = 2048


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def open_fds() -> set[str]:
    """This process's open fds (without the one listdir itself used)."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{fd}")
            fds.add(fd)
        except OSError:
            pass
    return fds


@pytest.fixture
def make_server(tmp_path):
    servers = []

    def make(**kwargs) -> BackendServer:
        d = tmp_path / f"s{len(servers)}"
        d.mkdir(mode=0o700)
        srv = BackendServer(str(d / "vu.sock"), **kwargs).start()
        servers.append(srv)
        return srv
    yield make
    for srv in servers:
        srv.stop()


class Guest:
    """The guest's half: drivers for RX (vring 0) and TX (vring 1) over the front-end's RAM."""

    def __init__(self, fe: ScriptedFrontend, pairs: int = 1):
        self.fe = fe
        self.drivers = [VirtqueueDriver(fe.memory, RING_NUM, fe.ring_gpas(i)[0])
                        for i in range(2 * pairs)]
        self.info = fe.start(queue_pairs=pairs)
        fe.sync()
        self.kick = {i: k for i, (k, c) in self.info["rings"].items()}
        self.call = {i: c for i, (k, c) in self.info["rings"].items()}

    def restart(self) -> None:
        """Start the rings again as vhost_dev_start does after a device reset:
        fresh rings (SET_VRING_NUM ... CALL, then ENABLE), and no memory table."""
        self.drivers = [VirtqueueDriver(self.fe.memory, RING_NUM, self.fe.ring_gpas(i)[0])
                        for i in range(len(self.drivers))]
        rings = {i: self.fe.start_ring(i) for i in range(len(self.drivers))}
        for i in rings:
            self.fe.send(Request.SET_VRING_ENABLE, VringState(i, 1))
        self.fe.sync()
        self.kick = {i: k for i, (k, c) in rings.items()}
        self.call = {i: c for i, (k, c) in rings.items()}

    def post_rx(self, n: int, pair: int = 0) -> None:
        drv = self.drivers[2 * pair]
        for i in range(n):
            drv.add_buffer([(RX_BUF_GPA + pair * 0x400000 + i * 4096, RX_BUF_SIZE, True)])
        drv.publish()
        os.eventfd_write(self.kick[2 * pair], 1)

    def transmit(self, frames: list[bytes], pair: int = 0) -> None:
        drv = self.drivers[2 * pair + 1]
        for i, frame in enumerate(frames):
            gpa = TX_BUF_GPA + pair * 0x400000 + (drv.avail_idx % RING_NUM) * 4096
            self.fe.memory.write(gpa, bytes(HDR) + frame)
            drv.add_buffer([(gpa, HDR + len(frame), False)])
        drv.publish()
        os.eventfd_write(self.kick[2 * pair + 1], 1)

    def receive(self, pair: int = 0) -> list[bytes]:
        drv = self.drivers[2 * pair]
        out = []
        for head, length in drv.get_used():
            data = self.fe.memory.read(RX_BUF_GPA + pair * 0x400000 + head * 4096, length)
            out.append(data[HDR:])
        return out


def frames_of(n: int, size: int = 60) -> list[bytes]:
    return [struct.pack("<I", i) + bytes([i % 251]) * (size - 4) for i in range(n)]


# -- start-up ------------------------------------------------------------------------
def test_qemu_start_up_sequence_configures_the_device(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = Guest(fe)
        assert wait_until(lambda: all(v.started and v.enabled for v in srv.snapshot().vrings))
        snap = srv.snapshot()
        assert snap.features == guest.info["acked"]
        assert "VIRTIO_F_VERSION_1" in snap.feature_names and snap.hdr_len == 12
        assert [(r.guest_phys_addr, r.memory_size) for r in snap.memory] == \
            [(0x0, 0xC0000), (0xE0000, 0x10000), (0x100000, (64 << 20) - 0x100000)]
        for v in snap.vrings:
            desc, avail, used = fe.ring_gpas(v.index)
            assert (v.desc, v.avail, v.used, v.num) == (desc, avail, used, RING_NUM)
            assert v.kick and v.call and v.err and v.error is None
        # SET_MEM_TABLE was sent with need_reply: the REPLY_ACK said success.
        acks = [r for r in fe.replies if r.request is Request.SET_MEM_TABLE]
        assert len(acks) == 1 and acks[0].payload.value == 0 and acks[0].flags == 0x5
        names = [r.request for r in snap.trace if r.direction == TO_BACKEND]
        assert names[:5] == ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
                             "SET_OWNER", "GET_FEATURES"]
        out = [r for r in snap.trace if r.direction == TO_FRONTEND]
        assert all(r.fields["flags"] == 0x5 for r in out)
        mem = next(r for r in snap.trace if r.request == "SET_MEM_TABLE")
        assert mem.nfds == 3 and mem.fields["payload"]["nregions"] == 3
        assert mem.raw[:12] == struct.pack("<III", 5, 0x9, 8 + 3 * 32)


def test_rings_stay_disabled_until_set_vring_enable(make_server):
    srv = make_server(wire="loopback")
    with ScriptedFrontend(srv.socket_path) as fe:
        drivers = [VirtqueueDriver(fe.memory, RING_NUM, fe.ring_gpas(i)[0]) for i in range(2)]
        _, acked = fe.negotiate()
        fe.send(Request.SET_FEATURES, acked)
        fe.set_mem_table()
        kick_rx, _ = fe.start_ring(0)
        kick_tx, _ = fe.start_ring(1)
        fe.sync()
        vr = srv.snapshot().vrings
        assert vr[0].started and not vr[0].enabled
        assert vr[0].state == "started but disabled"
        # "started but disabled": TX is taken and dropped, RX gets nothing.
        drivers[0].add_buffer([(RX_BUF_GPA, RX_BUF_SIZE, True)])
        drivers[0].publish()
        fe.memory.write(TX_BUF_GPA, bytes(HDR) + b"x" * 60)
        drivers[1].add_buffer([(TX_BUF_GPA, HDR + 60, False)])
        drivers[1].publish()
        os.eventfd_write(kick_tx, 1)
        assert wait_until(lambda: drivers[1].get_used() == [(0, 0)])
        c = srv.snapshot().counters
        assert c["guest_tx_frames"] == 1 and c["dropped"] == 1 and c["guest_rx_frames"] == 0
        fe.send(Request.SET_VRING_ENABLE, VringState(0, 1))
        fe.send(Request.SET_VRING_ENABLE, VringState(1, 1))
        fe.sync()
        srv.inject([b"y" * 60])
        assert wait_until(lambda: srv.snapshot().counters["guest_rx_frames"] == 1)


# -- frames --------------------------------------------------------------------------
def test_frames_both_ways_through_the_rings(make_server):
    srv = make_server(wire="loopback")
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = Guest(fe)
        guest.post_rx(64)
        sent = frames_of(40, 60) + frames_of(10, 1500)
        guest.transmit(sent)
        got: list[bytes] = []
        assert wait_until(lambda: got.extend(guest.receive()) or len(got) == len(sent))
        assert got == sent                             # byte for byte, in order
        c = srv.snapshot().counters
        assert c["guest_tx_frames"] == c["guest_rx_frames"] == len(sent)
        assert c["guest_tx_bytes"] == c["guest_rx_bytes"] == sum(map(len, sent))
        assert c["calls"] >= 1 and c["dropped"] == 0
        # The call eventfd was signalled for the used entries.
        assert os.eventfd_read(guest.call[0]) >= 1


def test_inject_waits_for_rx_buffers_then_delivers(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = Guest(fe)
        frames = frames_of(5, 100)
        assert srv.inject(frames) == 5
        time.sleep(0.05)
        assert guest.receive() == []                   # no buffers posted yet
        guest.post_rx(8)
        got: list[bytes] = []
        assert wait_until(lambda: got.extend(guest.receive()) or len(got) == 5)
        assert got == frames


def test_get_vring_base_returns_last_avail_idx_and_stops_the_ring(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = Guest(fe)
        guest.transmit(frames_of(7))
        assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 7)
        reply = fe.send(Request.GET_VRING_BASE, VringState(1, 0))
        assert reply.payload == VringState(1, 7)
        assert not srv.snapshot().vrings[1].started
        guest.transmit(frames_of(3))                   # kicks on a stopped ring
        time.sleep(0.1)
        assert srv.snapshot().counters["guest_tx_frames"] == 7
        # The destination's SET_VRING_BASE resumes from there.
        kick, _ = fe.start_ring(1, base=7)
        os.eventfd_write(kick, 1)
        assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 10)
        assert fe.send(Request.GET_VRING_BASE, VringState(1, 0)).payload.num == 10


def test_dirty_log_sees_rx_writes_and_used_ring(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe, DirtyLog.allocate(fe.memory) as log:
        guest = Guest(fe)
        fe.start_logging(log.fd, log.size, guest.info["acked"])
        snap = srv.snapshot()
        assert snap.logging and all(v.log_used for v in snap.vrings)
        log.sync()                                     # start the round clean
        guest.post_rx(4)
        srv.inject(frames_of(3, 1000))
        assert wait_until(lambda: srv.snapshot().counters["guest_rx_frames"] == 3)
        dirty = set(log.sync().tolist())
        buffers = {(RX_BUF_GPA + i * 4096) // 4096 for i in range(3)}
        used_page = fe.ring_gpas(0)[2] // 4096
        assert buffers <= dirty, "every RX buffer written must be logged"
        assert used_page in dirty, "the used ring is logged at log_guest_addr"
        assert (RX_BUF_GPA + 3 * 4096) // 4096 not in dirty, "an unused buffer was logged"
        assert srv.snapshot().counters["pages_logged"] >= 4


def test_break_logging_skips_the_log(make_server):
    srv = make_server(break_logging=True)
    with ScriptedFrontend(srv.socket_path) as fe, DirtyLog.allocate(fe.memory) as log:
        guest = Guest(fe)
        fe.start_logging(log.fd, log.size, guest.info["acked"])
        guest.post_rx(2)
        srv.inject(frames_of(2, 500))
        assert wait_until(lambda: srv.snapshot().counters["guest_rx_frames"] == 2)
        assert log.popcount() == 0


# -- REPLY_ACK and refused requests --------------------------------------------------
def test_reply_ack_carries_failure_as_non_zero_and_the_connection_lives(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate()
        ok = fe.send(Request.SET_VRING_NUM, VringState(0, 256), need_reply=True)
        assert ok.payload.value == 0
        bad = fe.send(Request.SET_VRING_NUM, VringState(9, 256), need_reply=True)
        assert bad.payload.value != 0
        bad = fe.send(Request.SET_VRING_NUM, VringState(0, 100), need_reply=True)
        assert bad.payload.value != 0                  # not a power of 2
        assert fe.send(Request.GET_FEATURES).payload.value     # still served
        errors = srv.snapshot().counters["errors"]
        assert any("SET_VRING_NUM" in e and "index=9" in e for e in errors), errors


@pytest.mark.parametrize("request_id, payload, fds, owner", [
    (Request.GPU_SET_SOCKET, None, 1, "vhost-user-gpu"),
    (Request.SET_VRING_ENDIAN, VringState(0, 1), 0, "CROSS_ENDIAN"),
    (Request.POSTCOPY_LISTEN, None, 0, "PAGEFAULT"),
    (Request.SET_BACKEND_REQ_FD, None, 1, "BACKEND_REQ"),
])
def test_requests_for_other_devices_or_unoffered_features(make_server, request_id, payload,
                                                          fds, owner):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate()
        before = open_fds()
        efds = [fe.eventfd() for _ in range(fds)]
        # With need_reply under REPLY_ACK: a non-zero status, and the fd closed.
        reply = fe.send(request_id, payload, fds=efds, need_reply=True)
        assert reply.payload.value != 0
        assert wait_until(lambda: open_fds() - before <= {str(fd) for fd in efds})
        assert any(owner in e for e in srv.snapshot().counters["errors"])
        # Without need_reply there is no way to say no: the connection is closed.
        fe.send(request_id, payload, fds=efds)
        assert fe.closed_by_peer()
        assert any("closed" in e and request_id.name in e
                   for e in srv.snapshot().counters["errors"])


def test_requests_with_their_own_failure_reply(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate()
        cfg = fe.send(Request.GET_CONFIG, ConfigSpace(0, 6, 0, bytes(6)))
        assert cfg.payload.payload == bytes.fromhex("525400abcdef")
        # "back-end uses zero length of payload to indicate an error"
        bad = fe.send(Request.GET_CONFIG, ConfigSpace(20, 8, 0, bytes(8)))
        assert bad.payload is None and bad.size == 0
        iotlb = fe.send(Request.IOTLB_MSG, IotlbMsg(0x1000, 0x1000, 0x1000, 3, 2))
        assert iotlb.payload.value != 0
        assert fe.send(Request.GET_QUEUE_NUM).payload.value == 1
        assert fe.send(Request.GET_MAX_MEM_SLOTS).payload.value == 32
        fe.send(Request.SET_STATUS, 0xF)
        assert fe.send(Request.GET_STATUS).payload.value == 0xF


def test_set_config_only_writes_the_mac_outside_migration(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate()
        mac = bytes.fromhex("020000000001")
        assert fe.send(Request.SET_CONFIG, ConfigSpace(0, 6, 0, mac),
                       need_reply=True).payload.value == 0
        assert srv.snapshot().mac == "02:00:00:00:00:01"
        mtu = struct.pack("<H", 9000)
        assert fe.send(Request.SET_CONFIG, ConfigSpace(10, 2, 0, mtu),
                       need_reply=True).payload.value != 0
        assert fe.send(Request.SET_CONFIG, ConfigSpace(10, 2, 1, mtu),
                       need_reply=True).payload.value == 0
        assert srv.snapshot().mtu == 9000
        assert fe.send(Request.NET_SET_MTU, 40, need_reply=True).payload.value != 0
        assert fe.send(Request.NET_SET_MTU, 1400, need_reply=True).payload.value == 0


def test_send_rarp_puts_a_rarp_frame_on_the_wire(make_server, tmp_path):
    from vhostlab.backend import read_pcap
    pcap = tmp_path / "w.pcap"
    srv = make_server(wire=f"pcap:{pcap}")
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate()
        mac = bytes.fromhex("525400123456")
        fe.send(Request.SEND_RARP, int.from_bytes(mac + b"\0\0", "little"), need_reply=True)
    srv.stop()
    (frame,) = read_pcap(str(pcap))
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac
    assert frame[12:14] == b"\x80\x35" and frame[20:22] == b"\x00\x03"   # RARP, op 3
    assert frame[22:28] == mac and frame[32:38] == mac


# -- malformed input -----------------------------------------------------------------
def test_malformed_message_closes_only_that_connection_and_its_fds(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate()
        before = open_fds()
        memfd = os.memfd_create("bad")
        os.ftruncate(memfd, 1 << 20)
        # SET_MEM_TABLE claiming 2 regions, carrying 1 fd: the fd must still be closed.
        bad = struct.pack("<III", 5, 1, 8 + 64) + struct.pack("<II", 2, 0) + bytes(64)
        fe.send_raw(bad, fds=[memfd])
        os.close(memfd)
        assert fe.closed_by_peer()
    assert wait_until(lambda: open_fds() <= before)
    errors = srv.snapshot().counters["errors"]
    assert any("SET_MEM_TABLE" in e for e in errors), errors
    bad_rec = [r for r in srv.snapshot().trace if r.error]
    assert bad_rec and bad_rec[-1].request == "SET_MEM_TABLE" and bad_rec[-1].nfds == 1
    with ScriptedFrontend(srv.socket_path) as fe:       # the next front-end is served
        fe.negotiate()


@pytest.mark.parametrize("raw", [
    struct.pack("<III", 99, 1, 0),                      # unknown request id
    struct.pack("<III", 1, 2, 0),                       # version bits 2
    struct.pack("<III", 8, 1, 4) + bytes(4),            # SET_VRING_NUM payload too short
    struct.pack("<III", 2, 1, 0x7FFFFFFF),              # absurd size
    struct.pack("<III", 1, 5, 0),                       # a reply sent to the back-end
])
def test_garbage_closes_the_connection_with_a_named_error(make_server, raw):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.send_raw(raw)
        assert fe.closed_by_peer()
    assert wait_until(lambda: len(srv.snapshot().counters["errors"]) == 1)
    (error,) = srv.snapshot().counters["errors"]
    assert "closed" in error and ("request" in error or "flags" in error or "size" in error)


def test_offsets_past_a_mapping_are_refused(make_server):
    from vhostlab.protocol import MemoryRegion, MemoryTable
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate()
        (region, fd), = [x for x in fe.memory.memory_table() if x[0].memory_size > 1 << 20]
        past = MemoryRegion(0x100000, region.memory_size, region.userspace_addr,
                            region.mmap_offset + 0x1000)     # runs past the memfd
        reply = fe.send(Request.SET_MEM_TABLE, MemoryTable((past,)), fds=[fd], need_reply=True)
        assert reply.payload.value != 0
        assert srv.snapshot().memory == ()
        assert any("exceeds the file size" in e for e in srv.snapshot().counters["errors"])
        # A vring address outside every region: refused, ring not mapped.
        fe.set_mem_table()
        fe.send(Request.SET_VRING_NUM, VringState(0, 256))
        addr = fe.vring_addr(0)
        from dataclasses import replace
        reply = fe.send(Request.SET_VRING_ADDR, replace(addr, used_user_addr=0x10),
                        need_reply=True)
        assert reply.payload.value != 0 and srv.snapshot().vrings[0].desc is None


def test_hostile_guest_breaks_only_its_ring(make_server):
    srv = make_server(wire="loopback")
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = Guest(fe)
        tx = guest.drivers[1]
        tx.add_buffer([(0x7FFFFFF000, 64, False)])         # far outside guest RAM
        tx.publish()
        os.eventfd_write(guest.kick[1], 1)
        assert wait_until(lambda: srv.snapshot().vrings[1].error is not None)
        snap = srv.snapshot()
        assert "addr" in snap.vrings[1].error and "queue 1" in snap.vrings[1].error
        assert os.eventfd_read(fe.eventfds[3]) >= 1         # queue 1's err eventfd
        # RX still works, and the control plane still answers.
        guest.post_rx(1)
        srv.inject([b"z" * 64])
        got: list[bytes] = []
        assert wait_until(lambda: got.extend(guest.receive()) or got == [b"z" * 64])
        assert fe.send(Request.GET_VRING_BASE, VringState(1, 0)).payload.num == 0


# -- notification suppression and merged buffers -----------------------------------
def _guest_with(fe: ScriptedFrontend, features: int, event_idx: bool = False) -> Guest:
    g = Guest.__new__(Guest)
    g.fe = fe
    g.drivers = [VirtqueueDriver(fe.memory, RING_NUM, fe.ring_gpas(i)[0], event_idx=event_idx)
                 for i in range(2)]
    g.info = fe.start(features=features)
    fe.sync()
    g.kick = {i: k for i, (k, c) in g.info["rings"].items()}
    g.call = {i: c for i, (k, c) in g.info["rings"].items()}
    return g


def test_no_interrupt_flag_suppresses_calls(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = _guest_with(fe, Feature.VHOST_USER_F_PROTOCOL_FEATURES | Feature.VIRTIO_F_VERSION_1)
        tx = guest.drivers[1]
        tx.views.avail_flags[0] = 1                   # VRING_AVAIL_F_NO_INTERRUPT
        guest.transmit(frames_of(4))
        assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 4)
        assert srv.snapshot().counters["calls"] == 0
        with pytest.raises(BlockingIOError):
            os.eventfd_read(guest.call[1])
        tx.views.avail_flags[0] = 0
        guest.transmit(frames_of(1))
        assert wait_until(lambda: srv.snapshot().counters["calls"] == 1)
        assert os.eventfd_read(guest.call[1]) == 1


def test_event_idx_publishes_avail_event_and_honours_used_event(make_server):
    srv = make_server()
    features = (Feature.VHOST_USER_F_PROTOCOL_FEATURES | Feature.VIRTIO_F_VERSION_1
                | Feature.VIRTIO_RING_F_EVENT_IDX)
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = _guest_with(fe, features, event_idx=True)
        assert "VIRTIO_RING_F_EVENT_IDX" in srv.snapshot().feature_names
        tx = guest.drivers[1]
        tx.views.used_event[0] = 100                  # "interrupt me once used passes 100"
        guest.transmit(frames_of(5))
        assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 5)
        assert int(tx.views.avail_event[0]) == 5      # "kick me when avail passes 5"
        # The first publish always calls (no previous signal); then used_event rules.
        calls = srv.snapshot().counters["calls"]
        guest.transmit(frames_of(5))
        assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 10)
        assert srv.snapshot().counters["calls"] == calls   # used 10 has not passed 100
        tx.views.used_event[0] = 10
        guest.transmit(frames_of(1))
        assert wait_until(lambda: srv.snapshot().counters["calls"] == calls + 1)


def test_mergeable_rx_buffers_carry_a_big_frame_across_chains(make_server):
    srv = make_server()
    features = (Feature.VHOST_USER_F_PROTOCOL_FEATURES | Feature.VIRTIO_F_VERSION_1
                | Feature.VIRTIO_NET_F_MRG_RXBUF)
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = _guest_with(fe, features)
        rx = guest.drivers[0]
        for i in range(8):
            rx.add_buffer([(RX_BUF_GPA + i * 4096, 512, True)])
        rx.publish()
        big = frames_of(1, 1400)[0]
        srv.inject([big])
        assert wait_until(lambda: srv.snapshot().counters["guest_rx_frames"] == 1)
        used = rx.get_used()
        assert [length for _, length in used] == [512, 512, 12 + 1400 - 1024]
        first = fe.memory.read(RX_BUF_GPA + used[0][0] * 4096, 512)
        assert struct.unpack_from("<H", first, 10)[0] == 3     # num_buffers
        data = b"".join(fe.memory.read(RX_BUF_GPA + h * 4096, n) for h, n in used)
        assert data[12:] == big


# -- a bug in one place costs one connection or one ring, not the server ------------
def test_an_internal_error_costs_one_connection(make_server, monkeypatch):
    srv = make_server()

    def broken(dev, msg, fds):
        raise ZeroDivisionError("on purpose")
    monkeypatch.setitem(srv.handlers, Request.SET_OWNER, broken)
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.send(Request.SET_OWNER)
        assert fe.closed_by_peer()
    assert any("internal error" in e for e in srv.snapshot().counters["errors"])
    with ScriptedFrontend(srv.socket_path) as fe:
        assert fe.send(Request.GET_FEATURES).payload.value


def test_handlers_given_to_one_server_stay_in_that_server(make_server):
    calls = []

    def get_features(dev, msg, fds):
        calls.append(msg.request)
        return U64(1 << 30)
    mine = make_server(handlers={Request.GET_FEATURES: get_features})
    other = make_server()
    with ScriptedFrontend(mine.socket_path) as fe:
        assert fe.send(Request.GET_FEATURES).payload.value == 1 << 30
    with ScriptedFrontend(other.socket_path) as fe:
        assert fe.send(Request.GET_FEATURES).payload.value != 1 << 30
    assert calls == [Request.GET_FEATURES]


def test_an_internal_error_in_the_datapath_costs_one_ring(make_server, monkeypatch):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = Guest(fe)

        def failing_send(arena, pair):
            raise RuntimeError("wire on fire")
        monkeypatch.setattr(srv.wire, "send", failing_send)
        guest.transmit(frames_of(1))
        assert wait_until(lambda: srv.snapshot().vrings[1].error is not None)
        assert "wire on fire" in srv.snapshot().vrings[1].error
        guest.post_rx(1)
        srv.inject([b"still" * 12])
        got: list[bytes] = []
        assert wait_until(lambda: got.extend(guest.receive()) or got == [b"still" * 12])


def test_backlog_of_several_injections_drains_in_one_go(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = Guest(fe)
        batches = [frames_of(3, 70 + k) for k in range(4)]
        for batch in batches:                      # four waiting arenas, no buffers yet
            srv.inject(batch)
        assert wait_until(lambda: srv.snapshot().vrings[0].started)
        time.sleep(0.05)
        guest.post_rx(12)                          # one kick: all twelve must arrive
        got: list[bytes] = []
        assert wait_until(lambda: got.extend(guest.receive()) or len(got) == 12)
        assert got == [f for batch in batches for f in batch]


def test_dispatch_checks_every_request_the_same_way_before_its_handler():
    """Messages built in a notebook reach `dispatch` without the parser: same checks."""
    from vhostlab.backend import VhostUserNetDevice, dispatch
    from vhostlab.protocol import Message
    dev = VhostUserNetDevice()
    efd = os.eventfd(0)
    # A kick without its fd, a GET_FEATURES with an fd, a payload of the wrong type.
    nofd = dispatch(dev, Message(Request.SET_VRING_KICK, 1, U64(0), ()))
    assert nofd.error and nofd.error.field == "fds" and nofd.error.value == 0
    extra = dispatch(dev, Message(Request.GET_FEATURES, 1, None, (efd,)))
    assert extra.error and extra.error.field == "fds"
    with pytest.raises(OSError):
        os.fstat(efd)                              # refused, and its fd closed
    wrong = dispatch(dev, Message(Request.SET_VRING_NUM, 1, U64(256), ()))
    assert wrong.error and wrong.error.field == "payload" and "VringState" in str(wrong.error)
    ok = dispatch(dev, Message(Request.GET_FEATURES, 1, None, ()))
    assert ok.error is None and ok.payload.value == dev.offered_features


def test_a_ring_has_one_state_and_a_disabled_ring_says_so():
    """vhost-user.rst "Ring states": one RingState per ring, in the repr and the snapshot."""
    from vhostlab.backend import VhostUserNetDevice, dispatch
    from vhostlab.backend.snapshot import vring_snapshot
    from vhostlab.protocol import Message, ProtocolFeature
    from vhostlab.ring import RingState
    dev = VhostUserNetDevice()
    vring = dev.vrings[1]
    assert vring.state is RingState.STOPPED and "stopped" in repr(vring)
    features = dev.offered_features & ~int(Feature.VIRTIO_RING_F_EVENT_IDX)
    for request, payload in ((Request.SET_FEATURES, U64(features)),
                             (Request.SET_PROTOCOL_FEATURES, U64(int(ProtocolFeature.MQ)))):
        assert dispatch(dev, Message(request, 1, payload, ())).error is None
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    assert dispatch(dev, Message(Request.SET_VRING_KICK, 1, U64(1), (efd,))).error is None
    assert vring.state is RingState.STARTED_DISABLED
    assert "started but disabled" in repr(vring) and "enabled>" not in repr(vring)
    assert vring_snapshot(dev, vring, False).state == "started but disabled"
    assert dispatch(dev, Message(Request.SET_VRING_ENABLE, 1, VringState(1, 1), ())).error is None
    assert vring.state is RingState.STARTED_ENABLED and vring.started and vring.enabled
    assert dispatch(dev, Message(Request.SET_VRING_ENABLE, 1, VringState(1, 0), ())).error is None
    assert "started but disabled" in repr(vring)
    got = dispatch(dev, Message(Request.GET_VRING_BASE, 1, VringState(1, 0), ()))
    assert got.error is None and vring.state is RingState.STOPPED
    vring.set_broken()                                        # a guest broke a rule
    for request in (Request.SET_VRING_ENABLE, Request.GET_VRING_BASE):
        dispatch(dev, Message(request, 1, VringState(1, 1), ()))
        assert vring.state is RingState.BROKEN and not vring.started
    assert dispatch(dev, Message(Request.SET_VRING_BASE, 1, VringState(1, 0), ())).error is None
    assert vring.state is RingState.STOPPED
    dev.release()


def test_protocol_bits_not_offered_close_the_connection_even_with_need_reply(make_server):
    """One rule, one failure mode: the connection (BackendConnection) refuses
    un-offered protocol bits by closing, as DPDK and rust-vmm do; no NACK."""
    from vhostlab.protocol import ProtocolFeature
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        assert wait_until(lambda: srv.connected)
        offered = srv.device.offered_protocol_features
        extra = int(ProtocolFeature.BACKEND_REQ)
        assert not offered & extra
        with pytest.raises(ConnectionError):
            fe.send(Request.SET_PROTOCOL_FEATURES, U64(offered | extra), need_reply=True)
        assert wait_until(lambda: not srv.connected)
    assert srv.summary()["errors"] and srv.device.protocol_features == 0
