"""A small scripted front-end over a real socket, and tests that it speaks the protocol.

`ScriptedFrontend` is what the back-end tests drive the device with: the
protocol layer's FrontendConnection for the bytes, real memfd guest RAM
(GuestMemory.allocate, laid out like QEMU's pc machine), real eventfds for
kick and call, and SCM_RIGHTS on a real unix socket. Other test modules in
this directory import it.
"""
from __future__ import annotations

import os
import select
import socket
import time

import pytest

from vhostlab.backend import BackendServer
from vhostlab.memory import GuestMemory
from vhostlab.protocol import (Feature, FrontendConnection, LogArea, MemoryRegion, MemoryTable,
                               Message, ProtocolFeature, Request, U64, VringAddr, VringState)

RING_NUM = 256
RING_BASE_GPA = 0x1000000          # above 1 MiB, inside the pc layout's third region


class ReplyTimeout(AssertionError):
    pass


class ScriptedFrontend:
    """Plays QEMU's part, one message at a time."""

    def __init__(self, path: str | None, ram_size: int = 64 << 20,
                 sock: socket.socket | None = None):
        if sock is None:                 # QEMU as client: connect to the back-end
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(path)
        self.sock = sock
        self.conn = FrontendConnection()
        self.memory = GuestMemory.allocate(ram_size)
        self.eventfds: list[int] = []
        self.replies: list[Message] = []

    # -- plumbing -------------------------------------------------------------------
    def close(self) -> None:
        self.sock.close()
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []
        self.memory.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.eventfds.append(fd)
        return fd

    def send(self, request: Request, payload=None, fds=(), need_reply=False) -> Message | None:
        """Send a request; return its reply if one is due (waits up to 5 s)."""
        msg = Message.make(request, payload, fds, need_reply)
        data = self.conn.send(msg)
        socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.sendall(data)
        if self.conn.expecting_reply is None:
            return None
        return self.read_reply()

    def send_raw(self, data: bytes, fds=()) -> None:
        socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.sendall(data)

    def read_reply(self, timeout: float = 5.0) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise ReplyTimeout(f"no reply to {self.conn.expecting_reply}")
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError("back-end closed the connection")
            msgs = self.conn.receive_data(data)
            if msgs:
                self.replies.extend(msgs)
                return msgs[0]

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the back-end closes the connection within `timeout`."""
        if not select.select([self.sock], [], [], timeout)[0]:
            return False
        try:
            return self.sock.recv(4096) == b""
        except ConnectionResetError:
            return True

    def sync(self) -> None:
        """Wait until the back-end has handled everything sent so far.

        Messages are handled in order, kicks arrive on eventfds beside them:
        a reply proves the earlier messages (e.g. SET_VRING_ENABLE) took effect.
        """
        self.send(Request.GET_FEATURES)

    # -- QEMU's sequences (FACTS.md section 1) --------------------------------------------
    def negotiate(self, features: int | None = None, protocol: int | None = None) -> tuple[int, int]:
        offered = self.send(Request.GET_FEATURES).payload.value
        pf = self.send(Request.GET_PROTOCOL_FEATURES).payload.value
        wanted_pf = pf if protocol is None else protocol
        self.send(Request.SET_PROTOCOL_FEATURES, wanted_pf)
        self.send(Request.SET_OWNER)
        self.send(Request.GET_FEATURES)
        acked = offered & (features if features is not None else
                           (Feature.VHOST_USER_F_PROTOCOL_FEATURES | Feature.VIRTIO_F_VERSION_1))
        return offered, acked

    def memory_table(self) -> MemoryTable:
        return MemoryTable(tuple(MemoryRegion(r.guest_phys_addr, r.memory_size,
                                              r.userspace_addr, r.mmap_offset)
                                 for r, _ in self.memory.memory_table()))

    def set_mem_table(self, need_reply=True) -> Message | None:
        table = self.memory.memory_table()
        return self.send(Request.SET_MEM_TABLE, self.memory_table(),
                         fds=[fd for _, fd in table], need_reply=need_reply)

    def ring_gpas(self, index: int, num: int = RING_NUM) -> tuple[int, int, int]:
        from vhostlab.ring.layout import vring_layout
        lay = vring_layout(RING_BASE_GPA + index * 0x100000, num)
        return lay.desc, lay.avail, lay.used

    def vring_addr(self, index: int, num: int = RING_NUM, log: bool = False) -> VringAddr:
        desc, avail, used = self.ring_gpas(index, num)
        uva = self.memory.gpa_to_uva
        return VringAddr(index, 1 if log else 0, uva(desc), uva(used), uva(avail), used)

    def start_ring(self, index: int, num: int = RING_NUM, base: int = 0) -> tuple[int, int]:
        """SET_VRING_NUM, _BASE, _ADDR, _KICK, _CALL as vhost_virtqueue_start does."""
        self.send(Request.SET_VRING_NUM, VringState(index, num))
        self.send(Request.SET_VRING_BASE, VringState(index, base))
        self.send(Request.SET_VRING_ADDR, self.vring_addr(index, num))
        kick, call = self.eventfd(), self.eventfd()
        self.send(Request.SET_VRING_KICK, U64(index), fds=[kick])
        self.send(Request.SET_VRING_CALL, U64(index), fds=[call])
        return kick, call

    def start(self, queue_pairs: int = 1, features: int | None = None) -> dict:
        """The whole QEMU 7.2 start-up: negotiation, then vhost_dev_start at DRIVER_OK."""
        offered, acked = self.negotiate(features)
        for i in range(2 * queue_pairs):
            self.send(Request.SET_VRING_CALL, U64(i), fds=[self.eventfd()])
            self.send(Request.SET_VRING_ERR, U64(i), fds=[self.eventfd()])
            self.send(Request.SET_VRING_ENABLE, VringState(i, 0))
        self.send(Request.SET_FEATURES, acked)
        self.set_mem_table()
        fds = {}
        for i in range(2 * queue_pairs):
            fds[i] = self.start_ring(i)
        for i in range(2 * queue_pairs):
            self.send(Request.SET_VRING_ENABLE, VringState(i, 1))
        return {"offered": offered, "acked": acked, "rings": fds}

    def start_logging(self, log_fd: int, log_size: int, acked: int, queue_pairs: int = 1) -> None:
        """vhost_log_global_start: SET_LOG_BASE, SET_FEATURES | LOG_ALL, SET_VRING_ADDR with F_LOG."""
        reply = self.send(Request.SET_LOG_BASE, LogArea(log_size, 0), fds=[log_fd])
        assert reply is not None and reply.payload.value == 0
        self.send(Request.SET_FEATURES, acked | Feature.VHOST_F_LOG_ALL, need_reply=True)
        for i in range(2 * queue_pairs):
            self.send(Request.SET_VRING_ADDR, self.vring_addr(i, log=True), need_reply=True)


@pytest.fixture
def server(tmp_path):
    d = tmp_path / "sock"
    d.mkdir(mode=0o700)
    srv = BackendServer(str(d / "vu.sock"), wire="sink")
    srv.start()
    yield srv
    srv.stop()


def test_scripted_frontend_negotiates_what_the_backend_offers(server):
    with ScriptedFrontend(server.socket_path) as fe:
        offered, acked = fe.negotiate()
        assert offered & Feature.VHOST_F_LOG_ALL, "QEMU blocks migration without LOG_ALL"
        pf = fe.replies[1].payload.value
        assert pf & ProtocolFeature.LOG_SHMFD and pf & ProtocolFeature.REPLY_ACK
        assert fe.replies[0].flags == 0x5
