"""DPDK's vhost back-end (testpmd, net_vhost0) driven by the built-in front-end:
the labs' third peer. Frames go out, come back (testpmd io forwarding), and are checked
byte for byte; DPDK marks the log; GET_VRING_BASE says how far it got."""
from __future__ import annotations

import os
import time

import pytest

from vhostlab import VhostlabError
from vhostlab.backend.dpdk import DpdkError, DpdkVhostBackend, dpdk_usable
from vhostlab.frontend import VhostDev, VhostOps, BuiltinVirtioNetGuest, make_frame
from vhostlab.frontend.frames import TX

N = 32


def _receive(guest, n: int, timeout: float = 20.0) -> list[bytes]:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        guest.wait_call(0, 0.5)
        got += guest.receive()
    return got


def test_builtin_front_end_against_dpdk(requires_dpdk, tmp_path):
    sock = str(tmp_path / "dpdk.sock")
    guest = BuiltinVirtioNetGuest()
    try:
        with DpdkVhostBackend(sock, testpmd=requires_dpdk) as dpdk:
            pid = dpdk.pid
            # every testpmd thread runs SCHED_IDLE: it never takes a CPU from QEMU
            assert os.sched_getscheduler(pid) == os.SCHED_IDLE
            ops = VhostOps.connect(sock)
            dev = VhostDev(ops)
            dev.vhost_dev_init()
            dev.vhost_net_start(guest)
            assert dpdk.wait_forwarding(60), dpdk.output()[-2000:]
            guest.post_rx_buffers()
            dev.vhost_log_global_start()
            sent = [make_frame(TX, i, 60 + 41 * i) for i in range(N)]
            assert guest.transmit(sent) == N
            got = _receive(guest, N)
            assert got == sent                             # byte for byte, in order
            pages = dev.vhost_log_sync()
            assert len(pages) > 0                          # DPDK logged its RX writes
            bases = dev.vhost_dev_stop(guest)
            assert bases == {0: N, 1: N}
            dev.vhost_dev_cleanup()
        assert dpdk.totals is not None
        assert (dpdk.totals.rx_packets, dpdk.totals.tx_packets) == (N, N)
        with pytest.raises(ProcessLookupError):             # nothing left behind
            os.kill(pid, 0)
        assert not os.path.exists(sock)
    finally:
        guest.close()


def test_testpmd_is_stopped_when_the_block_fails(requires_dpdk, tmp_path):
    sock = str(tmp_path / "dpdk.sock")
    with pytest.raises(RuntimeError, match="the cell failed"):
        with DpdkVhostBackend(sock, testpmd=requires_dpdk, forward="rxonly") as dpdk:
            pid = dpdk.pid
            raise RuntimeError("the cell failed")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_unknown_forward_mode_is_a_named_error(tmp_path):
    with pytest.raises(DpdkError) as info:
        DpdkVhostBackend(str(tmp_path / "s"), forward="flowgen", testpmd="/bin/true")
    err = info.value
    assert isinstance(err, VhostlabError)
    assert (err.field, err.value) == ("forward", "flowgen")
    assert "macswap" in str(err)


def test_a_testpmd_that_exits_is_reported_with_its_output(tmp_path):
    script = tmp_path / "fake-testpmd"
    script.write_text("#!/bin/sh\necho 'EAL: Error - exiting with code: 1'\nexit 1\n")
    script.chmod(0o755)
    with pytest.raises(DpdkError, match="EAL: Error"):
        DpdkVhostBackend(str(tmp_path / "s"), testpmd=str(script))


def test_dpdk_usable_probe(requires_dpdk):
    ok, why = dpdk_usable(probe=True)
    assert ok, why
