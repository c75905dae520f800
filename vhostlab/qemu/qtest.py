"""A client for QEMU's qtest protocol: port I/O and guest-memory access by text.

QEMU started with ``-qtest unix:PATH`` connects to PATH as a client, so the
test process listens there first (:class:`QTestServer`) and accepts QEMU's
connection. The protocol (QEMU softmmu/qtest.c) is one command a line, one
answer a line: ``OK``, ``OK <value>`` or ``FAIL <reason>``. Lines starting
with ``IRQ`` (``IRQ raise N`` / ``IRQ lower N``) arrive at any time once an
interrupt controller's inputs are intercepted (``irq_intercept_in``); they
are not answers.

A reader thread blocked in ``recv`` takes every line off the socket as soon
as QEMU writes it. That matters: QEMU writes IRQ lines with a blocking write
from its main loop, so a client that stopped reading would eventually freeze
QEMU. The thread sleeps in the kernel between lines; nothing polls.

Every guest-memory write a driver makes must go through here (``write``,
``writel`` ...), not through a mapping of the memfd: QEMU's migration dirty
tracking only sees writes made through QEMU.
"""
from __future__ import annotations

import base64
import collections
import os
import socket
import threading
import time
from typing import Callable

from .errors import QTestConnectionError, QTestError

__all__ = ["QTest", "QTestServer", "QTestRingMemory", "IrqEvent"]

#: Bytes per b64write/b64read command; keeps each line and answer bounded.
CHUNK = 64 * 1024
#: Widths of the sized accessors, in bytes.
_WIDTH = {"b": 1, "w": 2, "l": 4, "q": 8}

IrqEvent = collections.namedtuple("IrqEvent", "line level when")
IrqEvent.__doc__ = "One asynchronous IRQ line from QEMU: line number, raised?, time.monotonic()."

# Called when the connection breaks; returns keyword arguments for the error
# (exit_code, stderr_tail, hint) and a sentence on what happened to QEMU.
Diagnose = Callable[[], "tuple[str, dict]"]


_WHAT = {"b": "a byte", "w": "a little-endian u16", "l": "a little-endian u32",
         "q": "a little-endian u64"}


def _sized(access: str, w: str, doc: str) -> Callable:
    """A QTest method for one width (``outb``, ``readw`` ...): ``access`` with ``w`` first."""
    def method(self, *args):
        return getattr(self, access)(w, *args)
    method.__name__ = method.__qualname__ = access.strip("_").split("_")[0] + w
    method.__doc__ = doc.format(_WHAT[w])
    return method


class QTestServer:
    """The listening end at ``path`` that QEMU's ``-qtest unix:PATH`` connects to."""

    def __init__(self, path: str):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(path)
            os.chmod(path, 0o600)
            self._sock.listen(1)
        except OSError:
            self._sock.close()
            raise

    def accept(self, timeout: float, alive: Callable[[], bool] = lambda: True,
               diagnose: Diagnose | None = None, command_timeout: float = 10.0) -> "QTest":
        """Wait up to ``timeout`` s for QEMU to connect; give up early if ``alive()`` turns false.

        Raises QTestConnectionError when QEMU does not connect.
        """
        deadline = time.monotonic() + timeout
        # Short slices so a QEMU that exits during start-up is noticed at once.
        self._sock.settimeout(0.1)
        while True:
            try:
                conn, _ = self._sock.accept()
                break
            except socket.timeout:
                if not alive():
                    what, info = diagnose() if diagnose else ("QEMU exited", {})
                    raise QTestConnectionError(
                        f"{what} before connecting to the qtest socket {self.path}", **info)
                if time.monotonic() > deadline:
                    raise QTestConnectionError(
                        f"QEMU did not connect to the qtest socket {self.path} "
                        f"within {timeout:g} s",
                        hint="QEMU may be waiting for a vhost-user back-end; is it listening?")
        conn.settimeout(None)
        return QTest(conn, timeout=command_timeout, diagnose=diagnose)

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class QTest:
    """One qtest connection. Thread-safe: one command at a time, under a lock.

    ``timeout`` bounds the wait for every answer. A timeout or a broken
    connection closes the connection (a late answer could otherwise be taken
    for the next command's) and raises :class:`QTestConnectionError`.
    """

    def __init__(self, sock: socket.socket, *, timeout: float = 10.0,
                 diagnose: Diagnose | None = None):
        self.timeout = timeout
        self.commands_sent = 0
        #: Called with (gpa, length) after each write to guest memory: the pages
        #: QEMU's own dirty tracking sees (a migration records them per round).
        self.on_write: Callable[[int, int], None] | None = None
        self._sock = sock
        self._diagnose = diagnose
        self._lock = threading.Lock()          # one command at a time
        self._cond = threading.Condition()     # answers, IRQ state, closed
        self._answers: collections.deque[str] = collections.deque()
        self._irq_level: dict[int, bool] = {}
        self._irq_raises: collections.Counter[int] = collections.Counter()
        self.last_irq: IrqEvent | None = None
        self._closed: str | None = None
        self._reader = threading.Thread(target=self._read_loop, name="vhostlab-qtest-reader",
                                        daemon=True)
        self._reader.start()

    # -- connection --------------------------------------------------------
    def _read_loop(self) -> None:
        buf = b""
        reason = "QEMU closed the qtest connection"
        try:
            while True:
                chunk = self._sock.recv(65536)
                if not chunk:
                    break
                *lines, buf = (buf + chunk).split(b"\n")
                with self._cond:
                    for raw in lines:
                        self._dispatch(raw.decode("ascii", "replace").rstrip("\r"))
                    self._cond.notify_all()
        except OSError as exc:
            reason = f"qtest connection error: {exc}"
        with self._cond:
            if self._closed is None:
                self._closed = reason
            self._cond.notify_all()

    def _dispatch(self, line: str) -> None:
        if line.startswith("IRQ"):
            # "IRQ raise N" / "IRQ lower N": asynchronous, never an answer.
            words = line.split()
            if len(words) == 3 and words[2].isdigit():
                n, level = int(words[2]), words[1] == "raise"
                self._irq_level[n] = level
                if level:
                    self._irq_raises[n] += 1
                self.last_irq = IrqEvent(n, level, time.monotonic())
            return
        self._answers.append(line)

    @property
    def closed(self) -> bool:
        """True once the connection is gone (closed here, or QEMU went away)."""
        return self._closed is not None

    def close(self) -> None:
        """Close the connection and stop the reader thread. Idempotent."""
        with self._cond:
            if self._closed is None:
                self._closed = "the qtest connection was closed by this process"
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(timeout=2.0)
        self._sock.close()

    def _lost(self, command: str, why: str) -> QTestConnectionError:
        what, info = self._diagnose() if self._diagnose else ("", {})
        if len(command) > 80:  # a b64write line carries up to 87 KiB of base64
            command = command[:60] + f"... ({len(command)} characters)"
        msg = f"qtest {command!r}: {why}"
        if what:
            msg += f"; {what}"
        return QTestConnectionError(msg, **info)

    # -- commands ----------------------------------------------------------
    def command(self, line: str) -> str:
        """Send one command line; return the text after ``OK`` ('' if none).

        Raises QTestError on ``FAIL``, QTestConnectionError when QEMU goes
        away or does not answer within ``timeout``.
        """
        with self._lock:
            with self._cond:
                if self._closed is not None:
                    raise self._lost(line, self._closed)
            try:
                self._sock.sendall(line.encode("ascii") + b"\n")
            except OSError as exc:
                raise self._lost(line, f"sending failed ({exc})") from None
            self.commands_sent += 1
            try:
                reply = self._await_answer()
            except BaseException as exc:
                # Timed out or interrupted (Ctrl-C): a late answer would be taken
                # for the next command's, so this connection is done.
                with self._cond:
                    if self._closed is None:
                        self._closed = f"qtest {line!r} was interrupted; connection closed"
                self.close()
                if isinstance(exc, TimeoutError):
                    raise self._lost(line, f"no answer within {self.timeout:g} s") from None
                raise
            if reply is None:
                raise self._lost(line, self._closed)
        if reply == "OK":
            return ""
        if reply.startswith("OK "):
            return reply[3:]
        raise QTestError(line, reply)

    def _await_answer(self) -> str | None:
        """The next answer line; None if the connection closed; raises on timeout."""
        with self._cond:
            self._cond.wait_for(lambda: self._answers or self._closed is not None, self.timeout)
            if self._answers:
                return self._answers.popleft()
            if self._closed is not None:
                return None
            self._closed = f"an earlier command got no answer within {self.timeout:g} s"
        raise TimeoutError

    def _value(self, line: str) -> int:
        return int(self.command(line), 16)

    # -- port I/O ----------------------------------------------------------
    def _out(self, w: str, port: int, value: int) -> None:
        _check_port(port, _WIDTH[w])
        _check_value(value, _WIDTH[w])
        self.command(f"out{w} {port:#x} {value:#x}")

    def _in(self, w: str, port: int) -> int:
        _check_port(port, _WIDTH[w])
        return self._value(f"in{w} {port:#x}")

    outb, outw, outl = (_sized("_out", w, "Write {} to an I/O port.") for w in "bwl")
    inb, inw, inl = (_sized("_in", w, "Read {} from an I/O port.") for w in "bwl")

    # -- guest memory ------------------------------------------------------
    def _read_sized(self, w: str, addr: int) -> int:
        _check_range(addr, _WIDTH[w])
        return self._value(f"read{w} {addr:#x}")

    def _write_sized(self, w: str, addr: int, value: int) -> None:
        _check_range(addr, _WIDTH[w])
        _check_value(value, _WIDTH[w])
        self.command(f"write{w} {addr:#x} {value:#x}")
        self._wrote(addr, _WIDTH[w])

    def _wrote(self, addr: int, n: int) -> None:
        hook = self.on_write
        if hook is not None:
            hook(addr, n)

    readb, readw, readl, readq = (
        _sized("_read_sized", w, "Read {} of guest memory at guest-physical ``addr``.")
        for w in "bwlq")
    writeb, writew, writel, writeq = (
        _sized("_write_sized", w, "Write {} to guest memory at guest-physical ``addr`` "
               "(through QEMU, so it is dirty-tracked).") for w in "bwlq")

    def read(self, addr: int, n: int) -> bytes:
        """Read ``n`` bytes of guest memory at ``addr`` (b64read, in chunks)."""
        _check_range(addr, n)
        out = bytearray()
        for off in range(0, n, CHUNK):
            size = min(CHUNK, n - off)
            out += base64.b64decode(self.command(f"b64read {addr + off:#x} {size:#x}"))
        if len(out) != n:
            raise QTestError(f"b64read {addr:#x} {n:#x}", f"got {len(out)} bytes, wanted {n}")
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        """Write ``data`` to guest memory at ``addr`` (b64write, in chunks)."""
        data = bytes(data)
        _check_range(addr, len(data))
        for off in range(0, len(data), CHUNK):
            piece = data[off:off + CHUNK]
            b64 = base64.b64encode(piece).decode("ascii")
            self.command(f"b64write {addr + off:#x} {len(piece):#x} {b64}")
        self._wrote(addr, len(data))

    def memset(self, addr: int, n: int, byte: int) -> None:
        """Fill ``n`` bytes of guest memory at ``addr`` with ``byte``."""
        _check_range(addr, n)
        _check_value(byte, 1)
        if n:
            self.command(f"memset {addr:#x} {n:#x} {byte:#x}")
            self._wrote(addr, n)

    # -- interrupts --------------------------------------------------------
    def irq_intercept_in(self, qom_path: str) -> None:
        """Have QEMU report the inputs of device ``qom_path`` as ``IRQ`` lines."""
        self.command(f"irq_intercept_in {qom_path}")

    def irq_level(self, line: int) -> bool:
        """Latest level QEMU reported for intercepted IRQ ``line``."""
        with self._cond:
            return self._irq_level.get(line, False)

    def irq_raise_count(self, line: int) -> int:
        """How many times QEMU reported ``IRQ raise line``."""
        with self._cond:
            return self._irq_raises[line]

    def wait_irq(self, line: int, timeout: float) -> bool:
        """Block (no polling) until IRQ ``line`` is raised or ``timeout`` passes.

        Returns the level at the end. Raises QTestConnectionError if the
        connection is lost meanwhile.
        """
        with self._cond:
            self._cond.wait_for(
                lambda: self._irq_level.get(line, False) or self._closed is not None,
                max(0.0, timeout))
            if self._closed is not None:
                raise self._lost(f"(wait for IRQ {line})", self._closed)
            return self._irq_level.get(line, False)


def _check_port(port: int, width: int) -> None:
    if not 0 <= port <= 0x10000 - width:
        raise ValueError(f"I/O port {port:#x} out of range 0..{0x10000 - width:#x}")


def _check_value(value: int, width: int) -> None:
    if not 0 <= value < 1 << (8 * width):
        raise ValueError(f"value {value:#x} does not fit in {width} byte(s)")


def _check_range(addr: int, n: int) -> None:
    if addr < 0 or n < 0 or addr + n > 1 << 64:
        raise ValueError(f"guest range [{addr:#x}, +{n:#x}) outside the 64-bit address space")


class QTestRingMemory:
    """Guest RAM for the ring driver (``vhostlab.ring.driver.RingMemory``), by qtest commands.

    Every write goes through QEMU, so its migration dirty bitmap sees it and
    :attr:`QTest.on_write` reports it. The driver's ordering points need no
    barrier here: QEMU carries out each command to the end in its main loop
    before it answers, and the next command leaves only after that answer, so
    the socket round trip between two accesses orders them as a release
    store, an acquire load or a full barrier would. The ordered accesses are
    plain ``readw``/``writew`` and :meth:`mb` does nothing.
    """

    def __init__(self, qtest: QTest):
        self.qtest = qtest
        self.read, self.write, self.memset = qtest.read, qtest.write, qtest.memset
        self.readw, self.writew = qtest.readw, qtest.writew
        self.load_acquire_w, self.store_release_w = qtest.readw, qtest.writew

    def mb(self) -> None:
        """Nothing to do: the previous command has been carried out and answered."""
