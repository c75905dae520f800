"""DPDK's virtio-user front-end (dpdk-testpmd) against this back-end: frames both ways,
counted on both sides."""
from __future__ import annotations

import os
import signal
import struct
import time

import pytest

from test_backend_protocol import wait_until
from vhostlab.backend import BackendServer, read_pcap
from vhostlab.backend import bench_dpdk

N_FRAMES = 300


def frame(i: int, size: int) -> bytes:
    # Unicast to the port's MAC-agnostic testpmd (io mode forwards anything).
    dst, src = bytes.fromhex("020000000002"), bytes.fromhex("020000000001")
    body = struct.pack("!I", i) + bytes([i % 256]) * (size - 18)
    return dst + src + b"\x88\xb5" + body


@pytest.fixture
def testpmd_io(requires_dpdk, tmp_path):
    """Start testpmd (virtio-user, io forwarding, loop topology) on a back-end socket."""
    procs = []

    def start(sock: str, packed: bool = False, forward: str = "io") -> tuple:
        log = str(tmp_path / f"testpmd{len(procs)}.log")
        cmd = bench_dpdk.virtio_user_cmd(requires_dpdk, sock, f"vhostlabt{os.getpid()}",
                                         forward=forward, extra=("--port-topology=loop",),
                                         packed=packed)
        proc = bench_dpdk.start(cmd, log)
        procs.append(proc)
        return proc, log
    yield start
    for proc in procs:                     # never leave testpmd behind, pass or fail
        bench_dpdk.stop(proc, signal.SIGKILL)


def test_dpdk_virtio_user_forwards_frames_both_ways(testpmd_io, tmp_path):
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    pcap = tmp_path / "wire.pcap"
    with BackendServer(str(d / "vu.sock"), wire=f"pcap:{pcap}") as srv:
        proc, log = testpmd_io(srv.socket_path)
        ready = lambda: all(v.started and v.enabled for v in srv.snapshot(trace=False).vrings)
        assert wait_until(lambda: ready() or proc.poll() is not None, 90), open(log).read()[-3000:]
        assert proc.poll() is None, open(log).read()[-3000:]
        # testpmd flushes its RX queues when forwarding starts: wait for its first
        # periodic statistics, printed once forwarding runs.
        assert wait_until(lambda: "Port statistics" in open(log).read(), 60)
        sent = [frame(i, 64 + (i * 37) % 1400) for i in range(N_FRAMES)]
        for k in range(0, N_FRAMES, 50):   # RX -> testpmd io forwarding -> TX
            srv.inject(sent[k:k + 50])
            time.sleep(0.02)
        done = wait_until(lambda: srv.snapshot(trace=False).counters["guest_tx_frames"]
                          >= N_FRAMES, 30)
        assert done, (srv.snapshot(trace=False), open(log).read()[-2000:])
        time.sleep(0.5)                    # nothing more may come back
        snap = srv.snapshot()
        bench_dpdk.stop(proc)              # SIGINT: testpmd prints its totals
        totals = bench_dpdk.forward_totals(open(log).read())
    c = snap.counters
    assert c["guest_rx_frames"] == N_FRAMES and c["dropped"] == 0, c
    assert c["guest_tx_frames"] == N_FRAMES
    assert c["guest_rx_bytes"] == c["guest_tx_bytes"] == sum(map(len, sent))
    assert totals["RX-packets"] == N_FRAMES and totals["TX-packets"] == N_FRAMES, totals
    assert read_pcap(str(pcap)) == sent    # byte for byte, in order
    assert c["errors"] == ()
    names = set(c["messages"])
    assert {"SET_MEM_TABLE", "SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ENABLE"} <= names
