"""A recording vhost-user relay: see the messages between a front-end and a
back-end this process does not implement.

Against vhostlab's own back-end the labs read the back-end's message trace.
Against DPDK's there is no such trace, so the relay sits on the socket in
between, as ``strace`` sits on system calls: the front-end (QEMU, or the
built-in one) connects to the relay's socket, the relay connects to the
real back-end's, and every chunk of bytes, with its fds, is passed on
unchanged. Beside that, each direction is framed and parsed with
the sans-IO protocol layer, and every message goes into a
:class:`~vhostlab.backend.trace.MessageTrace` with the same records a
vhostlab back-end writes (direction ``TO_BACKEND`` or ``TO_FRONTEND``), so
the same views read it.

Passing fds on: a message's fds arrive with the read that holds the start of
its sendmsg (see protocol/connection.py); the relay sends them on with the
same chunk, so the receiver sees them where it would have without the relay.
The relay's own copies are closed once sent. The back-end channel
(SET_BACKEND_REQ_FD) is a socket handed over as an fd: it passes through
untraced.

A parse failure never stops the traffic (the relay is an observer): it is
recorded as an error record and that direction's framing restarts with the
next chunk. The relay waits in ``poll`` with no timeout: it costs no CPU
while nothing is sent. One front-end at a time; when either side hangs up,
the other is hung up too and the relay waits for the next front-end.
Messages are passed on whole: a partial one waits in the relay until its
last byte arrives.

Two hooks, both optional. ``observer(direction, message, fds)`` sees each
parsed message with its fds before the relay closes its copies (it dups what
it keeps); ``observe.ObservedDevice`` builds a device picture from them.
``rewrite(direction, message)`` may return other bytes to send instead: a
front-end and a back-end that disagree, made on purpose (the labs' negative
control strips VHOST_F_LOG_ALL from SET_FEATURES, so a back-end that logs
correctly is never asked to). The trace records what was sent on, and for a
rewritten message also what its sender wrote (``rewritten_from``).
"""
from __future__ import annotations

import os
import select
import socket
import threading
from typing import Callable

from vhostlab.protocol import (HEADER_SIZE, TO_BACKEND, TO_FRONTEND, Feature, Message,
                               ProtocolError, Request, parse_message, peek_header)

from .errors import TransportError
from .trace import MessageTrace
from .transport import close_fds as _close

__all__ = ["VhostUserRelay", "strip_log_all"]


_CHUNK = 1 << 16
_MAX_FDS = 8


class _Framer:
    """One direction's framing: bytes and fds in, complete messages (bytes, fds) out."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.fds: dict[int, list[int]] = {}   # offset of a message's start -> its fds

    def _starts(self) -> list[int]:
        """Offsets of the messages that begin in the buffer (the last may be partial)."""
        starts, pos = [], 0
        while pos < len(self.buffer):
            starts.append(pos)
            if len(self.buffer) - pos < HEADER_SIZE:
                break
            pos += HEADER_SIZE + peek_header(bytes(self.buffer[pos:pos + HEADER_SIZE])).size
        return starts

    def feed(self, data: bytes, fds: list[int]) -> list[tuple[bytes, list[int]]]:
        """Add a chunk; return ``(message bytes, fds)`` for each complete message.

        The chunk's fds belong to the last message that begins in it or, when
        none does, to the message it continues (protocol/connection.py)."""
        chunk_start = len(self.buffer)
        self.buffer += data
        starts = self._starts()
        if fds:
            inside = [p for p in starts if p >= chunk_start]
            owner = inside[-1] if inside else max(p for p in starts if p <= chunk_start)
            self.fds.setdefault(owner, []).extend(fds)
        out = []
        while len(self.buffer) >= HEADER_SIZE:
            size = HEADER_SIZE + peek_header(bytes(self.buffer[:HEADER_SIZE])).size
            if len(self.buffer) < size:
                break
            out.append((bytes(self.buffer[:size]), self.fds.pop(0, [])))
            del self.buffer[:size]
            self.fds = {k - size: v for k, v in self.fds.items()}
        return out

    def reset(self) -> tuple[bytes, list[int]]:
        """Give up framing: return what was buffered, and its fds, to pass on raw."""
        data, fds = bytes(self.buffer), [fd for v in self.fds.values() for fd in v]
        self.buffer.clear()
        self.fds = {}
        return data, fds


def strip_log_all(direction: str, msg: Message) -> bytes | None:
    """A ``rewrite``: SET_FEATURES reaches the back-end without VHOST_F_LOG_ALL,
    so it never logs, however well it would (need_reply is kept)."""
    if (direction == TO_BACKEND and msg.request == Request.SET_FEATURES
            and msg.payload.value & Feature.VHOST_F_LOG_ALL):
        return Message.make(Request.SET_FEATURES, msg.payload.value & ~Feature.VHOST_F_LOG_ALL,
                            need_reply=msg.need_reply).to_bytes()
    return None


class VhostUserRelay:
    """Listen at ``listen_path``; relay each front-end to ``backend_path``.

    ``trace``: where messages are recorded (a new MessageTrace if None).
    Serving runs in a daemon thread from :meth:`start` until :meth:`close`.
    """

    def __init__(self, listen_path: str, backend_path: str,
                 trace: MessageTrace | None = None,
                 observer: Callable[[str, Message, list[int]], None] | None = None,
                 rewrite: Callable[[str, Message], bytes | None] | None = None) -> None:
        self.listen_path, self.backend_path = listen_path, backend_path
        self.trace = trace if trace is not None else MessageTrace()
        self.observer, self.rewrite = observer, rewrite
        self.connections = 0
        self.connected = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(listen_path)
        self._listener.listen(1)
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> "VhostUserRelay":
        self._thread = threading.Thread(target=self._serve, name="vhostlab-relay", daemon=True)
        self._thread.start()
        return self

    # -- serving -------------------------------------------------------------------

    def _wait(self, *socks) -> list:
        """Block until one of ``socks`` is readable; [] when the relay is closing."""
        poller = select.poll()
        poller.register(self._stop_r, select.POLLIN)
        for s in socks:
            poller.register(s, select.POLLIN)
        ready = {fd for fd, _ in poller.poll()}
        if self._stop_r in ready:
            return []
        return [s for s in socks if s.fileno() in ready]

    def _serve(self) -> None:
        while not self._closed:
            if not self._wait(self._listener):
                return
            try:
                front, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            try:
                back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                back.connect(self.backend_path)
            except OSError as err:
                self.trace.record(TO_BACKEND, "connect", {}, b"", connection=self.connections,
                                  error=f"the back-end at {self.backend_path} refused: {err}")
                front.close()
                continue
            self.connected = True
            try:
                self._pump(front, back)
            finally:
                self.connected = False
                front.close()
                back.close()

    def _pump(self, front: socket.socket, back: socket.socket) -> None:
        framers = {front: _Framer(), back: _Framer()}
        peer = {front: back, back: front}
        try:
            while True:
                ready = self._wait(front, back)
                if not ready:
                    return
                for src in ready:
                    try:
                        data, fds, _flags, _addr = socket.recv_fds(src, _CHUNK, _MAX_FDS)
                    except OSError:
                        return
                    if not data:
                        _close(fds)
                        if src is back:     # a back-end's refusal: worth a record
                            self.trace.record(TO_FRONTEND, "hang-up", {}, b"",
                                              connection=self.connections,
                                              error="the back-end closed the connection")
                        return                  # one side hung up: so does the other
                    direction = TO_BACKEND if src is front else TO_FRONTEND
                    if not self._relay(framers[src], peer[src], direction, data, fds):
                        return
        finally:
            for framer in framers.values():
                _close(framer.reset()[1])

    def _relay(self, framer: _Framer, dst: socket.socket, direction: str, data: bytes,
               fds: list[int]) -> bool:
        """Pass on each message completed by this chunk, each with its own fds in
        its own sendmsg (so the receiver ties them to the right message), and
        record it. False when the destination is gone."""
        try:
            messages = framer.feed(data, fds)
        except ProtocolError as err:        # not vhost-user framing: pass it on raw
            raw, raw_fds = framer.reset()
            self.trace.record(direction, "?", {}, raw, len(raw_fds),
                              connection=self.connections, error=str(err))
            messages = [(raw, raw_fds)]
        for raw, msg_fds in messages:
            msg = self._parse(raw, len(msg_fds))
            sent_as = None                      # the message as its sender wrote it, if rewritten
            if msg is not None and self.rewrite is not None:
                other = self.rewrite(direction, msg)
                if other is not None and other != raw:
                    sent_as, raw = msg, other
                    msg = self._parse(raw, len(msg_fds)) or msg
            try:
                if msg is not None and self.observer is not None:
                    self.observer(direction, msg, msg_fds)    # before the receiver acts
                sent = socket.send_fds(dst, [raw], msg_fds) if msg_fds else dst.send(raw)
                if sent < len(raw):
                    dst.sendall(raw[sent:])
            except OSError:
                return False
            finally:
                _close(msg_fds)
            self._record(direction, raw, len(msg_fds), msg, sent_as)
        return True

    @staticmethod
    def _parse(raw: bytes, nfds: int) -> Message | None:
        try:
            return parse_message(raw, [-1] * nfds, check_fd_count=False)
        except ProtocolError:
            return None

    def _record(self, direction: str, raw: bytes, nfds: int, msg: Message | None,
                sent_as: Message | None = None) -> None:
        """Record what was passed on; a rewritten message also keeps the payload its
        sender wrote, as ``rewritten_from``, so the trace shows both."""
        if msg is None:
            try:
                parse_message(raw, [-1] * nfds, check_fd_count=False)
            except ProtocolError as err:
                self.trace.record(direction, str(err.request or "?"), {}, raw, nfds,
                                  connection=self.connections, error=str(err))
            return
        fields = msg.fields()
        if sent_as is not None:
            fields = {**fields, "rewritten_from": sent_as.fields().get("payload")}
        self.trace.record(direction, msg.request.name, fields, raw, nfds,
                          connection=self.connections)

    # -- life cycle ----------------------------------------------------------------

    def close(self) -> None:
        """Stop serving, hang up, remove the socket. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
            if self._thread.is_alive():
                raise TransportError("the relay thread did not stop",
                                     what="VhostUserRelay", value=self.listen_path)
        self._listener.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        try:
            os.unlink(self.listen_path)
        except OSError:
            pass

    def __enter__(self) -> "VhostUserRelay":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.close()
