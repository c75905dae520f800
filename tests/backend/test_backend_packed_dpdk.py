"""DPDK's virtio-user with packed virtqueues (``packed_vq=1``) against this back-end:
the device negotiates VIRTIO_F_RING_PACKED, its rings are packed, and frames
flow, counted on both sides."""
from __future__ import annotations

import time

from test_backend_dpdk import N_FRAMES, frame, testpmd_io  # noqa: F401 (a fixture)
from test_backend_protocol import wait_until
from vhostlab.backend import BackendServer, bench_dpdk, read_pcap
from vhostlab.protocol import Feature
from vhostlab.ring.packed_layout import parse_packed_vring_base


def _started(srv) -> bool:
    return all(v.started and v.enabled for v in srv.snapshot(trace=False).vrings)


def _log(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def test_dpdk_packed_txonly_into_the_backend(testpmd_io, tmp_path):
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    with BackendServer(str(d / "vu.sock"), wire="sink") as srv:
        proc, log = testpmd_io(srv.socket_path, packed=True, forward="txonly")
        assert wait_until(lambda: _started(srv) or proc.poll() is not None, 90), _log(log)[-3000:]
        assert wait_until(lambda: srv.snapshot(trace=False).counters["guest_tx_frames"]
                          > 10000 or proc.poll() is not None, 60), _log(log)[-3000:]
        assert proc.poll() is None, _log(log)[-3000:]
        running = srv.snapshot(trace=False)
        bench_dpdk.stop(proc)              # SIGINT: testpmd prints its totals
        totals = bench_dpdk.forward_totals(_log(log))
        assert wait_until(lambda: not srv.connected, 30)
        snap = srv.snapshot()
    assert running.features & Feature.VIRTIO_F_RING_PACKED
    assert [v.ring_format for v in running.vrings] == ["packed", "packed"]
    assert all(v.avail_wrap_counter in (0, 1) for v in running.vrings)
    c = snap.counters
    assert c["errors"] == () and c["dropped"] == 0, c
    # Every frame testpmd sent, the back-end took: the counts agree exactly.
    assert 0 < totals["TX-packets"] == c["guest_tx_frames"], (totals, c)
    # testpmd's port stop asks for each ring's base: a packed base, its used
    # position where its avail position is (every chain taken was returned).
    replies = {r.fields["payload"]["index"]: parse_packed_vring_base(r.fields["payload"]["num"])
               for r in snap.trace if r.request == "GET_VRING_BASE" and r.fields["reply"]}
    assert replies[0] == (0, 1, 0, 1)          # RX: untouched, both wrap counters at 1
    tx = replies[1]
    assert (tx.last_used_idx, tx.used_wrap_counter) == (tx.last_avail_idx,
                                                        tx.avail_wrap_counter)
    # virtio-user's txonly frames take one descriptor each (the header pushed in
    # front of the frame): the position is the frame count around the ring, and
    # the wrap counter flipped once per lap from 1.
    frames = c["guest_tx_frames"]
    assert (tx.last_avail_idx, tx.avail_wrap_counter) == (frames % 256,
                                                          1 ^ (frames // 256) & 1)


def test_dpdk_packed_forwards_frames_both_ways(testpmd_io, tmp_path):
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    pcap = tmp_path / "wire.pcap"
    with BackendServer(str(d / "vu.sock"), wire=f"pcap:{pcap}") as srv:
        proc, log = testpmd_io(srv.socket_path, packed=True)
        assert wait_until(lambda: _started(srv) or proc.poll() is not None, 90), _log(log)[-3000:]
        assert proc.poll() is None, _log(log)[-3000:]
        assert wait_until(lambda: "Port statistics" in _log(log), 60)
        sent = [frame(i, 64 + (i * 37) % 1400) for i in range(N_FRAMES)]
        for k in range(0, N_FRAMES, 50):   # RX -> testpmd io forwarding -> TX
            srv.inject(sent[k:k + 50])
            # One batch at a time: a loaded machine may leave testpmd's RX ring
            # short of buffers, and a frame dropped there never comes back.
            wait_until(lambda: srv.snapshot(trace=False).counters["guest_rx_frames"]
                       >= min(k + 50, N_FRAMES), 30)
        done = wait_until(lambda: srv.snapshot(trace=False).counters["guest_tx_frames"]
                          >= N_FRAMES, 60)
        assert done, (dict(srv.snapshot(trace=False).counters), _log(log)[-2000:])
        time.sleep(0.5)                    # nothing more may come back
        snap = srv.snapshot()
        bench_dpdk.stop(proc)
        totals = bench_dpdk.forward_totals(_log(log))
    assert [v.ring_format for v in snap.vrings] == ["packed", "packed"]
    c = snap.counters
    assert c["guest_rx_frames"] == c["guest_tx_frames"] == N_FRAMES and c["dropped"] == 0, c
    assert c["guest_rx_bytes"] == c["guest_tx_bytes"] == sum(map(len, sent))
    assert totals["RX-packets"] == N_FRAMES and totals["TX-packets"] == N_FRAMES, totals
    assert read_pcap(str(pcap)) == sent    # byte for byte, in order
    assert c["errors"] == ()
