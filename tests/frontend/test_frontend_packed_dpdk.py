"""Packed rings against a real back-end that offers them: DPDK's vhost back-end
(testpmd, net_vhost0, io forwarding on one looped port). Frames go out and come
back byte for byte over several laps of a small ring, DPDK logs the descriptors
it writes back, GET_VRING_BASE carries the wrap counter, and a built-in migration
with packed rings loses no frame (and its negative control ends corrupted)."""
from __future__ import annotations

import json
import time

import pytest

from test_cli import vhostlab
from vhostlab.backend.dpdk import DpdkVhostBackend
from vhostlab.frontend import BuiltinVirtioNetGuest, VhostDev, VhostOps, make_frame
from vhostlab.frontend.frames import TX
from vhostlab.frontend.guest import RING_GPA, RX_QUEUE, TX_QUEUE
from vhostlab.frontend.migration import BuiltinMigration
from vhostlab.protocol import Feature
from vhostlab.ring.packed_layout import parse_packed_vring_base

PAGE = 4096


def _echo(guest, frames, timeout: float = 20.0) -> list[bytes]:
    """Transmit ``frames``; read back as many from RX, reposting buffers as they come."""
    assert guest.transmit(frames) == len(frames)
    got, deadline = [], time.monotonic() + timeout
    while len(got) < len(frames) and time.monotonic() < deadline:
        guest.wait_call(RX_QUEUE, 0.5)
        got += guest.receive()
        guest.post_rx_buffers()
    return got


@pytest.mark.parametrize("queue_size", [16, 256])
def test_packed_frames_come_back_byte_for_byte_over_several_laps(requires_dpdk, tmp_path,
                                                                 queue_size):
    sock = str(tmp_path / "dpdk.sock")
    guest = BuiltinVirtioNetGuest(ring="packed", queue_size=queue_size)
    n, batch = 56, 8                               # 3.5 laps of a 16-entry ring
    try:
        with DpdkVhostBackend(sock, testpmd=requires_dpdk) as dpdk:
            dev = VhostDev(VhostOps.connect(sock))
            dev.vhost_dev_init()
            assert dev.features & Feature.VIRTIO_F_RING_PACKED     # DPDK offers packed rings
            assert guest.negotiate(dev.features) & Feature.VIRTIO_F_RING_PACKED
            dev.vhost_net_start(guest)
            assert dpdk.wait_forwarding(60), dpdk.output()[-2000:]
            guest.post_rx_buffers()
            dev.vhost_log_global_start()
            sent, got = [], []
            for k in range(0, n, batch):
                frames = [make_frame(TX, i, 60 + (97 * i) % 1400) for i in range(k, k + batch)]
                sent += frames
                got += _echo(guest, frames)
            assert got == sent                                    # byte for byte, in order
            logged = set(dev.vhost_log_sync().tolist())
            # DPDK logs the used descriptors it wrote at log_guest_addr + their offset:
            # with the descriptor ring's GPA there, the ring's own pages
            assert {RING_GPA[RX_QUEUE] // PAGE, RING_GPA[TX_QUEUE] // PAGE} <= logged
            bases = dev.vhost_dev_stop(guest)
            for q in (RX_QUEUE, TX_QUEUE):
                base = parse_packed_vring_base(bases[q])
                assert base.last_avail_idx == n % queue_size
                assert base.avail_wrap_counter == (n // queue_size + 1) % 2   # flips per lap
            dev.vhost_dev_cleanup()
        assert (dpdk.totals.rx_packets, dpdk.totals.tx_packets) == (n, n)
        # the device returned every TX buffer: the last batch is reaped, nothing stays in flight
        assert len(guest.reap(TX_QUEUE)) == batch
        assert guest.queues[TX_QUEUE].driver.in_flight == 0
    finally:
        guest.close()


def test_packed_migration_against_dpdk_loses_no_frame(requires_dpdk):
    m = BuiltinMigration(backend="dpdk", ring="packed")
    summary = m.run()
    assert summary["ring"] == "packed" and summary["integrity"] == "ok", summary["problems"]
    frames = summary["frames"]
    assert frames["sent"] > 0 and frames["delivered"] == frames["sent"]
    assert frames["lost"] == frames["corrupted"] == frames["duplicated"] == 0
    assert summary["migration"]["pages_mismatched"] == 0
    assert summary["vhost_log"]["pages_logged"] > 0
    # DPDK fills bits 0-15: last_avail_idx with the avail wrap counter in bit 15
    for base in summary["vring_base"]:
        assert base["num"] >> 16 == 0 and base["avail_wrap_counter"] == base["num"] >> 15
        assert base["last_avail_idx"] == base["num"] & 0x7FFF > 0
    # The relay's observers copied the packed rings as GET_VRING_BASE's answer
    # and SET_VRING_KICK passed: DPDK's 16-bit base puts used where avail is.
    src, dst = m.switchover.taken("source"), m.switchover.taken("destination")
    assert [r.index for r in src] == [r.index for r in dst] == [0, 1]
    for s, d in zip(src, dst):
        assert s.ring_format == d.ring_format == "packed" and s.device == d.device
        assert s.device[:2] == s.device[2:] and (s.desc == d.desc).all()


def test_packed_migration_ignoring_dpdks_log_ends_corrupted(requires_dpdk):
    summary = BuiltinMigration(backend="dpdk", ring="packed", break_logging=True,
                               wait_timeout=3.0).run()
    assert summary["integrity"] == "corrupted"
    assert summary["frames"]["lost"] + summary["frames"]["corrupted"] > 0
    assert summary["migration"]["pages_mismatched"] > 0


def _demo_json(*args: str) -> tuple[dict, str, int]:
    out = vhostlab("demo", "--json", *args)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got {out.stdout!r}\n{out.stderr}"
    return json.loads(lines[0]), out.stderr, out.returncode


def test_demo_packed_against_dpdk(requires_dpdk):
    summary, narration, code = _demo_json("--frontend", "builtin", "--ring", "packed",
                                          "--backend", "dpdk")
    assert code == 0, summary
    assert summary["ring"] == "packed" and summary["integrity"] == "ok"
    assert "vhost_get_vring_base" in summary["ops_called"]
    out = vhostlab("demo", "--frontend", "builtin", "--ring", "packed", "--backend", "dpdk")
    assert out.returncode == 0
    # GET_VRING_BASE's num decoded, with the wrap counter
    assert "GET_VRING_BASE num=0x80" in out.stdout and "wrap=1" in out.stdout
    assert "VIRTIO_F_RING_PACKED" in out.stdout


def test_demo_packed_against_dpdk_with_broken_logging_exits_3(requires_dpdk):
    summary, _, code = _demo_json("--frontend", "builtin", "--ring", "packed",
                                  "--backend", "dpdk", "--break-logging")
    assert code == 3 and summary["integrity"] == "corrupted" and summary["ring"] == "packed"
