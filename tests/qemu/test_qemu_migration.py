"""Live migration between two real QEMUs, with the qtest driver carried across.

The NICs are plain loopback UDP netdevs here (no vhost), which gives the
baseline the vhost-user migration labs compare against: the rings live in
guest RAM, QEMU migrates them, and the driver continues on the destination.
"""
from __future__ import annotations

import os
import socket

import pytest

from vhostlab.qemu import QemuInstance, TX_QUEUE, VirtioNetGuest

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

        moved = VirtioNetGuest.resume(dst.qtest, guest.export_state())
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
