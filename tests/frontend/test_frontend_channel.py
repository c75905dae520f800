"""The front-end's socket I/O: replies in pieces, fds on the wire, a silent or vanished peer.

The peer here is the protocol layer's own BackendConnection on the other end
of a real socketpair, answering byte by byte where the test says so.
"""
from __future__ import annotations

import os
import socket
import threading

import pytest

from vhostlab.frontend import BackendDisconnected, BackendTimeout, VhostOps, VhostUserChannel
from vhostlab.protocol import BackendConnection, Message, Request, VringState
from vhostlab.protocol import TO_BACKEND, TO_FRONTEND


def _peer(sock, replies, chunk=1):
    """Answer each request with ``replies[request]`` (a payload), ``chunk`` bytes at a time."""
    conn = BackendConnection()
    seen = []
    while True:
        data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(8 * 4))
        if not data:
            return seen
        fds = [fd for _, _, p in anc for fd in memoryview(p).cast("i")]
        for msg in conn.receive_data(data, fds):
            seen.append((msg.request, len(msg.fds)))
            for fd in msg.fds:
                os.close(fd)
            if msg.request in replies:
                out = conn.reply(msg, replies[msg.request])
                for i in range(0, len(out), chunk):
                    sock.sendall(out[i:i + chunk])


def test_reply_arriving_byte_by_byte_and_fds_sent():
    a, b = socket.socketpair()
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("seen", _peer(b, {
        Request.GET_VRING_BASE: VringState(1, 77)})))
    t.start()
    ops = VhostOps(VhostUserChannel.from_fd(a.detach(), timeout=5.0))
    assert ops.vhost_get_vring_base(1) == 77
    efd = os.eventfd(0)
    try:
        ops.vhost_set_vring_kick(0, efd)
    finally:
        os.close(efd)
    ops.vhost_backend_cleanup()
    t.join(5)
    b.close()
    assert result["seen"] == [(Request.GET_VRING_BASE, 0), (Request.SET_VRING_KICK, 1)]
    trace = ops.trace.records()
    assert [(r.direction, r.request) for r in trace] == [
        (TO_BACKEND, "GET_VRING_BASE"), (TO_FRONTEND, "GET_VRING_BASE"),
        (TO_BACKEND, "SET_VRING_KICK")]
    assert trace[1].raw == Message.make_reply(Request.GET_VRING_BASE,
                                              VringState(1, 77)).to_bytes()


def test_silent_backend_gives_a_named_timeout():
    a, b = socket.socketpair()
    try:
        ops = VhostOps(VhostUserChannel(a, timeout=0.2))
        with pytest.raises(BackendTimeout, match="GET_FEATURES"):
            ops.vhost_get_features()
    finally:
        a.close()
        b.close()


def test_backend_that_hangs_up_gives_a_named_error():
    a, b = socket.socketpair()
    b.close()
    ops = VhostOps(VhostUserChannel(a, timeout=2.0))
    with pytest.raises(BackendDisconnected, match="GET_QUEUE_NUM|GET_FEATURES"):
        ops.vhost_get_features()
    a.close()
