"""The recording relay between a front-end and a back-end: traffic passes
unchanged, fds included, and every message lands in the trace as a vhostlab
back-end would have recorded it."""
from __future__ import annotations

import os
import struct
import time

import pytest

from vhostlab.backend import BackendServer
from vhostlab.backend.dpdk import DpdkVhostBackend
from vhostlab.backend.relay import VhostUserRelay, _Framer
from vhostlab.frontend import VhostDev, VhostOps, BuiltinVirtioNetGuest, make_frame
from vhostlab.frontend.frames import TX
from vhostlab.protocol import TO_BACKEND, TO_FRONTEND


def _requests(trace, direction):
    return [r.request for r in trace.records() if r.direction == direction and not r.error]


def _drive(sock: str, guest, n: int = 8) -> dict:
    ops = VhostOps.connect(sock)
    dev = VhostDev(ops)
    dev.vhost_dev_init()
    dev.vhost_net_start(guest)
    guest.post_rx_buffers()
    dev.vhost_log_global_start()
    guest.transmit([make_frame(TX, i, 100) for i in range(n)])
    time.sleep(0.5)
    bases = dev.vhost_dev_stop(guest)
    dev.vhost_dev_cleanup()
    return bases


def test_relay_to_our_back_end_records_what_the_back_end_records(tmp_path):
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    open_fds = len(os.listdir("/proc/self/fd"))
    guest = BuiltinVirtioNetGuest()
    try:
        with BackendServer(str(d / "be.sock")) as srv, \
                VhostUserRelay(str(d / "relay.sock"), srv.socket_path) as relay:
            bases = _drive(relay.listen_path, guest)
            time.sleep(0.2)
            theirs = srv.snapshot().trace
        assert bases == {0: 0, 1: 8}
        mine_in = _requests(relay.trace, TO_BACKEND)
        assert mine_in == [r.request for r in theirs if r.direction == TO_BACKEND]
        assert "SET_MEM_TABLE" in mine_in and "SET_LOG_BASE" in mine_in
        # fds went through: the back-end mapped the memory and the log
        fds = {r.request: r.nfds for r in relay.trace.records() if r.direction == TO_BACKEND}
        assert fds["SET_MEM_TABLE"] == len(guest.memory.regions)   # one fd a region
        assert fds["SET_LOG_BASE"] == 1
        assert fds["SET_VRING_KICK"] == 1
        replies = _requests(relay.trace, TO_FRONTEND)
        assert replies.count("GET_VRING_BASE") == 2
    finally:
        guest.close()
    assert len(os.listdir("/proc/self/fd")) == open_fds      # the relay kept no fd


def test_relay_to_dpdk(requires_dpdk, tmp_path):
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    guest = BuiltinVirtioNetGuest()
    try:
        with DpdkVhostBackend(str(d / "dpdk.sock"), testpmd=requires_dpdk) as dpdk, \
                VhostUserRelay(str(d / "relay.sock"), dpdk.socket_path) as relay:
            bases = _drive(relay.listen_path, guest)
        assert bases == {0: 8, 1: 8}          # testpmd io-forwarded all 8 back
        reqs = _requests(relay.trace, TO_BACKEND)
        assert reqs[:2] == ["GET_FEATURES", "GET_PROTOCOL_FEATURES"]
        assert {"SET_MEM_TABLE", "SET_LOG_BASE", "SET_VRING_KICK"} <= set(reqs)
        assert not [r for r in relay.trace.records() if r.error]
    finally:
        guest.close()


def test_a_rewritten_message_is_recorded_as_passed_on_and_as_sent(tmp_path):
    """strip_log_all: our back-end gets SET_FEATURES without VHOST_F_LOG_ALL; the
    trace keeps both, and the narration line says what the relay took out."""
    from vhostlab.backend.relay import strip_log_all
    from vhostlab.protocol import Feature, format_record
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    guest = BuiltinVirtioNetGuest()
    try:
        with BackendServer(str(d / "be.sock")) as srv, \
                VhostUserRelay(str(d / "relay.sock"), srv.socket_path,
                               rewrite=strip_log_all) as relay:
            _drive(relay.listen_path, guest)
            time.sleep(0.2)
            snap = srv.snapshot()
        log_all = int(Feature.VHOST_F_LOG_ALL)
        got = [r.fields["payload"]["value"] for r in snap.trace
               if r.request == "SET_FEATURES" and r.direction == TO_BACKEND]
        assert got and not any(v & log_all for v in got)     # the back-end never saw it
        rewritten = [r for r in relay.trace.records() if "rewritten_from" in r.fields]
        assert [r.request for r in rewritten] == ["SET_FEATURES"]
        r = rewritten[0]
        assert r.fields["rewritten_from"]["value"] == r.fields["payload"]["value"] | log_all
        assert format_record(r).endswith("[the relay took VHOST_F_LOG_ALL out on the way]")
        plain = [r for r in relay.trace.records() if r.request == "SET_FEATURES"
                 and "rewritten_from" not in r.fields and r.direction == TO_BACKEND]
        assert plain and "the relay" not in format_record(plain[0])   # before logging
    finally:
        guest.close()


def _msg(request: int, size: int) -> bytes:
    return struct.pack("<III", request, 1, size) + bytes(size)


def test_framer_gives_fds_to_the_message_that_starts_in_their_chunk():
    f = _Framer()
    a, b = _msg(1, 8), _msg(5, 40)            # SET_FEATURES, SET_MEM_TABLE-sized
    # a's tail and b's head in one chunk with one fd: the fd is b's
    assert f.feed(a[:5], []) == []
    out = f.feed(a[5:] + b[:20], [7])
    assert out == [(a, [])]
    assert f.feed(b[20:], []) == [(b, [7])]
    # a chunk that only continues a message gives its fds to that message
    out = f.feed(b[:10], []) + f.feed(b[10:], [8, 9])
    assert out == [(b, [8, 9])]


def test_relay_survives_a_back_end_that_refuses(tmp_path):
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    with VhostUserRelay(str(d / "relay.sock"), str(d / "nobody.sock")) as relay:
        with pytest.raises(Exception):
            VhostOps.connect(relay.listen_path, timeout=2).vhost_get_features()
        time.sleep(0.2)
        assert any(r.error and "refused" in r.error for r in relay.trace.records())
    assert not os.path.exists(str(d / "relay.sock"))
