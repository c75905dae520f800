"""Live migration between two real QEMUs, with the qtest driver carried across.

The NICs are plain loopback UDP netdevs here (no vhost), which gives the
baseline the vhost-user migration labs compare against: the rings live in
guest RAM, QEMU migrates them, and the driver continues on the destination.
"""
from __future__ import annotations

import os
import socket

import pytest

from vhostlab.qemu import QemuInstance, QTestVirtioNetGuest, TX_QUEUE

pytestmark = pytest.mark.qemu

RARP = b"\x80\x35"  # ethertype of the self-announcement QEMU sends after migration


@pytest.fixture
def peers():
    socks = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(10)
        socks.append(s)
    yield socks
    for s in socks:
        s.close()


def test_guest_driver_continues_on_the_destination(requires_qemu, peers, datagram_netdev):
    src_peer, dst_peer = peers
    src_net, dst_net = (datagram_netdev(p.getsockname()[1]) for p in peers)
    with QemuInstance(src_net, qemu=requires_qemu, name="source") as src, \
            QemuInstance(dst_net, qemu=requires_qemu, name="destination", incoming=True) as dst:
        assert dst.qmp.query_status()["status"] == "inmigrate"
        guest = src.guest()
        guest.post_rx_buffers(8)
        before = [os.urandom(80) for _ in range(3)]
        guest.transmit(before)
        assert [src_peer.recv(4096) for _ in before] == before
        guest.wait_used(TX_QUEUE, 3, timeout=10)

        src.qmp.migrate_set_capabilities(events=True)
        src.qmp.migrate(dst.migration_uri)
        src.qmp.wait_event("MIGRATION", timeout=30, status="completed")
        dst.qmp.wait_event("RESUME", timeout=30)
        assert src.qmp.query_migrate()["status"] == "completed"
        assert src.qmp.query_status()["status"] == "postmigrate"

        moved = QTestVirtioNetGuest.resume(dst.qtest, guest.export_state())
        ring = moved.ring_state(TX_QUEUE)
        assert ring.used_idx == ring.avail_idx == 3     # the ring came over in guest RAM
        after = [os.urandom(90) for _ in range(4)]
        moved.transmit(after)
        data, announces = [], []
        while len(data) < len(after):
            frame = dst_peer.recv(4096)
            (announces if frame[12:14] == RARP else data).append(frame)
        assert data == after
        # The destination announces the guest's MAC with RARP (qemu_announce_self):
        # with vhost-user that is what SEND_RARP asks a back-end to do.
        assert all(f[6:12] == bytes.fromhex("525400123456") for f in announces)
        dst_peer.sendto(b"back" * 20, dst_net.listen_address)
        assert moved.receive(timeout=10) == [b"back" * 20]


# -- vhost-user: a final sync that finds nothing ----------------------------------------
def _vhost_migration(qemu: str, skip: bool):
    from vhostlab.qemu.migration import MigrationConfig, QemuMigration
    # rx_at_stop puts frames in the window between QEMU's last bitmap sync and the
    # stop, which the paced traffic leaves empty: only the final sync covers them.
    config = MigrationConfig(ram_size=128 << 20, rx_at_stop=8, skip_final_sync=skip, qemu=qemu)
    mig = QemuMigration(config, keep=True)
    try:
        result = mig.run()
        return result, mig.dirty_rounds[-1], mig.stop_window
    finally:
        mig.close()


def test_skipping_the_final_sync_corrupts_what_only_it_would_report(requires_qemu):
    ok, ok_final, ok_window = _vhost_migration(requires_qemu, skip=False)
    assert ok.status == "completed" and ok.integrity == "ok", ok.notes
    assert ok_window.delivered > 0 and ok_final.final_sync and ok_final.log_pages.size > 0
    assert not ok_final.mismatched

    bad, bad_final, bad_window = _vhost_migration(requires_qemu, skip=True)
    assert bad.status == "completed" and bad.integrity == "corrupted"
    assert bad.summary()["skip_final_sync"] is True
    assert bad_final.log_pages.size == 0 and bad_window.discarded    # the sync found nothing
    bad_pages = {m.page for m in bad_final.mismatched}
    assert bad_pages and bad_pages <= bad_window.discarded     # exactly marks it threw away
    assert any(m.frames for m in bad_final.mismatched)         # RX frames lived there


def test_a_switch_over_in_the_middle_of_the_bursts_loses_nothing(requires_qemu):
    # QEMU may converge while the guest is still busy (a stalled guest, a QEMU that
    # sends a zero page for free): here it does by design, bursts back to back and
    # no bandwidth limit. The guest stops acting when the VM stops, as a vCPU does;
    # RX frames that reach the source back-end after its ring stopped are withdrawn
    # (never in the guest), and every frame the guest had is on the destination.
    from vhostlab.qemu.migration import MigrationConfig, QemuMigration
    config = MigrationConfig(qemu=requires_qemu, max_bandwidth=1 << 30, downtime_limit=300,
                             busy_syncs=1000, working_set=1 << 16, dirty_rate=1,
                             burst_interval=0.0, rx_at_stop=8)
    result = QemuMigration(config).run()
    summary = result.summary()
    assert result.error is None and result.status == "completed", result.error
    assert summary["integrity"] == "ok", (summary["frames"], summary.get("rx_check"),
                                          result.notes)
    assert summary["frames"]["lost"] == summary["frames"]["duplicated"] == 0
    check = summary["rx_check"]
    assert check["expected"] == check["found"] == check["intact"] > 0
