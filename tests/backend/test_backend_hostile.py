"""Seven attacks on a live `vhostlab serve` process, from a hostile front-end and guest.

Each test attacks one subprocess server (shared by the module, one front-end
at a time) and then demands that the server was not killed, that it still
answers every need_reply request (on the attacker's own connection when the
attack leaves it open, and on a fresh one), and that its RSS grew by less
than 64 MiB over the attack.
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from test_backend_protocol import HDR, TX_BUF_GPA, Guest, frames_of, wait_until
from test_backend_scripted import ScriptedFrontend
from vhostlab.dirtylog import DirtyLog
from vhostlab.protocol import (Feature, LogArea, MemoryRegion, MemoryTable, Message,
                               ProtocolFeature, Request, SingleMemoryRegion, U64, VringState,
                               parse_message)
from vhostlab.ring import VRING_DESC_DTYPE, VirtqueueDriver

RSS_LIMIT = 64 << 20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Served:
    """A `vhostlab serve` subprocess; its stderr goes to a file the tests read."""

    def __init__(self, tmp, *args: str):
        d = tmp / "srv"
        d.mkdir(mode=0o700)
        self.socket_path = str(d / "vu.sock")
        self.log_path = tmp / "serve.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vhostlab.backend.serve", "--socket", self.socket_path,
             *args], stdout=subprocess.PIPE, stderr=self._log, text=True)
        if not wait_until(lambda: os.path.exists(self.socket_path)
                          or self.proc.poll() is not None, 60):
            self.close()
            pytest.fail("serve did not create its socket")

    def log(self) -> str:
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
        self._log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    srv = Served(tmp_path_factory.mktemp("hostile"), "--wire", "loopback")
    try:
        with ScriptedFrontend(srv.socket_path) as fe:      # warm up: kernels loaded
            guest = Guest(fe)
            guest.post_rx(4)
            guest.transmit(frames_of(3))
            assert wait_until(lambda: len(guest.receive()) > 0, 60)
            del guest
        yield srv
    finally:
        srv.close()


@pytest.fixture
def attack(served):
    """Yields the server; afterwards: alive, answering need_reply, RSS growth < 64 MiB."""
    time.sleep(0.2)
    before = rss(served.proc.pid)
    yield served
    assert served.alive(), f"the server died: {served.proc.returncode}\n{served.log()[-2000:]}"
    answers_need_reply(served.socket_path)
    grown = rss(served.proc.pid) - before
    assert grown < RSS_LIMIT, f"RSS grew by {grown >> 20} MiB"


def answers_need_reply(path: str, fe: ScriptedFrontend | None = None) -> None:
    """A fresh front-end (or `fe`) gets an answer to each of several need_reply requests."""
    own = fe is None
    if own:
        assert wait_until(lambda: _connectable(path), 10)
        fe = ScriptedFrontend(path)
    try:
        if own:
            fe.negotiate()
        for request, payload in ((Request.SET_VRING_ENABLE, VringState(0, 0)),
                                 (Request.SET_OWNER, None), (Request.SET_STATUS, 0)):
            reply = fe.send(request, payload, need_reply=True)
            assert reply is not None and reply.request is request and reply.flags == 0x5
        assert fe.send(Request.GET_FEATURES).payload.value
    finally:
        if own:
            fe.close()


def _connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def ram_fd(fe: ScriptedFrontend) -> int:
    return fe.memory.memory_table()[0][1]


# -- 1. SIGBUS ----------------------------------------------------------------------
def test_shrunk_ram_memfd_does_not_kill_the_server(attack):
    with ScriptedFrontend(attack.socket_path) as fe:
        guest = Guest(fe)
        guest.transmit(frames_of(1))
        assert wait_until(lambda: len(guest.drivers[1].get_used()) == 1)
        # From here the test must not touch fe.memory: it is gone for us too.
        os.ftruncate(ram_fd(fe), 0)
        os.eventfd_write(guest.kick[1], 1)
        os.eventfd_write(guest.kick[0], 1)
        answers_need_reply(attack.socket_path, fe)
        assert wait_until(lambda: "shrank" in attack.log(), 5), attack.log()[-2000:]
        guest.drivers = []


def test_shrunk_log_memfd_does_not_kill_the_server(attack):
    with ScriptedFrontend(attack.socket_path) as fe:
        guest = Guest(fe)
        log = DirtyLog.allocate(fe.memory)
        fe.start_logging(log.fd, log.size, guest.info["acked"])
        os.ftruncate(log.fd, 0)
        guest.post_rx(8)
        guest.transmit(frames_of(8))
        assert wait_until(lambda: "log shrank" in attack.log(), 5), attack.log()[-2000:]
        answers_need_reply(attack.socket_path, fe)
        log.close()


# -- 2. unbounded memory ------------------------------------------------------------
def test_huge_tx_chains_and_a_full_rx_backlog_keep_memory_bounded(attack):
    """256 chains of 1 MiB, loopback, no RX buffers; then 256 legal 64 KiB frames."""
    with ScriptedFrontend(attack.socket_path) as fe:
        guest = Guest(fe)
        tx = guest.drivers[1]
        for size in (1 << 20, 65535 + HDR):
            for _ in range(2):           # the ring holds 256: two rounds of 128
                for _ in range(128):
                    tx.add_buffer([(TX_BUF_GPA, size, False)])
                tx.publish()
                os.eventfd_write(guest.kick[1], 1)
                used: list = []
                assert wait_until(lambda: used.extend(tx.get_used()) or len(used) == 128, 30)
        answers_need_reply(attack.socket_path, fe)
    assert "over the limit" in attack.log()


# -- 3. dirty-log cost ----------------------------------------------------------------
def test_a_huge_sparse_log_costs_no_memory(attack):
    """A 256 MiB log memfd (sparse, the largest accepted): services touch only what they mark."""
    with ScriptedFrontend(attack.socket_path) as fe:
        guest = Guest(fe)
        log = DirtyLog.allocate(256 << 20)
        fe.start_logging(log.fd, log.size, guest.info["acked"])
        for _ in range(4):
            guest.post_rx(16)
            guest.transmit(frames_of(16))
            got: list = []
            assert wait_until(lambda: got.extend(guest.receive()) or len(got) == 16, 30)
        answers_need_reply(attack.socket_path, fe)
        del guest
        log.close()


# -- 4. event mode stranding work -----------------------------------------------------
def test_event_idx_ring_of_big_frames_is_used_entirely(attack):
    """1024-entry TX ring, EVENT_IDX, 70 KB chains, one kick: every chain comes back."""
    num, size = 1024, 70_000
    with ScriptedFrontend(attack.socket_path) as fe:
        features = (Feature.VHOST_USER_F_PROTOCOL_FEATURES | Feature.VIRTIO_F_VERSION_1
                    | Feature.VIRTIO_RING_F_EVENT_IDX)
        _, acked = fe.negotiate(features)
        fe.send(Request.SET_FEATURES, acked)
        fe.set_mem_table()
        tx = VirtqueueDriver(fe.memory, num, fe.ring_gpas(1, num)[0], event_idx=True)
        kick, _ = fe.start_ring(1, num)
        fe.send(Request.SET_VRING_ENABLE, VringState(1, 1))
        fe.sync()
        for _ in range(num):
            tx.add_buffer([(TX_BUF_GPA, size, False)])
        tx.publish()
        os.eventfd_write(kick, 1)
        used: list = []
        assert wait_until(lambda: used.extend(tx.get_used()) or len(used) == num, 30), \
            f"{len(used)} of {num} chains used"
        tx.close()
        answers_need_reply(attack.socket_path, fe)


# -- 5. replies after a refused POSTCOPY_LISTEN, NACK for a refused SET_MEM_TABLE -----
def test_replies_continue_after_a_refused_postcopy_listen(attack):
    with ScriptedFrontend(attack.socket_path) as fe:
        fe.negotiate()
        reply = fe.send(Request.POSTCOPY_LISTEN, need_reply=True)
        assert reply.payload.value != 0                     # refused: no PAGEFAULT
        fe.conn.postcopy_listening = False                  # our side knows it was refused
        assert fe.set_mem_table(need_reply=True).payload.value == 0
        extra = fe.memory.allocate_region(0x40000000, 1 << 20)
        fd = fe.memory.memory_table()[-1][1]
        reply = fe.send(Request.ADD_MEM_REG, SingleMemoryRegion(MemoryRegion(*extra)),
                        fds=[fd], need_reply=True)
        assert reply.payload.value == 0
        answers_need_reply(attack.socket_path, fe)


def test_a_refused_set_mem_table_is_nacked_not_closed(attack):
    with ScriptedFrontend(attack.socket_path) as fe:
        fe.negotiate()
        table = fe.memory_table()
        r = table.regions[0]
        bad = MemoryTable((MemoryRegion(r.guest_phys_addr, 1 << 40, r.userspace_addr,
                                        r.mmap_offset),))
        reply = fe.send(Request.SET_MEM_TABLE, bad, fds=[ram_fd(fe)], need_reply=True)
        assert reply is not None and reply.payload.value != 0
        answers_need_reply(attack.socket_path, fe)


# -- 6. fds piling up before a message completes ---------------------------------------
def test_fds_sent_with_an_incomplete_message_are_bounded(attack):
    pid = attack.proc.pid
    before = open_fd_count(pid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(attack.socket_path)
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    peak = before
    try:
        head = struct.pack("<III", int(Request.SET_CONFIG), 0x1, 4096)
        sock.sendall(head)
        for _ in range(400):
            try:
                socket.send_fds(sock, [b"\0"], [fd] * 16)
            except OSError:
                break                                       # closed on us: good
            peak = max(peak, open_fd_count(pid))
        peak = max(peak, open_fd_count(pid))
    finally:
        sock.close()
        os.close(fd)
    assert peak < before + 40, f"the server held {peak - before} more fds"
    assert wait_until(lambda: open_fd_count(pid) <= before, 5)
    assert "fds" in attack.log()


# -- 7. per-service CPU --------------------------------------------------------------
def test_indirect_heavy_chains_leave_the_server_responsive(attack):
    """Full TX and RX rings behind 65,536-entry indirect tables; need_reply answered meanwhile."""
    entries = 65536
    with ScriptedFrontend(attack.socket_path, ram_size=128 << 20) as fe:
        guest = Guest(fe)
        tables = (0x4000000, 0x5000000)                      # TX table, RX table: 1 MiB each
        for t, writable in zip(tables, (False, True)):
            table = fe.memory.view(t, 16 * entries).view(VRING_DESC_DTYPE)
            index = np.arange(entries)
            table["addr"] = 0x6000000 + (0x100000 if writable else 0) + 4 * index % 0x10000
            table["len"] = 1
            table["flags"] = 1 | (2 if writable else 0)
            table["next"] = (index + 1) & 0xFFFF
            table[-1]["flags"] = 2 if writable else 0
            del table
        rx, tx = guest.drivers[0], guest.drivers[1]
        for _ in range(255):
            tx.views.desc[tx._free[-1]] = (tables[0], 16 * entries, 4, 0)
            head = tx._free.pop()
            tx._chains[head] = [head]
            tx.views.avail_ring[tx.avail_idx % tx.num] = head
            tx.avail_idx = (tx.avail_idx + 1) & 0xFFFF
            rx.views.desc[rx._free[-1]] = (tables[1], 16 * entries, 4, 0)
            head = rx._free.pop()
            rx._chains[head] = [head]
            rx.views.avail_ring[rx.avail_idx % rx.num] = head
            rx.avail_idx = (rx.avail_idx + 1) & 0xFFFF
        rx.publish()
        tx.publish()
        os.eventfd_write(guest.kick[0], 1)
        os.eventfd_write(guest.kick[1], 1)
        answers_need_reply(attack.socket_path, fe)
        used: list = []
        assert wait_until(lambda: used.extend(tx.get_used()) or len(used) == 255, 60)
        del guest, rx, tx
