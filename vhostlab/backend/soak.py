"""`python -m vhostlab.backend.soak`: a fuzz and fault campaign against a live `vhostlab serve`.

    python -m vhostlab.backend.soak [--messages N] [--cycles N] [--seed S]

Starts `vhostlab serve --wire loopback` as a subprocess and attacks it:

* fuzzed messages: QEMU 7.2's recorded conversation (vhostlab.protocol.recorded),
  with its fds, plus requests repeated from it, then mutated (bits flipped,
  truncated, request/flags/size rewritten, messages dropped, repeated or
  inserted, fds added or removed). Each stream is sent whole on a fresh
  connection; the back-end's answers are then checked against a sans-IO model
  of the same stream (BackendConnection): every request that waits for a
  reply gets exactly one well-formed reply (flags 0x5, its request id, a
  payload that parses), in order; or the back-end closes the connection and
  its log names why ("connection N closed: ...").
* fault cycles, in turn: the front-end process killed mid-conversation and
  mid-migration (SIGKILL of a forked child); guest RAM or the dirty log
  truncated under running rings; a guest thread rewriting descriptors and
  indices while the rings run; oversized and indirect-heavy chains. After
  each, the back-end must be alive and answer need_reply requests.

At the end the back-end is asked for its summary (SIGTERM), and the campaign
prints one JSON line: messages, streams, cycles, crashes, hangs, unanswered,
wrong_replies, named_closes, unnamed_closes, fd_leak, mapping_leak,
rss_growth_mib, slowest_service_ms, seconds. The subprocess and every forked
front-end are killed on the way out, whatever happened.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from vhostlab.backend.device import OFFERED_PROTOCOL_FEATURES
from vhostlab.dirtylog import DirtyLog
from vhostlab.memory import GuestMemory
from vhostlab.protocol import (BackendConnection, Feature, FrontendConnection, LogArea,
                               MemoryRegion, MemoryTable, Message, ProtocolError, Request,
                               U64, VringAddr, VringState)
from vhostlab.protocol.recorded import QEMU_7_2_SEQUENCE, TO_BACKEND
from vhostlab.ring import VRING_DESC_DTYPE, VirtqueueDriver
from vhostlab.ring.layout import vring_layout

HEADER = 12
REPLY_TIMEOUT = 10.0          # a back-end silent this long has hung
RING_NUM = 256
RING_GPA = (0x1000000, 0x1100000)
TX_BUF, RX_BUF = 0x2000000, 0x3000000
FAULTS = ("kill_conversation", "kill_migration", "truncate_ram", "truncate_log",
          "guest_thread", "oversized_chains", "indirect_chains")


# -- the back-end process ----------------------------------------------------------
class Served:
    """`vhostlab serve --wire loopback` in a private directory; stderr to a file."""

    def __init__(self, workdir: str):
        self.dir = os.path.join(workdir, "srv")
        os.mkdir(self.dir, 0o700)
        self.socket_path = os.path.join(self.dir, "vu.sock")
        self.log_path = os.path.join(workdir, "serve.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vhostlab.backend.serve", "--socket", self.socket_path,
             "--wire", "loopback"], stdout=subprocess.PIPE, stderr=self._log, text=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(self.socket_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vhostlab serve did not start:\n{self.log()[-2000:]}")
            time.sleep(0.02)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

    def resources(self) -> tuple[int, int]:
        """(open fds, mappings of memfds): what a connection could leak."""
        fds = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        with open(f"/proc/{self.proc.pid}/maps") as f:
            maps = sum("/memfd:" in line for line in f)
        return fds, maps

    def summary(self) -> dict:
        """SIGTERM, then the JSON line `vhostlab serve` prints."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return json.loads(out.splitlines()[-1]) if out.strip() else {}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()
        self._log.close()


def _connect(path: str, timeout: float = REPLY_TIMEOUT) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
            return sock
        except OSError:
            if time.monotonic() > deadline:
                sock.close()
                raise
            time.sleep(0.01)


# -- fuzzed streams ----------------------------------------------------------------------
def _recorded() -> list[tuple[bytes, list[str]]]:
    """QEMU 7.2's requests, each with the roles of the fds it carried."""
    out = []
    for entry in QEMU_7_2_SEQUENCE:
        if entry.direction != TO_BACKEND:
            continue
        msg = entry.message
        roles = {Request.SET_MEM_TABLE: ["ram"] * entry.nfds,
                 Request.SET_LOG_BASE: ["log"]}.get(msg.request, ["eventfd"] * entry.nfds)
        out.append((Message.make(msg.request, msg.payload, tuple(range(entry.nfds)),
                                 msg.need_reply).to_bytes(), roles))
    return out


RECORDED = _recorded()
_EXTRA = [step for step in RECORDED if not step[1]]          # fd-less, cheap to repeat


def mutate(rng: random.Random, steps: list) -> list:
    steps = [(bytearray(d), list(r)) for d, r in steps]
    i = rng.randrange(len(steps))
    data, roles = steps[i]
    kind = rng.choice(("flip", "flip", "truncate", "field", "drop", "repeat", "insert",
                       "fds"))
    if kind in ("flip", "truncate", "field") and len(data) < 12:
        kind = "repeat"
    if kind == "flip":
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << bit % 8
    elif kind == "truncate":
        del data[rng.randrange(len(data)):]
        del steps[i + 1:]
    elif kind == "field":
        value = rng.choice((rng.randrange(64), rng.choice((0x1, 0x5, 0x9, 0xD, 0x3)),
                            rng.getrandbits(32)))
        struct.pack_into("<I", data, rng.choice((0, 4, 8)), value)
    elif kind == "drop" and len(steps) > 1:
        del steps[i]
    elif kind == "repeat":
        steps.insert(i, (bytearray(data), list(roles)))
    elif kind == "insert":
        body = rng.randbytes(rng.randrange(49))
        head = struct.pack("<III", rng.randrange(46), rng.choice((0x1, 0x9, 0x5)), len(body))
        steps.insert(i, (bytearray(head + body), rng.sample(["eventfd", "memfd", "pipe"],
                                                             rng.randrange(3))))
    elif kind == "fds":
        if roles and rng.random() < 0.5:
            roles.pop()
        else:
            roles.append(rng.choice(("eventfd", "memfd", "pipe")))
    return [(bytes(d), r) for d, r in steps]


def make_stream(rng: random.Random, extra: int) -> list[tuple[bytes, list[str]]]:
    steps = list(RECORDED) + [rng.choice(_EXTRA) for _ in range(extra)]
    for _ in range(rng.randrange(7)):
        steps = mutate(rng, steps)
    return steps


class StreamFds:
    """The fds one stream sends: sparse memfd RAM and log, eventfds, pipes."""

    def __init__(self):
        self.opened: list[int] = []
        self.ram = self._memfd(256 << 20)
        self.log = self._memfd(8192)

    def _memfd(self, size: int) -> int:
        fd = os.memfd_create("vhostlab-soak", os.MFD_CLOEXEC)
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
        if role == "pipe":
            r, w = os.pipe()
            self.opened += [r, w]
            return r
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.opened.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.opened:
            os.close(fd)


def expected_replies(steps) -> list[Message]:
    """The requests of this stream a correct back-end handles, in order, up
    to the first one it must refuse by closing (a malformed one)."""
    model = BackendConnection(OFFERED_PROTOCOL_FEATURES, check_fd_counts=False)
    handled = []
    for data, roles in steps:
        try:
            handled += model.receive_data(data, list(range(100, 100 + len(roles))))
        except ProtocolError:
            break
    return handled


def play_stream(path: str, steps, fds: StreamFds) -> tuple[bytes, bool]:
    """Send the stream, hang up our side, read until the back-end closes.
    Returns (bytes received, hung)."""
    sock = _connect(path)
    got = bytearray()
    try:
        for data, roles in steps:
            try:
                if roles:
                    socket.send_fds(sock, [data], [fds.get(r) for r in roles])
                else:
                    sock.sendall(data)
            except OSError:
                break                               # it closed on us
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        deadline = time.monotonic() + REPLY_TIMEOUT
        while time.monotonic() < deadline:
            if not select.select([sock], [], [], 0.5)[0]:
                continue
            try:
                chunk = sock.recv(65536)
            except OSError:
                return bytes(got), False
            if not chunk:
                return bytes(got), False
            got += chunk
        return bytes(got), True
    finally:
        sock.close()


def check_replies(got: bytes, handled: list[Message]) -> tuple[int, int, bool]:
    """(answered, wrong, closed early): the replies received, checked in order
    against what is owed (flags exactly 0x5, the request's id, a payload of
    the reply's type) by a FrontendConnection that saw the same requests."""
    front = FrontendConnection()
    due = [msg for msg in handled if front.expect_reply(msg)]
    try:
        replies = front.receive_data(got)
    except ProtocolError:
        return 0, 1, False
    # Bytes left over that make no whole reply: a torn or surplus answer.
    if sum(HEADER + len(r.to_bytes()) - HEADER for r in replies) != len(got):
        return len(replies), 1, False
    return len(replies), 0, len(replies) < len(due)


# -- a small front-end for the fault cycles ---------------------------------------------
class SoakFrontend:
    """QEMU's side over one connection: guest RAM in a memfd, rings, eventfds."""

    def __init__(self, path: str, ram: int = 128 << 20, features: int = 0):
        self.sock = _connect(path)
        self.conn = FrontendConnection()
        self.memory = GuestMemory.allocate(ram)
        self.fds: list[int] = []
        self.start(features)

    def send(self, request, payload=None, fds=(), need_reply=False):
        data = self.conn.send(Message.make(request, payload, tuple(fds), need_reply))
        socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.sendall(data)
        if self.conn.expecting_reply is None:
            return None
        deadline = time.monotonic() + REPLY_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError(f"no reply to {request.name}")
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"the back-end closed the connection at {request.name}")
            msgs = self.conn.receive_data(chunk)
            if msgs:
                return msgs[0]

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fds.append(fd)
        return fd

    def start(self, features: int) -> None:
        offered = self.send(Request.GET_FEATURES).payload.value
        pf = self.send(Request.GET_PROTOCOL_FEATURES).payload.value
        self.send(Request.SET_PROTOCOL_FEATURES, pf)
        self.send(Request.SET_OWNER)
        self.acked = offered & (Feature.VHOST_USER_F_PROTOCOL_FEATURES
                                | Feature.VIRTIO_F_VERSION_1 | features)
        self.send(Request.SET_FEATURES, self.acked)
        table = self.memory.memory_table()
        regions = MemoryTable(tuple(MemoryRegion(r.guest_phys_addr, r.memory_size,
                                                 r.userspace_addr, r.mmap_offset)
                                    for r, _ in table))
        self.send(Request.SET_MEM_TABLE, regions, fds=[fd for _, fd in table], need_reply=True)
        self.kick, self.drivers = {}, []
        for i in range(2):
            lay = vring_layout(RING_GPA[i], RING_NUM)
            self.drivers.append(VirtqueueDriver(self.memory, RING_NUM, lay.desc,
                                                event_idx=bool(features)))
            uva = self.memory.gpa_to_uva
            self.send(Request.SET_VRING_NUM, VringState(i, RING_NUM))
            self.send(Request.SET_VRING_BASE, VringState(i, 0))
            self.send(Request.SET_VRING_ADDR, VringAddr(i, 0, uva(lay.desc), uva(lay.used),
                                                        uva(lay.avail), lay.used))
            self.kick[i] = self.eventfd()
            self.send(Request.SET_VRING_KICK, U64(i), fds=[self.kick[i]])
            self.send(Request.SET_VRING_CALL, U64(i), fds=[self.eventfd()])
            self.send(Request.SET_VRING_ENABLE, VringState(i, 1))

    def start_logging(self, size: int | None = None) -> DirtyLog:
        log = DirtyLog.allocate(self.memory if size is None else size)
        self.send(Request.SET_LOG_BASE, LogArea(log.size, 0), fds=[log.fd])
        self.send(Request.SET_FEATURES, self.acked | Feature.VHOST_F_LOG_ALL, need_reply=True)
        for i in range(2):
            lay = vring_layout(RING_GPA[i], RING_NUM)
            uva = self.memory.gpa_to_uva
            self.send(Request.SET_VRING_ADDR, VringAddr(i, 1, uva(lay.desc), uva(lay.used),
                                                        uva(lay.avail), lay.used),
                      need_reply=True)
        return log

    def post_rx(self, n: int, size: int = 2048) -> None:
        drv = self.drivers[0]
        for k in range(min(n, drv.num_free)):
            drv.add_buffer([(RX_BUF + k * 4096, size, True)])
        drv.publish()
        os.eventfd_write(self.kick[0], 1)

    def transmit(self, n: int, size: int = 72) -> None:
        drv = self.drivers[1]
        drv.get_used()
        for _ in range(min(n, drv.num_free)):
            drv.add_buffer([(TX_BUF, size, False)])
        drv.publish()
        os.eventfd_write(self.kick[1], 1)

    def answers_need_reply(self) -> None:
        for request, payload in ((Request.SET_VRING_ENABLE, VringState(0, 1)),
                                 (Request.SET_STATUS, 0xF)):
            reply = self.send(request, payload, need_reply=True)
            if reply is None or reply.request is not request or reply.flags != 0x5:
                raise AssertionError(f"bad reply to {request.name}: {reply}")

    def close(self, touch_memory: bool = True) -> None:
        self.sock.close()
        for drv in self.drivers:
            drv.close()
        for fd in self.fds:
            os.close(fd)
        self.memory.close()


def _child(path: str, migrate: bool) -> None:
    """A forked front-end, killed by the parent at some point of this."""
    try:
        fe = SoakFrontend(path)
        fe.post_rx(64)
        if migrate:
            fe.start_logging()
        while True:
            fe.transmit(32)
            fe.post_rx(32)
            fe.send(Request.GET_FEATURES)
    finally:
        os._exit(0)


def fault_cycle(kind: str, path: str, rng: random.Random) -> None:
    """One fault; raises if the back-end failed to answer afterwards."""
    if kind in ("kill_conversation", "kill_migration"):
        pid = os.fork()
        if pid == 0:
            _child(path, kind == "kill_migration")
        time.sleep(rng.uniform(0.005, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return
    fe = SoakFrontend(path, features=int(Feature.VIRTIO_RING_F_EVENT_IDX)
                  if rng.random() < 0.5 else 0)
    try:
        if kind == "truncate_ram":
            fe.post_rx(16)
            fe.transmit(16)
            fe.drivers = []                      # no access to our RAM after this
            os.ftruncate(fe.memory.memory_table()[0][1], rng.choice((0, 1 << 20, 16 << 20)))
            for i in (0, 1):
                os.eventfd_write(fe.kick[i], 1)
        elif kind == "truncate_log":
            log = fe.start_logging()
            os.ftruncate(log.fd, 0)
            fe.post_rx(32)
            fe.transmit(32)
            fe.send(Request.GET_FEATURES)
            log.close()
        elif kind == "guest_thread":
            _guest_thread(fe, rng)
        elif kind == "oversized_chains":
            drv = fe.drivers[1]
            for _ in range(2):
                for _ in range(min(128, drv.num_free)):
                    drv.add_buffer([(TX_BUF, rng.choice((1 << 20, 65535 + 12, 4 << 20)),
                                     False)])
                drv.publish()
                os.eventfd_write(fe.kick[1], 1)
                fe.send(Request.GET_FEATURES)
                drv.get_used()
        elif kind == "indirect_chains":
            _indirect_chains(fe, rng)
        fe.answers_need_reply()
    finally:
        fe.close()


def _guest_thread(fe: SoakFrontend, rng: random.Random) -> None:
    """A guest thread scribbles over descriptors and indices while the rings run."""
    stop = threading.Event()
    areas = [fe.memory.view(RING_GPA[i], 0x4000) for i in (0, 1)]
    seed = rng.getrandbits(32)

    def scribble():
        local = random.Random(seed)
        while not stop.is_set():
            area = local.choice(areas)
            at = local.randrange(area.size - 8)
            area[at:at + 8] = memoryview(local.randbytes(8))
    thread = threading.Thread(target=scribble, daemon=True)
    thread.start()
    try:
        for _ in range(20):
            for i in (0, 1):
                os.eventfd_write(fe.kick[i], 1)
            time.sleep(0.002)
    finally:
        stop.set()
        thread.join()
        del areas
    fe.drivers = []


def _indirect_chains(fe: SoakFrontend, rng: random.Random) -> None:
    entries = rng.choice((1024, 16384, 65536))
    tables = (0x4000000, 0x5000000)
    for t, writable in zip(tables, (False, True)):
        table = fe.memory.view(t, 16 * entries).view(VRING_DESC_DTYPE)
        table["addr"] = 0x6000000 + (0x100000 if writable else 0)
        table["len"] = 1
        table["flags"] = 1 | (2 if writable else 0)
        table["next"] = [(i + 1) & 0xFFFF for i in range(entries)]
        table[-1]["flags"] = 2 if writable else 0
        del table
    for drv, t in zip(fe.drivers, (tables[1], tables[0])):
        for _ in range(RING_NUM - 1):
            head = drv.add_buffer([(t, 16 * entries, drv is fe.drivers[0])])
            drv.views.desc[head] = (t, 16 * entries, 4, 0)      # VRING_DESC_F_INDIRECT
        drv.publish()
    for i in (0, 1):
        os.eventfd_write(fe.kick[i], 1)


# -- the campaign ------------------------------------------------------------------------
def run(messages: int = 1_000_000, cycles: int = 200, seed: int = 1) -> dict:
    rng = random.Random(seed)
    t0 = time.monotonic()
    result = {"messages": 0, "streams": 0, "cycles": 0, "crashes": 0, "hangs": 0,
              "unanswered": 0, "wrong_replies": 0, "named_closes": 0, "unnamed_closes": 0,
              "fd_leak": 0, "mapping_leak": 0, "rss_growth_mib": 0.0,
              "slowest_service_ms": 0.0, "seconds": 0.0}
    with tempfile.TemporaryDirectory(prefix="vhostlab-soak-") as workdir:
        srv = Served(workdir)
        try:
            fe = SoakFrontend(srv.socket_path)             # warm up: kernels compiled
            fe.post_rx(8)
            fe.transmit(8)
            fe.answers_need_reply()
            fe.close()
            time.sleep(0.5)
            base_rss, base = srv.rss(), srv.resources()
            faults_every = max(1, messages // max(1, cycles)) if cycles else 0
            next_fault, fault_index = faults_every, 0
            closes_seen = 0
            while result["messages"] < messages or result["cycles"] < cycles:
                if not srv.alive():
                    result["crashes"] += 1
                    break
                if result["cycles"] < cycles and (result["messages"] >= next_fault
                                                  or result["messages"] >= messages):
                    kind = FAULTS[fault_index % len(FAULTS)]
                    fault_index += 1
                    next_fault += faults_every
                    try:
                        fault_cycle(kind, srv.socket_path, rng)
                    except (TimeoutError, socket.timeout):
                        result["hangs"] += 1
                    except (AssertionError, ConnectionError, OSError) as exc:
                        if srv.alive():
                            result["unanswered"] += 1
                            print(f"soak: {kind}: {exc}", file=sys.stderr)
                    result["cycles"] += 1
                    continue
                steps = make_stream(rng, rng.randrange(0, 120))
                fds = StreamFds()
                try:
                    got, hung = play_stream(srv.socket_path, steps, fds)
                finally:
                    fds.close()
                result["messages"] += len(steps)
                result["streams"] += 1
                if hung:
                    result["hangs"] += 1
                    continue
                due = expected_replies(steps)
                answered, wrong, closed = check_replies(got, due)
                result["wrong_replies"] += wrong
                if closed:
                    closes_seen += 1
            time.sleep(0.5)
            if srv.alive():
                named = len(re.findall(r"connection \d+ closed: ", srv.log()))
                result["named_closes"] = min(closes_seen, named)
                result["unnamed_closes"] = max(0, closes_seen - named)
                # The last front-end's release may still be under way: give it 5 s.
                deadline = time.monotonic() + 5
                while srv.resources() > base and time.monotonic() < deadline:
                    time.sleep(0.05)
                fds_now, maps_now = srv.resources()
                result["fd_leak"] = max(0, fds_now - base[0])
                result["mapping_leak"] = max(0, maps_now - base[1])
                result["rss_growth_mib"] = round((srv.rss() - base_rss) / (1 << 20), 1)
                summary = srv.summary()
                result["slowest_service_ms"] = summary.get("slowest_service_ms", 0.0)
            else:
                result["crashes"] += 1 if result["crashes"] == 0 else 0
        finally:
            srv.kill()
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vhostlab.backend.soak",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    result = run(args.messages, args.cycles, args.seed)
    print(json.dumps(result), flush=True)
    bad = (result["crashes"] or result["hangs"] or result["unanswered"]
           or result["wrong_replies"] or result["unnamed_closes"] or result["fd_leak"]
           or result["mapping_leak"] or result["rss_growth_mib"] >= 64)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
