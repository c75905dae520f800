"""Spec conformance of the back-end, request by request, over a real socket with real fds.

Each test pins a rule of vhost-user.rst (or what QEMU, DPDK's lib/vhost and
libvhost-user do where the spec leaves room) that an earlier version of the
back-end broke or that a plausible rewrite would break.
"""
from __future__ import annotations

import os
import select
import struct

import pytest

from test_backend_protocol import (Guest, frames_of, make_server,  # noqa: F401
                                   open_fds, wait_until)
from test_backend_scripted import ScriptedFrontend
from vhostlab.dirtylog import DirtyLog
from vhostlab.protocol import (Feature, InflightArea, LogArea, Message, ProtocolFeature,
                               Request, SharedObject, TransferDeviceState, U64, VringState,
                               parse_message)

NOFD = 0x100


def raw_request(fe: ScriptedFrontend, msg: Message, timeout: float = 5.0) -> Message:
    """Send `msg` as is (any fds, no client-side checks) and read the one reply."""
    fe.send_raw(msg.to_bytes(), fds=msg.fds)
    data = b""
    while len(data) < 12 or len(data) < 12 + struct.unpack_from("<I", data, 8)[0]:
        if not select.select([fe.sock], [], [], timeout)[0]:
            raise AssertionError(f"no reply to {msg.request.name}")
        chunk = fe.sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"the back-end closed the connection on {msg.request.name}")
        data += chunk
    return parse_message(data)


def same_file_fds(fd: int) -> int:
    """How many other fds of this process refer to the file behind `fd` (a memfd or
    pipe: eventfds all share one inode, use open_fds() for them)."""
    st = os.fstat(fd)
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            other = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        count += (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)
    return count - 1                # listdir's own fd is not among them; `fd` itself is


def errors(srv) -> list[str]:
    return list(srv.snapshot(trace=False).counters["errors"])


# -- REPLY_ACK: every request with need_reply gets an answer ----------------------------
@pytest.mark.parametrize("request_id, value, nfds", [
    (Request.SET_VRING_CALL, 0, 0),              # an fd promised (bit 8 clear), none sent
    (Request.SET_VRING_KICK, 1 | NOFD, 1),       # "no fd" (bit 8), one sent anyway
    (Request.SET_VRING_ERR, 0, 2),               # two where one belongs
])
def test_wrong_fd_count_with_need_reply_is_answered_with_a_failure(make_server, request_id,
                                                                    value, nfds):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate()
        efds = [fe.eventfd() for _ in range(nfds)]
        before = open_fds()
        reply = raw_request(fe, Message(request_id, 0x9, U64(value), tuple(efds)))
        # "the back-end MUST respond with a Payload VhostUserMsg indicating success
        # or failure" (REPLY_ACK): non-zero, flags exactly 0x5, same request id.
        assert reply.request is request_id and reply.flags == 0x5 and reply.payload.value != 0
        assert wait_until(lambda: open_fds() <= before)        # the copies sent were closed
        assert fe.send(Request.GET_FEATURES).payload.value        # the connection lives
        assert any(request_id.name in e and "fds=" in e for e in errors(srv)), errors(srv)
        # Without need_reply there is no way to say no: the connection is closed.
        fe.send_raw(Message(request_id, 0x1, U64(value), tuple(efds)).to_bytes(), fds=efds)
        assert fe.closed_by_peer()


def test_memory_table_with_too_few_fds_is_refused_and_its_fds_closed(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate()
        (ram_fd,) = {fd for _, fd in fe.memory.memory_table()}
        table = fe.memory_table()                               # 3 regions, 2 fds sent
        reply = raw_request(fe, Message(Request.SET_MEM_TABLE, 0x9, table, (ram_fd, ram_fd)))
        assert reply.payload.value != 0 and srv.snapshot().memory == ()
        assert wait_until(lambda: same_file_fds(ram_fd) == 0)
        assert fe.set_mem_table().payload.value == 0            # the right count works


# -- SET_FEATURES ---------------------------------------------------------------------
def test_only_log_all_may_change_while_rings_run(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = Guest(fe)
        acked = guest.info["acked"]
        # DPDK's vhost_user_set_features: "features changed while device is running".
        legacy = acked & ~Feature.VIRTIO_F_VERSION_1
        assert fe.send(Request.SET_FEATURES, legacy, need_reply=True).payload.value != 0
        snap = srv.snapshot()
        assert snap.features == acked and snap.hdr_len == 12
        assert any("VHOST_F_LOG_ALL" in e and "started" in e for e in errors(srv))
        # Live migration turns logging on and off on running rings.
        for value in (acked | Feature.VHOST_F_LOG_ALL, acked):
            assert fe.send(Request.SET_FEATURES, value, need_reply=True).payload.value == 0
        # Stopped by GET_VRING_BASE, the device may be renegotiated.
        for i in range(2):
            fe.send(Request.GET_VRING_BASE, VringState(i, 0))
        assert fe.send(Request.SET_FEATURES, legacy, need_reply=True).payload.value == 0
        assert srv.snapshot().hdr_len == 10


def test_features_not_offered_are_refused(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        offered, _ = fe.negotiate()
        assert not offered & Feature.VIRTIO_F_ACCESS_PLATFORM
        reply = fe.send(Request.SET_FEATURES, offered | Feature.VIRTIO_F_ACCESS_PLATFORM,
                        need_reply=True)
        assert reply.payload.value != 0 and srv.snapshot().features == 0


# -- the dirty log ----------------------------------------------------------------------
def test_the_log_must_cover_every_logged_used_ring(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe, DirtyLog.allocate(8) as tiny, \
            DirtyLog.allocate(fe.memory) as log:
        guest = Guest(fe)
        used_page = fe.ring_gpas(0)[2] // 4096
        assert tiny.pages <= used_page < log.pages
        # F_LOG before any log is fine: QEMU's vhost_dev_start sends the log last.
        assert fe.send(Request.SET_VRING_ADDR, fe.vring_addr(0, log=True),
                       need_reply=True).payload.value == 0
        # "the bit offset of the last byte of the ring must fall within the size
        # supplied by VhostUserLog": a log that misses ring 0's used ring is refused.
        reply = fe.send(Request.SET_LOG_BASE, LogArea(tiny.size, 0), fds=[tiny.fd],
                        need_reply=True)
        assert reply.payload.value != 0 and srv.snapshot().log is None
        assert any("SET_LOG_BASE" in e and "vring 0" in e for e in errors(srv))
        fe.start_logging(log.fd, log.size, guest.info["acked"])
        assert srv.snapshot().log.mmap_size == log.size
        # The fd that came with SET_LOG_BASE was closed once mapped; what may stay
        # open is the mapping's own reference (CPython's mmap keeps a dup of the
        # fd while mapped; the front-end's DirtyLog holds one as well).
        assert wait_until(lambda: same_file_fds(log.fd) <= 2)
        # Once there is a log, a ring whose used ring it does not cover is refused.
        from dataclasses import replace
        far = replace(fe.vring_addr(1, log=True), log_guest_addr=log.pages * 4096)
        assert fe.send(Request.SET_VRING_ADDR, far, need_reply=True).payload.value != 0
        assert srv.snapshot().vrings[1].log_guest_addr == fe.ring_gpas(1)[2]
        # Without need_reply a refused SET_LOG_BASE closes the connection: QEMU
        # reads the reply but not its value, so a failure reply would read as success.
        fe.send_raw(Message.make(Request.SET_LOG_BASE, LogArea(tiny.size, 0),
                                 fds=[tiny.fd]).to_bytes(), fds=[tiny.fd])
        assert fe.closed_by_peer()
        # The connection released the log: only the front-end's own mapping is left.
        assert wait_until(lambda: same_file_fds(log.fd) <= 1 and same_file_fds(tiny.fd) <= 1)


def test_memory_fds_are_closed_once_mapped(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate(protocol=int(ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS))
        (ram_fd,) = {fd for _, fd in fe.memory.memory_table()}
        assert fe.set_mem_table().payload.value == 0          # 3 regions, 3 fds of one memfd
        assert len(srv.snapshot().memory) == 3
        assert wait_until(lambda: same_file_fds(ram_fd) == 0)
        extra = os.memfd_create("vhostlab-test-extra", os.MFD_CLOEXEC)
        try:
            os.ftruncate(extra, 1 << 20)
            from vhostlab.protocol import MemoryRegion, SingleMemoryRegion
            added = MemoryRegion(0x40000000, 1 << 20, 0x7E0000000000, 0)
            assert fe.send(Request.ADD_MEM_REG, SingleMemoryRegion(added), fds=[extra],
                           need_reply=True).payload.value == 0
            assert wait_until(lambda: same_file_fds(extra) == 0)
            # REM_MEM_REG: "If a file descriptor is passed, the back-end MUST close it".
            assert fe.send(Request.REM_MEM_REG, SingleMemoryRegion(added), fds=[extra],
                           need_reply=True).payload.value == 0
            assert wait_until(lambda: same_file_fds(extra) == 0)
            assert [r.guest_phys_addr for r in srv.snapshot().memory] == \
                [r.guest_phys_addr for r in fe.memory_table().regions]
        finally:
            os.close(extra)


def test_a_new_memory_table_under_running_rings_remaps_them(make_server):
    """QEMU sends SET_MEM_TABLE again on memory hot-plug while rings run; DPDK and
    libvhost-user re-translate the rings. The old mappings must go."""
    srv = make_server(wire="loopback")
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = Guest(fe)
        guest.post_rx(16)
        guest.transmit(frames_of(4))
        got: list[bytes] = []
        assert wait_until(lambda: got.extend(guest.receive()) or len(got) == 4)
        before = ram_mappings()
        assert fe.set_mem_table().payload.value == 0
        assert ram_mappings() == before, "the old table's mappings were not released"
        assert all(v.started and v.error is None for v in srv.snapshot().vrings)
        guest.transmit(frames_of(4, 100))
        assert wait_until(lambda: got.extend(guest.receive()) or len(got) == 8)
        assert got == frames_of(4) + frames_of(4, 100)


def ram_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("memfd:vhostlab-guest-ram" in line for line in f)


# -- vring state ------------------------------------------------------------------------
def test_set_vring_base_takes_the_used_index_from_guest_memory(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = Guest(fe)
        guest.transmit(frames_of(5))
        assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 5)
        assert fe.send(Request.GET_VRING_BASE, VringState(1, 0)).payload.num == 5
        # The ring is stopped but still mapped. SET_VRING_BASE carries only the
        # avail index; "The device is supposed to read the next index in the Used
        # Ring from the respective vring structure in guest memory."
        fe.send(Request.SET_VRING_BASE, VringState(1, 3))
        fe.sync()
        ring = srv.snapshot().vrings[1]
        assert (ring.last_avail_idx, ring.used_idx) == (3, 5)


def test_set_status_zero_before_get_vring_base_keeps_the_ring_position(make_server):
    """QEMU 8+ vhost_dev_stop sends SET_STATUS 0 *before* GET_VRING_BASE: status 0
    must not reset the device, or the migrated last_avail_idx would be 0."""
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = Guest(fe)
        fe.send(Request.SET_STATUS, 0xF)
        guest.transmit(frames_of(7))
        assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 7)
        fe.send(Request.SET_STATUS, 0)
        assert fe.send(Request.GET_STATUS).payload.value == 0
        assert fe.send(Request.GET_VRING_BASE, VringState(1, 0)).payload == VringState(1, 7)


def test_without_protocol_features_a_started_ring_is_enabled(make_server):
    """"If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated, the ring starts
    directly in the enabled state": also when it starts again after RESET_OWNER
    disabled every ring (SET_VRING_ENABLE is not available to such a front-end)."""
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        from test_backend_protocol import _guest_with
        guest = _guest_with(fe, Feature.VIRTIO_F_VERSION_1)
        guest.transmit(frames_of(2))
        assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 2)
        fe.send(Request.RESET_OWNER)
        fe.sync()
        assert not any(v.enabled for v in srv.snapshot().vrings)
        fe.send(Request.GET_VRING_BASE, VringState(1, 0))
        kick, _ = fe.start_ring(1, base=2)
        fe.sync()
        assert srv.snapshot().vrings[1].enabled
        guest.kick[1] = kick
        guest.transmit(frames_of(3))
        assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 5)
        assert srv.snapshot().counters["dropped"] == 0


def test_a_restarted_ring_always_interrupts_first(make_server):
    """GET_VRING_BASE forgets the last signalled used index (DPDK resets
    signalled_used_valid, Linux's vhost_vq_init_access too): with EVENT_IDX the
    first used buffer after a restart must signal, whatever used_event was."""
    from test_backend_protocol import _guest_with
    srv = make_server()
    features = (Feature.VHOST_USER_F_PROTOCOL_FEATURES | Feature.VIRTIO_F_VERSION_1
                | Feature.VIRTIO_RING_F_EVENT_IDX)
    with ScriptedFrontend(srv.socket_path) as fe:
        guest = _guest_with(fe, features, event_idx=True)
        tx = guest.drivers[1]
        guest.transmit(frames_of(2))
        assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 2)
        tx.views.used_event[0] = 1000                  # "do not interrupt me for a while"
        guest.transmit(frames_of(2))
        assert wait_until(lambda: srv.snapshot().counters["guest_tx_frames"] == 4)
        calls = srv.snapshot().counters["calls"]
        fe.send(Request.GET_VRING_BASE, VringState(1, 0))
        kick, call = fe.eventfd(), fe.eventfd()       # restarted by kick and call alone
        fe.send(Request.SET_VRING_KICK, U64(1), fds=[kick])
        fe.send(Request.SET_VRING_CALL, U64(1), fds=[call])
        fe.sync()
        guest.kick[1] = kick
        guest.transmit(frames_of(1))
        assert wait_until(lambda: srv.snapshot().counters["calls"] == calls + 1)
        assert os.eventfd_read(call) == 1


@pytest.mark.parametrize("request_id, payload", [
    (Request.SET_VRING_NUM, VringState(2, 256)),
    (Request.SET_VRING_BASE, VringState(2, 0)),
    (Request.SET_VRING_ADDR, None),
    (Request.SET_VRING_ENABLE, VringState(2, 1)),
    (Request.SET_VRING_KICK, U64(2 | NOFD)),
    (Request.SET_VRING_CALL, U64(2 | NOFD)),
    (Request.SET_VRING_ERR, U64(2 | NOFD)),
])
def test_every_per_ring_request_checks_the_queue_index(make_server, request_id, payload):
    srv = make_server()                       # one queue pair: vrings 0 and 1
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate()
        if payload is None:
            from dataclasses import replace
            fe.set_mem_table()
            payload = replace(fe.vring_addr(0), index=2)
        reply = raw_request(fe, Message.make(request_id, payload, need_reply=True))
        assert reply.payload.value != 0
        assert any(f"{request_id.name}: index=2" in e for e in errors(srv)), errors(srv)
        assert fe.send(Request.GET_FEATURES).payload.value


def test_get_vring_base_of_an_unknown_ring_closes_the_connection(make_server):
    """GET_VRING_BASE has no way to say "failed" (its reply is the base): QEMU would
    migrate a made-up last_avail_idx, so the back-end closes instead, as DPDK does."""
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate()
        fe.send_raw(Message.make(Request.GET_VRING_BASE, VringState(2, 0),
                                 need_reply=True).to_bytes())
        assert fe.closed_by_peer()
    assert any("GET_VRING_BASE: index=2" in e for e in errors(srv)), errors(srv)


# -- requests of features this back-end does not offer ---------------------------------
def test_newer_requests_get_the_failure_the_spec_defines(make_server):
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate()
        uuid = SharedObject(bytes(range(16)))
        reply = raw_request(fe, Message.make(Request.GET_SHARED_OBJECT, uuid))
        assert reply.payload == uuid and reply.fds == ()      # no dma-buf fd
        read_end, write_end = os.pipe()
        try:
            state = Message.make(Request.SET_DEVICE_STATE_FD, TransferDeviceState(0, 0),
                                 fds=[write_end], need_reply=True)
            status = raw_request(fe, state).payload.value
            # "Bits 0-7 are 0 on success, and non-zero on error. Bit 8 is the invalid
            # FD flag" and an error never comes with an fd.
            assert status & 0xFF != 0 and status & NOFD
            os.close(write_end)
            write_end = -1
            # The back-end closed its copy of the write end: the pipe reads EOF.
            assert select.select([read_end], [], [], 5)[0] and os.read(read_end, 1) == b""
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        assert raw_request(fe, Message.make(Request.CHECK_DEVICE_STATE)).payload.value != 0
        assert any("DEVICE_STATE" in e for e in errors(srv))
        assert fe.send(Request.GET_FEATURES).payload.value


def test_requests_legal_once_offered_need_no_negotiation(make_server, tmp_path):
    """GET_QUEUE_NUM "should be sent only when VHOST_USER_PROTOCOL_F_MQ is set in
    queried protocol features"; SEND_RARP and NET_SET_MTU are legal when their bit
    "is present in VHOST_USER_GET_PROTOCOL_FEATURES"; RESET_DEVICE when the bit "is
    set by the back-end". Offered is enough; acknowledged is not required."""
    from vhostlab.backend import read_pcap
    pcap = tmp_path / "w.pcap"
    srv = make_server(wire=f"pcap:{pcap}")
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate(protocol=int(ProtocolFeature.REPLY_ACK))     # none of the four acked
        assert fe.send(Request.GET_QUEUE_NUM).payload.value == 1
        mac = bytes.fromhex("525400123456")
        assert fe.send(Request.SEND_RARP, int.from_bytes(mac + b"\0\0", "little"),
                       need_reply=True).payload.value == 0
        assert fe.send(Request.NET_SET_MTU, 9000, need_reply=True).payload.value == 0
        assert srv.snapshot().mtu == 9000
        assert fe.send(Request.RESET_DEVICE, need_reply=True).payload.value == 0
        assert srv.snapshot().mtu == 1500                      # the initial state again
        # A bit the back-end does not offer still gates its request.
        assert fe.send(Request.SET_VRING_ENDIAN, VringState(0, 0),
                       need_reply=True).payload.value != 0
    srv.stop()
    assert [frame[6:12] for frame in read_pcap(str(pcap))] == [mac]


def test_fd_carrying_replies_have_failure_forms(make_server):
    """Not offered, and yet answered the way QEMU understands: GET_INFLIGHT_FD with
    mmap_size 0 and no fd (libvhost-user's form: "no inflight buffer"),
    POSTCOPY_ADVISE without a userfaultfd (QEMU: "Failed to get ufd")."""
    srv = make_server()
    with ScriptedFrontend(srv.socket_path) as fe:
        fe.negotiate()
        inflight = fe.send(Request.GET_INFLIGHT_FD, InflightArea(0, 0, 2, 256))
        assert inflight.payload == InflightArea(0, 0, 2, 256) and inflight.fds == ()
        advise = fe.send(Request.POSTCOPY_ADVISE)
        assert advise.payload is None and advise.fds == ()
        assert any("INFLIGHT_SHMFD" in e for e in errors(srv))
        assert any("PAGEFAULT" in e for e in errors(srv))
