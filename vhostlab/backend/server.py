"""The device server: one selector loop over the socket, the kick eventfds and a wake-up fd.

Event mode (the default) sleeps in `select()` until the front-end sends a
message, a guest kicks a queue, or another thread asks for something
(`stop`, `inject`): an idle device costs no CPU. Poll mode (`mode="poll"`,
for benchmarks) never sleeps and services every started ring on every
turn, as DPDK's PMD threads do.

One front-end at a time: while a connection is open the listening socket
is not watched, so the next front-end waits in the backlog and is served
when the current one leaves. When it leaves, the device is released
(mappings, fds, rings) and a reconnecting front-end finds it clean.

The ring kernels are compiled (or loaded from numba's cache) before the
socket is opened, so the JIT never stalls the message loop mid-handshake.

Threads: the loop runs either in the caller's thread (`run()`, used by
`vhostlab serve`) or in a background thread (`start()` / `stop()`, for
notebooks). Everything the loop changes is changed under `self.lock`;
`snapshot()` takes the same lock and returns immutable copies, so a lab can
draw the device while it runs.
"""
from __future__ import annotations

import atexit
import logging
import os
import selectors
import shutil
import socket
import threading
import time
import weakref
from typing import Iterable, Mapping, Sequence

from vhostlab.backend import handlers as _handlers
from vhostlab.backend.device import DEFAULT_MAC, DEFAULT_MTU, VhostUserNetDevice, Vring
from vhostlab.backend.errors import BackendError, PeerCredentialsError, TransportError
from vhostlab.backend.net_device import RING_FEATURES
from vhostlab.backend.snapshot import DeviceSnapshot, take_snapshot
from vhostlab.backend.trace import DEFAULT_MAXLEN, MessageTrace
from vhostlab.backend.transport import (FdChannel, check_peer, close_fds, connect_unix,
                                        listen_unix, make_private_dir)
from vhostlab.backend.wire import LoopbackWire, Wire, make_wire
from vhostlab.protocol import (HEADER_SIZE, TO_BACKEND, TO_FRONTEND, BackendConnection, Message,
                               ProtocolError, Request, parse_message, peek_header)
from vhostlab.ring import FrameArena
from vhostlab.ring.warm import kernels_loaded, load_kernels

log = logging.getLogger("vhostlab.backend")

RECONNECT_DELAY = 0.5          # client mode: wait between connection attempts
POLLED_RING_INTERVAL = 0.001   # event mode with a ring the front-end asked us to poll
POLL_SELECT_EVERY = 16         # poll mode: turns between looks at the socket and eventfds


class FrontendSession:
    """One front-end on the socket: the channel, the sans-IO protocol state, framing."""

    def __init__(self, number: int, sock: socket.socket, device: VhostUserNetDevice):
        self.number = number
        self.channel = FdChannel(sock)
        # Fd counts are checked per request (handlers.dispatch), as DPDK's
        # validate_msg_fds() does: a request with need_reply and the wrong fds
        # then gets a failure status, as REPLY_ACK demands, not a closed socket.
        # The negotiated features are the device's (as it accepted them).
        self.proto = BackendConnection(device.offered_protocol_features,
                                       check_fd_counts=False, negotiated=device)
        self.head = bytearray()       # bytes of the current message's header seen so far
        self.got = 0                  # bytes of the current message seen so far

    def wanted(self) -> int:
        """Bytes to read so that one read never crosses into the next message."""
        if self.got < HEADER_SIZE:
            return HEADER_SIZE - self.got
        return HEADER_SIZE + peek_header(bytes(self.head)).size - self.got


class BackendServer:
    """A vhost-user-net back-end serving one front-end at a time on a unix socket.

    socket_path: where to listen (or, with client=True, where the front-end
        listens). None: a fresh private directory is made and removed at stop.
    queue_pairs: number of RX/TX queue pairs (GET_QUEUE_NUM answers this).
    wire: "sink", "loopback", "pcap:FILE" or a Wire object.
    mode: "event" (sleep until something happens) or "poll" (busy-poll rings).
    once: stop after the first front-end leaves.
    break_logging: skip dirty logging (the migration demo's negative control).
    handlers: request -> handler entries that replace this server's defaults
        (same signature as :data:`handlers.HANDLERS`); other servers keep theirs.
    """

    def __init__(self, socket_path: str | None = None, *, client: bool = False,
                 queue_pairs: int = 1, wire: str | Wire = "sink", mode: str = "event",
                 once: bool = False, break_logging: bool = False, trace_path: str | None = None,
                 trace_maxlen: int = DEFAULT_MAXLEN, allowed_uids: Iterable[int] | None = None,
                 mac: bytes = DEFAULT_MAC, mtu: int = DEFAULT_MTU,
                 handlers: Mapping | None = None):
        if mode not in ("event", "poll"):
            raise ValueError(f"mode={mode!r}: expected 'event' or 'poll'")
        self._own_dir = None
        if socket_path is None:
            if client:
                raise ValueError("client mode needs the front-end's socket_path")
            self._own_dir = make_private_dir()
            socket_path = os.path.join(self._own_dir, "vhost-user.sock")
            weakref.finalize(self, shutil.rmtree, self._own_dir, True)   # even if never started
        self.socket_path = socket_path
        self.client, self.mode, self.once = client, mode, once
        self.handlers = {**_handlers.HANDLERS, **(handlers or {})}
        self.allowed_uids = None if allowed_uids is None else frozenset(allowed_uids)
        self.lock = threading.RLock()
        self.device = VhostUserNetDevice(queue_pairs, mac=mac, mtu=mtu,
                                         break_logging=break_logging,
                                         ring_features=RING_FEATURES)
        self.device.watch, self.device.unwatch = self._watch, self._unwatch
        self.wire = make_wire(wire)
        self.device.net.wire = self.wire
        if isinstance(self.wire, LoopbackWire):
            self.wire.deliver = self.device.net.deliver
        self.trace = MessageTrace(trace_maxlen, trace_path)
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._conn: FrontendSession | None = None
        self._wake_fd = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: list[tuple[FrameArena, int]] = []
        # Guards _pending and the wake fd's life. Re-entrant: `vhostlab serve`
        # calls stop() from a signal handler, in the thread that runs the loop.
        self._wake_lock = threading.RLock()
        self._next_connect = 0.0
        self._served = 0
        self._spins = 0
        self.peer = None

    # -- lifecycle ------------------------------------------------------------------
    def __enter__(self) -> "BackendServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "BackendServer":
        """Open the socket now (errors raise here), then serve in a background thread."""
        self._open()
        self._thread = threading.Thread(target=self._serve, name="vhostlab-backend", daemon=True)
        self._thread.start()
        atexit.register(self.stop)      # a notebook kernel that exits takes the server down
        return self

    def run(self) -> None:
        """Serve in the calling thread until `stop()` (or, with once, the front-end leaves)."""
        self._open()
        self._serve()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, close the connection, release the device, remove the socket."""
        self._stop.set()
        self._wake()
        atexit.unregister(self.stop)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                raise BackendError(f"the server thread did not stop within {timeout} s")

    @property
    def running(self) -> bool:
        return self._selector is not None and not self._stop.is_set()

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def _open(self) -> None:
        if self._stop.is_set():
            raise BackendError("this server was stopped; make a new BackendServer")
        if not kernels_loaded():
            # Before the socket exists: the first ring a front-end starts must not
            # stall the message loop for the JIT (see vhostlab.ring.warm).
            log.info("loading the ring kernels (compiled on the first run, then cached)")
            load_kernels()
        self._selector = selectors.DefaultSelector()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wake_fd, selectors.EVENT_READ, ("wake", None))
        if not self.client:
            try:
                self._listener = listen_unix(self.socket_path)
            except BaseException:
                self._close_all()
                raise
            self._selector.register(self._listener, selectors.EVENT_READ, ("listen", None))
        log.info("vhost-user-net back-end %s %s (%d queue pair(s), wire %s, %s mode)",
                 "connecting to" if self.client else "listening on", self.socket_path,
                 self.device.queue_pairs, self.wire.name, self.mode)

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                self._turn()
        except Exception as exc:            # a bug here must not leave fds or maps behind
            log.exception("back-end loop failed")
            self.device.error(f"internal error: {exc.__class__.__name__}: {exc}")
        finally:
            self._close_all()

    def _close_all(self) -> None:
        with self.lock:
            if self._conn is not None:
                self._disconnect("server stopping")
            self.device.release()
            if self._listener is not None:
                self._listener.close()
                self._listener = None
                try:
                    os.unlink(self.socket_path)
                except OSError:
                    pass
            if self._selector is not None:
                self._selector.close()
                self._selector = None
            with self._wake_lock:             # no other thread may write to it after this
                if self._wake_fd >= 0:
                    close_fds([self._wake_fd])
                    self._wake_fd = -1
            self.wire.close()
            self.trace.close()
            if self._own_dir is not None:
                shutil.rmtree(self._own_dir, ignore_errors=True)
                self._own_dir = None

    # -- one turn of the loop -----------------------------------------------------------
    def _turn(self) -> None:
        if self.client and self._conn is None:
            self._try_connect()
        self._spins += 1
        if self.mode == "poll":
            # Poll mode looks at the socket and eventfds only every few turns:
            # a select() per burst would cost as much as the burst itself.
            if self._spins % POLL_SELECT_EVERY == 0:
                self._handle_events(self._selector.select(0))
            if self._selector is not None and not self._stop.is_set():
                with self.lock:
                    self.device.net.poll_all()
            return
        self._handle_events(self._selector.select(self._timeout()))
        if self._selector is not None and self._has_polled_rings():
            with self.lock:
                self.device.net.poll_all()
        if self._selector is not None and self.device.busy and not self._stop.is_set():
            # Work a service left (its weight was spent): at once, after the
            # socket and the other rings had their turn (select(0) above).
            with self.lock:
                for index in sorted(self.device.busy):
                    self._service(self.device.vrings[index])

    def _handle_events(self, events) -> None:
        for key, _ in events:
            if self._selector is None or self._stop.is_set():
                return
            if self._selector.get_map().get(key.fd) is not key:
                continue            # unregistered by an earlier event of this batch
            kind, obj = key.data
            if kind == "wake":
                self._on_wake()
            elif kind == "listen":
                self._accept()
            elif kind == "conn":
                self._on_readable(obj)
            elif kind == "kick":
                self._on_kick(obj, key.fd)

    def _timeout(self) -> float | None:
        if self.device.busy:
            return 0.0
        if self.client and self._conn is None:
            return max(0.0, self._next_connect - time.monotonic())
        return POLLED_RING_INTERVAL if self._has_polled_rings() else None

    def _has_polled_rings(self) -> bool:
        # A ring started with SET_VRING_KICK's no-fd flag: "polling should be used".
        return any(v.started and v.kick_fd < 0 for v in self.device.vrings)

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_fd >= 0:
                try:
                    os.eventfd_write(self._wake_fd, 1)
                except OSError:             # saturated, or closing under a signal handler
                    pass

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        with self._wake_lock:
            pending, self._pending = self._pending, []
        with self.lock:
            for batch, pair in pending:
                self.device.net.deliver(batch, pair)

    # -- connections ----------------------------------------------------------------
    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self._adopt(sock)

    def _try_connect(self) -> None:
        if time.monotonic() < self._next_connect:
            return
        self._next_connect = time.monotonic() + RECONNECT_DELAY
        try:
            sock = connect_unix(self.socket_path, timeout=2.0)
        except OSError as exc:
            log.debug("connect to %s: %s", self.socket_path, exc)
            return
        self._adopt(sock)

    def _adopt(self, sock: socket.socket) -> None:
        try:
            creds = check_peer(sock, self.allowed_uids)
        except PeerCredentialsError as exc:
            self.device.error(f"connection refused: {exc}")
            sock.close()
            return
        with self.lock:
            self._served += 1
            self.device.counters.connections += 1
            self.peer = creds
            self._conn = FrontendSession(self._served, sock, self.device)
            self._selector.register(sock, selectors.EVENT_READ, ("conn", self._conn))
            if self._listener is not None:
                self._selector.unregister(self._listener)
        log.info("front-end connected: pid %d uid %d (connection %d)", creds.pid, creds.uid,
                 self._served)

    def _disconnect(self, why: str) -> None:
        conn = self._conn
        if conn is None:
            return
        with self.lock:
            self._conn = None
            self.peer = None
            self._selector.unregister(conn.channel.sock)
            conn.channel.close()
            close_fds(conn.proto.reset())     # fds of a message that never completed
            self.device.release()
            if self._listener is not None and not self._stop.is_set():
                self._selector.register(self._listener, selectors.EVENT_READ, ("listen", None))
        log.info("front-end left (connection %d): %s", conn.number, why)
        if self.once:
            self._stop.set()

    def _on_readable(self, conn: FrontendSession) -> None:
        try:
            data, fds = conn.channel.recv(conn.wanted())
        except (TransportError, OSError) as exc:
            self._fail(conn, f"receive failed: {exc}")
            return
        except ProtocolError as exc:       # wanted() read a bad header size
            self._fail(conn, str(exc))
            return
        if not data:
            close_fds(fds)
            self._disconnect("closed the connection")
            return
        if conn.got < HEADER_SIZE:
            conn.head += data[: HEADER_SIZE - conn.got]
        conn.got += len(data)
        try:
            messages = conn.proto.receive_data(data, fds)
        except ProtocolError as exc:
            self.trace.record(TO_BACKEND, _request_name(conn.head), {}, bytes(conn.head),
                              len(conn.proto.pending_fds), conn.number, error=str(exc))
            self._fail(conn, f"malformed message: {exc}")
            return
        for i, msg in enumerate(messages):
            conn.head, conn.got = bytearray(), 0
            try:
                alive = self._handle(conn, msg)
            except Exception as exc:        # a bug must cost one connection, not the server
                log.exception("handling %s failed", msg.request.name)
                alive = False
                self._fail(conn, f"internal error on {msg.request.name}: {exc}")
            if not alive:
                for rest in messages[i + 1:]:
                    close_fds(rest.fds)     # parsed but never handled
                return

    def _fail(self, conn: FrontendSession, why: str) -> None:
        self.device.counters.closed_with_error += 1
        self.device.error(f"connection {conn.number} closed: {why}")
        self._disconnect(why)

    # -- requests ---------------------------------------------------------------------
    def _handle(self, conn: FrontendSession, msg: Message) -> bool:
        """Handle one request and answer it; False if the connection was closed."""
        with self.lock:
            self.device.counters.messages[msg.request.name] += 1
            self.trace.record(TO_BACKEND, msg.request.name, msg.fields(), msg.to_bytes(),
                              len(msg.fds), conn.number)
            outcome = _handlers.dispatch(self.device, msg, self.handlers)
            self.device.check_shrunk()
            reply = conn.proto.answer(msg, outcome.payload, refused=outcome.error is not None)
            if outcome.error is not None:
                if reply is None:
                    self._fail(conn, f"{outcome.error} (its only failure answer is closing)")
                    return False
                self.device.error(f"refused: {outcome.error}")
            if reply:
                try:
                    conn.channel.send(reply)
                except (TransportError, OSError) as exc:
                    self._fail(conn, f"reply to {msg.request.name} failed: {exc}")
                    return False
                answer = parse_message(reply)
                self.trace.record(TO_FRONTEND, answer.request.name, answer.fields(), reply, 0,
                                  conn.number)
        return True

    # -- kicks ------------------------------------------------------------------------
    def _watch(self, fd: int, vring: Vring) -> None:
        self._selector.register(fd, selectors.EVENT_READ, ("kick", vring))

    def _unwatch(self, fd: int) -> None:
        if self._selector is not None:
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass

    def _on_kick(self, vring: Vring, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        except OSError as exc:
            with self.lock:
                self.device.error(f"vring {vring.index}: kick fd unreadable ({exc}); ring stopped")
                self.device.stop_vring(vring)
            return
        with self.lock:
            self.device.counters.kicks += 1
            self._service(vring)

    def _service(self, vring: Vring) -> None:
        """Service one ring (under the lock), timing it for the summary."""
        t0 = time.perf_counter()
        self.device.net.service(vring)
        took = time.perf_counter() - t0
        counters = self.device.counters
        counters.slowest_service_ms = max(counters.slowest_service_ms, took * 1000)

    # -- for notebooks ----------------------------------------------------------------
    def inject(self, frames: Sequence[bytes], queue_pair: int = 0) -> int:
        """Queue frames toward the guest's RX ring of `queue_pair`; returns how many.

        The loop copies them into the guest's posted RX buffers (the RX
        kernel); frames that find no buffer wait in a bounded backlog until
        the guest posts more, or are counted as dropped.
        """
        if not 0 <= queue_pair < self.device.queue_pairs:
            raise ValueError(f"queue_pair={queue_pair}: the device has "
                             f"{self.device.queue_pairs} queue pair(s)")
        frames = [bytes(f) for f in frames]
        if not frames:
            return 0
        with self._wake_lock:
            self._pending.append((FrameArena.from_frames(frames), queue_pair))
        self._wake()
        return len(frames)

    def snapshot(self, descriptors: bool = False, trace: bool = True) -> DeviceSnapshot:
        """A consistent, immutable view of the device (taken under the lock)."""
        with self.lock:
            return take_snapshot(self, descriptors=descriptors, trace=trace)

    def wait_for(self, predicate, timeout: float = 10.0, interval: float = 0.01) -> bool:
        """Wait until `predicate(snapshot)` holds; False on timeout (never raises)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.snapshot(trace=False)):
                return True
            time.sleep(interval)
        return False

    def summary(self) -> dict:
        """The counters `vhostlab serve` prints at exit."""
        with self.lock:
            return self.device.counters.summary()


def _request_name(head: bytes) -> str:
    if len(head) >= 4:
        rid = int.from_bytes(head[:4], "little")
        try:
            return Request(rid).name
        except ValueError:
            return f"request {rid}"
    return "partial header"
