"""The back-end's side of the unix socket: a private listening socket, SO_PEERCRED and fd passing.

vhost-user rides on an AF_UNIX stream socket; memory-table, log and
eventfd file descriptors travel beside the bytes as SCM_RIGHTS ancillary
data, attached to the first byte of the message that needs them (spec,
"Communication"). Whoever can connect to the socket can make the back-end
map memory and write into it, so:

* the socket lives in a directory only its owner can enter (mode 0700),
  and the socket file itself has mode 0600;
* every connection's peer is checked with SO_PEERCRED and refused unless it
  runs as an allowed uid (by default: ours);
* received fds are close-on-exec (MSG_CMSG_CLOEXEC) and every fd that
  arrives is either kept by its owner or closed, including the fds that
  arrive with a malformed message or beyond the per-message limit.
"""
from __future__ import annotations

import array
import errno
import os
import socket
import stat
import struct
import tempfile
from dataclasses import dataclass
from typing import Iterable, Sequence

from vhostlab.backend.errors import PeerCredentialsError, SocketPathError, TransportError

SOCKET_MODE = 0o600
# Room for more fds than any vhost-user message may carry (VHOST_USER_MAX_FDS
# is 8), so that an excess is seen, closed and reported rather than silently
# discarded by the kernel with MSG_CTRUNC.
MAX_FDS_PER_RECV = 16
_FD_SIZE = array.array("i").itemsize


@dataclass(frozen=True)
class PeerCredentials:
    """Who is on the other end of a unix socket, as the kernel reports it."""

    pid: int
    uid: int
    gid: int


def make_private_dir(prefix: str = "vhostlab-") -> str:
    """Create a fresh directory only this user can enter (0700) and return its path."""
    return tempfile.mkdtemp(prefix=prefix)  # mkdtemp creates it 0700


def check_private_dir(path: str) -> None:
    """Raise SocketPathError unless `path` is a directory owned by us that others cannot enter."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise SocketPathError(f"socket directory {path!r} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SocketPathError(f"{path!r} is not a directory")
    if st.st_uid != os.geteuid():
        raise SocketPathError(f"socket directory {path!r} belongs to uid {st.st_uid}, "
                              f"not to us (uid {os.geteuid()})")
    if st.st_mode & 0o077:
        raise SocketPathError(
            f"socket directory {path!r} has mode {stat.S_IMODE(st.st_mode):04o}; others may "
            f"enter it (limit: 0700). Use a private directory, e.g. `mkdir -m 700 DIR`")


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file nobody listens on any more; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path!r} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise SocketPathError(f"{path!r} is in use: another server listens on it")


def listen_unix(path: str, backlog: int = 4) -> socket.socket:
    """Listen on `path` inside a private directory; the socket file gets mode 0600.

    The socket is bound under a temporary name, made 0600, put in the
    listening state and only then renamed to `path`: whoever sees `path`
    (QEMU, DPDK, a test) can connect at once.
    """
    directory = os.path.dirname(os.path.abspath(path))
    check_private_dir(directory)
    _remove_stale_socket(path)
    staging = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}")
    _remove_stale_socket(staging)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(staging)
        os.chmod(staging, SOCKET_MODE)
        sock.listen(backlog)
        os.rename(staging, path)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if os.path.lexists(staging):
            os.unlink(staging)
        raise SocketPathError(f"cannot listen on {path!r}: {exc.strerror or exc}") from exc
    return sock


def connect_unix(path: str, timeout: float = 5.0) -> socket.socket:
    """Connect to a front-end that listens at `path` (the back-end's `--client` mode)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The peer's pid, uid and gid from SO_PEERCRED (struct ucred: three C ints)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


def check_peer(sock: socket.socket, allowed_uids: Iterable[int] | None = None) -> PeerCredentials:
    """Return the peer's credentials, or raise PeerCredentialsError if its uid is not allowed.

    By default only our own effective uid is allowed: a vhost-user peer can
    make us map and write memory, so it must be us.
    """
    allowed = frozenset(allowed_uids) if allowed_uids is not None else frozenset({os.geteuid()})
    creds = peer_credentials(sock)
    if creds.uid not in allowed:
        raise PeerCredentialsError(creds.pid, creds.uid, allowed)
    return creds


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd in `fds`, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class FdChannel:
    """A connected unix stream socket that carries fds beside the bytes.

    `recv` returns whatever bytes are available (up to a limit) with the fds
    that arrived with them; it never blocks for long (the socket has a short
    timeout and is only read after the selector says it is readable).
    """

    def __init__(self, sock: socket.socket, timeout: float = 2.0):
        self.sock = sock
        self.sock.settimeout(timeout)

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, max_bytes: int) -> tuple[bytes, list[int]]:
        """Read up to `max_bytes` and the fds riding on them; b"" means the peer left.

        Raises TransportError (after closing every fd received) when the
        ancillary data was truncated, i.e. the peer sent more fds than any
        message may carry.
        """
        data, ancdata, msg_flags, _ = self.sock.recvmsg(
            max_bytes, socket.CMSG_SPACE(MAX_FDS_PER_RECV * _FD_SIZE), socket.MSG_CMSG_CLOEXEC)
        fds: list[int] = []
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(cdata) - len(cdata) % _FD_SIZE
                fds.extend(array.array("i", cdata[:usable]))
        if msg_flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise TransportError(f"ancillary data truncated: the peer sent more than "
                                 f"{MAX_FDS_PER_RECV} fds at once (limit per message: 8)")
        return data, fds

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send `data` whole, with `fds` on its first byte; raise TransportError if the peer is stuck."""
        try:
            if fds:
                sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   array.array("i", fds).tobytes())])
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
        except socket.timeout as exc:
            raise TransportError("the front-end does not read its replies (send timed out)") from exc

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def is_eventfd(fd: int) -> bool:
    """Whether `fd` is an eventfd (Linux names it anon_inode:[eventfd] in /proc/self/fd)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def describe_fd(fd: int) -> str:
    """What the kernel says `fd` is, for error messages ('pipe:[123]', '/memfd:guest (deleted)')."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        return f"unreadable ({errno.errorcode.get(exc.errno, exc.errno)})"
