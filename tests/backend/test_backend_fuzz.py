"""Socket-level fuzzing of a live back-end.

Hypothesis builds a QEMU-like start-up conversation (negotiation, memory
table, rings, kicks, dirty log, memory hot-plug, config, status, stop and
reset), then mutates it: bit flips, truncation, rewritten size/request/flag
fields, messages dropped, repeated or inserted, fds missing, extra or of the
wrong kind (eventfds, memfds, pipes, sockets, /dev/null where another belongs),
and random bytes in the guest's rings. Each stream goes over a real unix
socket with SCM_RIGHTS to one BackendServer running in this process.

Every request that waits for a reply must get exactly one correct reply, in
order, or the connection is closed with the reason in the server's errors.
After every stream the server must still run, hold none of the stream's fds
or mappings (the process is back at its baseline of open fds, memfd mappings
and guest-memory reservations), have hit no internal error, and answer
GET_FEATURES on a fresh connection.
"""
from __future__ import annotations

import gc
import os
import select
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from test_backend_protocol import Guest, frames_of, open_fds, wait_until
from test_backend_reconnect import maps_lines
from test_backend_scripted import ScriptedFrontend
from vhostlab.backend import BackendServer
from vhostlab.backend.soak import check_replies, expected_replies
from vhostlab.backend.device import OFFERED_PROTOCOL_FEATURES
from vhostlab.protocol import (ConfigSpace, Feature, LogArea, MemoryRegion, MemoryTable,
                               Message, Request, SingleMemoryRegion, VringAddr,
                               VringState, parse_message)
from vhostlab.ring.layout import vring_layout

RAM = 4 << 20
UVA = 0x7F0000000000                # where "QEMU" mapped guest RAM
HOTPLUG_GPA, HOTPLUG_UVA = 0x40000000, 0x7E0000000000
NUM = 64
RING_GPA = (0x100000, 0x110000)     # RX, TX
LOG_SIZE = RAM // 4096 // 8         # one bit per 4 KiB page of RAM
FD_KINDS = ("eventfd", "memfd", "pipe", "socket", "devnull")
EXAMPLES = 100


# -- the conversation ---------------------------------------------------------------
def _msg(request: Request, payload=None, roles=(), need_reply=False) -> tuple[bytes, list]:
    """One step: the message's bytes and the roles of the fds that go with it."""
    nfds = len(roles)
    msg = Message.make(request, payload, tuple(range(nfds)), need_reply)
    return msg.to_bytes(), list(roles)


def _addr(index: int, log: bool) -> VringAddr:
    lay = vring_layout(RING_GPA[index], NUM)
    return VringAddr(index, int(log), UVA + lay.desc, UVA + lay.used, UVA + lay.avail, lay.used)


def start_up(features: int, protocol: int, need_reply: bool) -> list[tuple[bytes, list]]:
    """QEMU 7.2's conversation (FACTS.md section 1), and what comes after it."""
    R, nr = Request, need_reply
    steps = [_msg(R.GET_FEATURES), _msg(R.GET_PROTOCOL_FEATURES),
             _msg(R.SET_PROTOCOL_FEATURES, protocol), _msg(R.SET_OWNER), _msg(R.GET_FEATURES)]
    for i in range(2):
        steps += [_msg(R.SET_VRING_CALL, i, ["eventfd"]), _msg(R.SET_VRING_ERR, i, ["eventfd"]),
                  _msg(R.SET_VRING_ENABLE, VringState(i, 0))]
    steps += [_msg(R.SET_FEATURES, features),
              _msg(R.SET_MEM_TABLE, MemoryTable((MemoryRegion(0, RAM, UVA, 0),)), ["ram"],
                   need_reply=True)]
    for i in range(2):
        steps += [_msg(R.SET_VRING_NUM, VringState(i, NUM)), _msg(R.SET_VRING_BASE, VringState(i, 0)),
                  _msg(R.SET_VRING_ADDR, _addr(i, False)), _msg(R.SET_VRING_KICK, i, ["kick"]),
                  _msg(R.SET_VRING_CALL, i, ["eventfd"])]
    steps += [_msg(R.SET_VRING_ENABLE, VringState(i, 1)) for i in range(2)]
    steps += [_msg(R.SET_LOG_BASE, LogArea(LOG_SIZE, 0), ["log"]),
              _msg(R.SET_FEATURES, features | Feature.VHOST_F_LOG_ALL, need_reply=True)]
    steps += [_msg(R.SET_VRING_ADDR, _addr(i, True), need_reply=True) for i in range(2)]
    hotplug = SingleMemoryRegion(MemoryRegion(HOTPLUG_GPA, 1 << 20, HOTPLUG_UVA, 0))
    steps += [_msg(R.ADD_MEM_REG, hotplug, ["memfd"], need_reply=nr),
              _msg(R.GET_CONFIG, ConfigSpace(0, 6, 0, bytes(6))),
              _msg(R.SET_STATUS, 0xF, need_reply=nr), _msg(R.GET_STATUS),
              _msg(R.GET_QUEUE_NUM), _msg(R.GET_MAX_MEM_SLOTS),
              _msg(R.NET_SET_MTU, 1500, need_reply=nr), _msg(R.SEND_RARP, 0x5634120054520000),
              _msg(R.REM_MEM_REG, hotplug, need_reply=nr),
              _msg(R.GET_VRING_BASE, VringState(0, 0)), _msg(R.GET_VRING_BASE, VringState(1, 0)),
              _msg(R.SET_FEATURES, features, need_reply=nr), _msg(R.RESET_DEVICE)]
    return steps


@st.composite
def streams(draw) -> list[tuple[bytes, list]]:
    """A start-up conversation, whole or cut short, then 0-6 mutations."""
    features = Feature.VHOST_USER_F_PROTOCOL_FEATURES | draw(st.sampled_from(
        [Feature.VIRTIO_F_VERSION_1, Feature.VIRTIO_F_VERSION_1 | Feature.VIRTIO_RING_F_EVENT_IDX,
         Feature.VIRTIO_NET_F_MRG_RXBUF, 0]))
    offered = int(OFFERED_PROTOCOL_FEATURES)
    # all offered, LOG_SHMFD + REPLY_ACK only, one not offered (BACKEND_REQ), none
    protocol = draw(st.sampled_from([offered, 0x0A, offered | 1 << 5, 0]))
    steps = start_up(int(features), protocol, draw(st.booleans()))
    steps = steps[:draw(st.one_of(st.just(len(steps)), st.integers(1, len(steps))))]
    for _ in range(draw(st.integers(0, 6))):
        steps = draw(mutation(steps))
    return steps


@st.composite
def mutation(draw, steps):
    steps = [(bytearray(data), list(roles)) for data, roles in steps]
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "field", "drop", "repeat",
                                 "insert", "fd_count", "fd_kind"]))
    i = draw(st.integers(0, len(steps) - 1))
    data, roles = steps[i]
    if kind == "flip" and data:
        bit = draw(st.integers(0, len(data) * 8 - 1))
        data[bit // 8] ^= 1 << bit % 8
    elif kind == "truncate" and data:
        del data[draw(st.integers(0, len(data) - 1)):]
        del steps[i + 1:]
    elif kind == "field" and len(data) >= 12:
        offset = draw(st.sampled_from([0, 4, 8]))
        struct.pack_into("<I", data, offset, draw(st.one_of(
            st.integers(0, 50), st.sampled_from([0x1, 0x5, 0x9, 0xD, 0x3]),
            st.integers(0, 2 ** 32 - 1))))
    elif kind == "drop" and len(steps) > 1:
        del steps[i]
    elif kind == "repeat":
        steps.insert(i, (bytearray(data), list(roles)))
    elif kind == "insert":
        body = draw(st.binary(max_size=48))
        head = struct.pack("<III", draw(st.integers(0, 45)),
                           draw(st.sampled_from([0x1, 0x9, 0x5, 0x2])), len(body))
        steps.insert(i, (bytearray(head + body), draw(st.lists(st.sampled_from(FD_KINDS),
                                                               max_size=3))))
    elif kind == "fd_count":
        if roles and draw(st.booleans()):
            del roles[draw(st.integers(0, len(roles) - 1))]
        else:
            roles.append(draw(st.sampled_from(FD_KINDS)))
    elif kind == "fd_kind" and roles:
        roles[draw(st.integers(0, len(roles) - 1))] = draw(st.sampled_from(FD_KINDS))
    return [(bytes(d), r) for d, r in steps]


# -- the front-end's side of one stream -----------------------------------------------
class Fds:
    """The fds one stream sends; all of them closed by close()."""

    def __init__(self, ring_bytes: bytes | None, avail_idx: int):
        self.opened: list[int] = []
        self.kicks: list[int] = []
        self.ram = self._memfd(RAM)
        for index, gpa in enumerate(RING_GPA):
            lay = vring_layout(gpa, NUM)
            if ring_bytes is None:
                # A well-behaved guest: one TX frame, one RX buffer, so that the
                # datapath (and dirty logging) runs under the mutated conversation.
                buf = 0x200000 + index * 0x1000
                os.pwrite(self.ram, struct.pack("<QIHH", buf, 2048 if index == 0 else 72,
                                                2 if index == 0 else 0, 0), lay.desc)
                os.pwrite(self.ram, struct.pack("<HHH", 0, 1, 0), lay.avail)
            else:
                # A hostile guest: random descriptors and avail entries in both rings.
                os.pwrite(self.ram, ring_bytes, lay.desc)
                os.pwrite(self.ram, struct.pack("<HH", 0, avail_idx) + ring_bytes[:2 * NUM],
                          lay.avail)
        self.log = self._memfd(LOG_SIZE)

    def _memfd(self, size: int) -> int:
        fd = os.memfd_create("vhostlab-fuzz", os.MFD_CLOEXEC)
        self.opened.append(fd)
        os.ftruncate(fd, size)
        return fd

    def get(self, role: str) -> int:
        if role == "ram":
            return self.ram
        if role == "log":
            return self.log
        if role == "memfd":
            return self._memfd(1 << 20)
        if role in ("eventfd", "kick"):
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            if role == "kick":
                self.kicks.append(fd)
        elif role == "pipe":
            fd, other = os.pipe()
            self.opened.append(other)
        elif role == "socket":
            a, b = socket.socketpair()
            fd, other = a.detach(), b.detach()
            self.opened.append(other)
        else:
            fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.opened.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.opened:
            os.close(fd)
        self.opened, self.kicks = [], []


def play(path: str, steps, fds: Fds) -> bytes:
    """Send every step (fds on its first byte), kick, hang up, read until the back-end
    closes; returns what it sent back. Sending stops quietly when the back-end has
    closed the connection."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    try:
        for data, roles in steps:
            attached = [fds.get(role) for role in roles]
            try:
                if attached:
                    socket.send_fds(sock, [data], attached)
                else:
                    sock.sendall(data)
            except OSError:                       # EPIPE / ECONNRESET: it hung up on us
                break
            for kick in fds.kicks:
                os.eventfd_write(kick, 1)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        got = bytearray()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if select.select([sock], [], [], 0.5)[0]:
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    return bytes(got)
                if not chunk:
                    return bytes(got)
                got += chunk
        raise AssertionError("the back-end did not close the connection after EOF")
    finally:
        sock.close()


# -- what must hold after every stream -----------------------------------------------
def _named_closes(srv: BackendServer) -> int:
    """Connections the server closed with a reason in its errors ("connection N closed: ...")."""
    with srv.lock:
        return srv.device.counters.closed_with_error
def memfd_mappings() -> list[str]:
    """Mappings of memfds (guest RAM, logs, hot-plugged regions), without addresses."""
    return sorted(line.split(None, 5)[-1] for line in maps_lines() if "/memfd:" in line)


def reservations() -> int:
    """Mappings of 1 GiB or more: a guest-memory reservation (64 GiB) each."""
    count = 0
    for line in maps_lines():
        lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
        count += hi - lo >= 1 << 30
    return count


def describe_fds(fds) -> dict[str, str]:
    out = {}
    for fd in sorted(fds, key=int):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            out[fd] = "closed"
    return out


def resources() -> tuple:
    """What a stream could leak: open fds, memfd mappings, guest-memory reservations."""
    gc.collect()
    return open_fds(), memfd_mappings(), reservations()


def settle(srv: BackendServer) -> None:
    """Wait until the server has released the last connection: `connected` turns
    false inside the locked release, so taking the lock waits for the rest of it."""
    assert wait_until(lambda: not srv.connected, 5)
    with srv.lock:
        pass


def get_features(path: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(path)
        sock.sendall(Message.make(Request.GET_FEATURES).to_bytes())
        data = b""
        while len(data) < 20:
            chunk = sock.recv(64)
            assert chunk, "the back-end closed a fresh connection"
            data += chunk
        return parse_message(data).payload.value
    finally:
        sock.close()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz") / "s"
    d.mkdir(mode=0o700)
    srv = BackendServer(str(d / "vu.sock"), wire="loopback", trace_maxlen=200)
    srv.start()
    try:
        # Warm up: kernels compiled, arenas made, before the baseline is taken.
        with ScriptedFrontend(srv.socket_path) as fe:
            guest = Guest(fe)
            guest.post_rx(4)
            guest.transmit(frames_of(3))
            assert wait_until(lambda: srv.snapshot(trace=False).counters["guest_rx_frames"] >= 3)
            del guest
        assert wait_until(lambda: not srv.connected)
        yield srv
    finally:
        srv.stop()


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(steps=streams(), ring_bytes=st.none() | st.binary(min_size=2 * NUM, max_size=16 * NUM),
       avail_idx=st.integers(0, 0xFFFF))
def test_mutated_streams_leave_the_server_serving_and_nothing_behind(
        fuzz_server, steps, ring_bytes, avail_idx):
    srv = fuzz_server
    offered = srv.device.offered_features
    settle(srv)
    baseline = resources()
    closes = _named_closes(srv)
    fds = Fds(ring_bytes, avail_idx)
    try:
        got = play(srv.socket_path, steps, fds)
    finally:
        fds.close()
    settle(srv)
    # Exactly one correct answer per request that waits for one, in order
    # (flags 0x5, its id, a payload of its reply type); or a named close.
    answered, wrong, closed = check_replies(got, expected_replies(steps))
    assert not wrong, (answered, got.hex())
    if closed:
        assert _named_closes(srv) > closes, "the back-end closed without saying why"
    assert wait_until(lambda: resources() == baseline, 2), (
        describe_fds(open_fds() ^ baseline[0]), memfd_mappings(), reservations())
    assert srv.running
    errors = list(srv.snapshot(trace=False).counters["errors"])
    assert not [e for e in errors if "internal error" in e], errors
    assert get_features(srv.socket_path) == offered
