"""The socket layer: private directory, mode 0600, SO_PEERCRED, fd passing, fd hygiene."""
from __future__ import annotations

import os
import socket
import stat
import tempfile

import pytest

from vhostlab.backend import transport
from vhostlab.backend.errors import PeerCredentialsError, SocketPathError, TransportError


def _open_fds() -> set[str]:
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{fd}")
            fds.add(fd)
        except OSError:              # the directory listdir itself had open
            pass
    return fds


def test_listen_makes_socket_0600_in_private_dir(tmp_path):
    d = tmp_path / "priv"
    d.mkdir(mode=0o700)
    path = str(d / "vu.sock")
    sock = transport.listen_unix(path)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
    finally:
        sock.close()


def test_listen_refuses_directory_others_can_enter(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o755)
    with pytest.raises(SocketPathError, match="0755"):
        transport.listen_unix(str(d / "vu.sock"))


def test_listen_refuses_to_replace_a_regular_file(tmp_path):
    d = tmp_path / "priv"
    d.mkdir(mode=0o700)
    (d / "vu.sock").write_text("not a socket")
    with pytest.raises(SocketPathError, match="not a socket"):
        transport.listen_unix(str(d / "vu.sock"))


def test_stale_socket_is_replaced_but_live_one_is_not(tmp_path):
    d = tmp_path / "priv"
    d.mkdir(mode=0o700)
    path = str(d / "vu.sock")
    first = transport.listen_unix(path)
    with pytest.raises(SocketPathError, match="in use"):
        transport.listen_unix(path)
    first.close()                       # the file stays behind, nobody listens
    second = transport.listen_unix(path)
    second.close()


def test_check_peer_accepts_our_uid_and_names_a_foreign_one():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        creds = transport.check_peer(a)
        assert creds.uid == os.geteuid() and creds.pid == os.getpid()
        with pytest.raises(PeerCredentialsError) as info:
            transport.check_peer(a, allowed_uids={os.geteuid() + 1})
        assert info.value.uid == os.geteuid() and str(os.getpid()) in str(info.value)
    finally:
        a.close()
        b.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_check_peer_refuses_a_real_process_of_another_uid():
    nobody = 65534
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o711)               # deliberately open: SO_PEERCRED is the last line
        path = os.path.join(d, "open.sock")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        os.chmod(path, 0o666)
        lsock.listen(1)
        pid = os.fork()
        if pid == 0:                      # child: become nobody, connect, wait for the close
            try:
                os.setgid(nobody)
                os.setuid(nobody)
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.connect(path)
                c.recv(1)
            finally:
                os._exit(0)
        try:
            lsock.settimeout(10)
            conn, _ = lsock.accept()
            with pytest.raises(PeerCredentialsError) as info:
                transport.check_peer(conn)
            assert info.value.uid == nobody and info.value.pid == pid
            conn.close()
        finally:
            lsock.close()
            os.waitpid(pid, 0)


def test_fd_channel_passes_fds_and_closes_an_excess():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ch = transport.FdChannel(b)
    memfd = os.memfd_create("t")
    try:
        socket.send_fds(a, [b"hello"], [memfd])
        data, fds = ch.recv(64)
        assert data == b"hello" and len(fds) == 1
        assert os.path.samestat(os.fstat(fds[0]), os.fstat(memfd))
        transport.close_fds(fds)

        before = _open_fds()
        many = [os.eventfd(0) for _ in range(transport.MAX_FDS_PER_RECV + 4)]
        socket.send_fds(a, [b"x"], many)
        transport.close_fds(many)
        with pytest.raises(TransportError, match="more than"):
            ch.recv(64)
        assert _open_fds() == before
    finally:
        os.close(memfd)
        a.close()
        ch.close()


def test_is_eventfd_tells_eventfds_from_pipes():
    efd = os.eventfd(0)
    r, w = os.pipe()
    try:
        assert transport.is_eventfd(efd)
        assert not transport.is_eventfd(r)
        assert transport.describe_fd(r).startswith("pipe:")
    finally:
        for fd in (efd, r, w):
            os.close(fd)
