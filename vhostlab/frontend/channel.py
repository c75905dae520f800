"""The front-end's end of one vhost-user socket: QEMU's vhost_user_write/read.

The protocol layer's sans-IO ``FrontendConnection`` turns messages into
bytes and replies back into messages; this module does the I/O around it,
the way hw/virtio/vhost-user.c does with its chardev: ``sendmsg`` with the
fds in SCM_RIGHTS ancillary data, then, when the request is one that gets a
reply, a blocking read of exactly one reply (with a timeout, so a silent
back-end gives a named error instead of a hang).

Every message in and out is recorded in a ``MessageTrace`` of the same shape
as the back-end's (time, direction, request, decoded fields, raw bytes, fd
count), with the same direction for the same message: ``TO_BACKEND`` for
what it sends, ``TO_FRONTEND`` for the replies.
"""
from __future__ import annotations

import array
import socket

from vhostlab.backend.trace import MessageTrace
from vhostlab.backend.transport import close_fds as _close_all
from vhostlab.protocol import TO_BACKEND, TO_FRONTEND, FrontendConnection, Message, ProtocolError

from .optable import VhostOpsError

__all__ = ["VhostUserChannel", "BackendTimeout", "BackendDisconnected"]

DEFAULT_TIMEOUT = 10.0
_RECV_CHUNK = 4096
_MAX_RECV_FDS = 8


class BackendTimeout(VhostOpsError):
    """The back-end did not answer a request that needs a reply in time."""

    def __init__(self, request: str, timeout: float):
        self.request, self.timeout = request, timeout
        super().__init__(f"{request}: no reply from the back-end within {timeout:g} s")


class BackendDisconnected(VhostOpsError):
    """The back-end closed the socket (it refused a request, or went away)."""

    def __init__(self, request: str, detail: str = ""):
        self.request = request
        super().__init__(f"{request}: the back-end closed the connection"
                         + (f" ({detail})" if detail else ""))


class VhostUserChannel:
    """One connected vhost-user socket, seen from the front-end.

    ``call(msg)`` sends a request (with its fds) and returns the reply when
    the request gets one (``None`` otherwise). ``trace`` records both ways.
    The channel owns its socket: ``close()`` closes it. The fds passed in
    messages stay owned by the caller (sendmsg duplicates them into the peer).
    """

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT,
                 trace: MessageTrace | None = None):
        self.sock = sock
        self.timeout = timeout
        self.conn = FrontendConnection()
        self.trace = trace if trace is not None else MessageTrace()
        self.closed = False
        self.listeners: list = []   # called with each TraceRecord, in order
        sock.settimeout(timeout)

    @classmethod
    def connect(cls, path: str, timeout: float = DEFAULT_TIMEOUT,
                trace: MessageTrace | None = None) -> "VhostUserChannel":
        """Connect to a back-end listening at unix socket ``path`` (QEMU's chardev client)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout, trace)

    @classmethod
    def from_fd(cls, fd: int, timeout: float = DEFAULT_TIMEOUT,
                trace: MessageTrace | None = None) -> "VhostUserChannel":
        """Wrap a connected unix stream socket fd (one end of a socketpair); takes ownership."""
        return cls(socket.socket(fileno=fd), timeout, trace)

    @property
    def protocol_features(self) -> int:
        """Protocol features negotiated on this connection (from the SET_PROTOCOL_FEATURES sent)."""
        return int(self.conn.protocol_features)

    def call(self, msg: Message) -> Message | None:
        """Send ``msg``; if the protocol says a reply follows, read and return it."""
        name = msg.request.name
        if self.closed:
            raise BackendDisconnected(name, "channel already closed")
        data = self.conn.send(msg)
        self._sendmsg(name, data, msg.fds)
        self._record(TO_BACKEND, name, msg.fields(), data, len(msg.fds))
        if not self.conn.expecting_reply:
            return None
        return self._read_reply(name)

    def _record(self, direction, name, fields, raw, nfds) -> None:
        rec = self.trace.record(direction, name, fields, raw, nfds)
        for listener in self.listeners:
            listener(rec)

    def _sendmsg(self, name: str, data: bytes, fds) -> None:
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            sent = self.sock.sendmsg([data], anc)
            if sent < len(data):  # fds rode on the first byte; the rest follows plainly
                self.sock.sendall(data[sent:])
        except socket.timeout:
            raise BackendTimeout(name, self.timeout) from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.closed = True
            raise BackendDisconnected(name, exc.strerror or "") from None

    def _read_reply(self, name: str) -> Message:
        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(
                    _RECV_CHUNK, socket.CMSG_SPACE(_MAX_RECV_FDS * 4))
            except socket.timeout:
                raise BackendTimeout(name, self.timeout) from None
            except ConnectionResetError as exc:
                self.closed = True
                raise BackendDisconnected(name, exc.strerror or "") from None
            fds = _take_fds(anc)
            if not data:
                _close_all(fds)
                self.closed = True
                raise BackendDisconnected(name)
            try:
                replies = self.conn.receive_data(data, fds)
            except ProtocolError:
                _close_all(fds)
                raise
            if replies:
                reply = replies[0]
                self._record(TO_FRONTEND, reply.request.name, reply.fields(),
                             reply.to_bytes(), len(reply.fds))
                # No op of the seed's table expects an fd back; close any that came.
                _close_all(reply.fds)
                return reply

    def close(self) -> None:
        """Close the socket (the back-end sees the front-end go away)."""
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "VhostUserChannel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _take_fds(anc) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds

