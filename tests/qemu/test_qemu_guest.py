"""The qtest guest driver against a real QEMU whose NIC is a loopback UDP netdev.

Frames the guest transmits leave QEMU as UDP datagrams to the test's socket;
datagrams the test sends to QEMU's port land in the guest's RX buffers.
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import time

import pytest

from vhostlab.qemu import (
    RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX,
    GuestDriverError, QemuInstance, QTestConnectionError, udp_socket_netdev,
)
from vhostlab.ring.layout import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

pytestmark = pytest.mark.qemu


@pytest.fixture
def peer():
    """The test's end of the wire: a UDP socket on 127.0.0.1."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(10)
    yield s
    s.close()


def _start(requires_qemu, peer, make):
    netdev = make(peer.getsockname()[1])
    q = QemuInstance(netdev, qemu=requires_qemu).start()
    q.peer_addr = netdev.listen_address
    return q


@pytest.fixture
def vm(requires_qemu, peer, datagram_netdev):
    q = _start(requires_qemu, peer, datagram_netdev)
    yield q
    q.close()


def frames_of(n: int, seed: int = 0) -> list[bytes]:
    """Ethernet-sized frames whose bytes differ, so a mix-up shows."""
    out = []
    for i in range(n):
        body = os.urandom(60 + 97 * i % 1400)
        out.append(struct.pack("!6s6sH", b"\x52\x54\x00\xaa\xbb\xcc",
                               b"\x52\x54\x00\x12\x34\x56", 0x88B5) + bytes([seed, i]) + body)
    return out


def receive_n(guest, n: int, timeout: float = 10.0) -> list[bytes]:
    got, end = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < end:
        got += guest.receive(timeout=end - time.monotonic())
    return got


def test_tx_frames_arrive_byte_for_byte(vm, peer):
    guest = vm.guest()
    frames = frames_of(8)
    heads = guest.transmit(frames)
    assert len(heads) == 8
    assert [peer.recv(4096) for _ in frames] == frames
    assert guest.wait_used(TX_QUEUE, 8, timeout=10) == 8
    used = guest.reap_used(TX_QUEUE)
    assert sorted(e.id for e in used) == sorted(heads)
    state = guest.ring_state(TX_QUEUE)
    assert state.avail_idx == state.used_idx == state.last_used_idx == 8
    assert state.free_descriptors == guest.queue_size(TX_QUEUE) and not state.in_flight
    assert list(state.avail_ring[:8]) == heads
    assert int(state.desc[heads[0]]["len"]) == 10 + len(frames[0])


def test_tx_header_in_its_own_descriptor(vm, peer):
    guest = vm.guest()
    frames = frames_of(3, seed=7)
    heads = guest.transmit(frames, split_header=True)
    assert [peer.recv(4096) for _ in frames] == frames
    desc = guest.ring_state(TX_QUEUE).desc
    for h, f in zip(heads, frames):
        assert desc[h]["len"] == 10 and desc[h]["flags"] == VRING_DESC_F_NEXT
        assert desc[desc[h]["next"]]["len"] == len(f)


@pytest.mark.parametrize("interrupts", [True, False], ids=["irq", "no-irq"])
def test_rx_frames_land_in_buffers_byte_for_byte(vm, peer, interrupts):
    guest = vm.guest(interrupts=interrupts)
    posted = guest.post_rx_buffers(16)
    assert len(posted) == 16
    desc = guest.ring_state(RX_QUEUE).desc
    assert all(desc[d]["flags"] == VRING_DESC_F_WRITE for d in posted)
    frames = frames_of(40, seed=1)          # more than posted: buffers are recycled
    for f in frames[:10]:
        peer.sendto(f, vm.peer_addr)
    got = receive_n(guest, 10)
    for f in frames[10:]:
        peer.sendto(f, vm.peer_addr)
    got += receive_n(guest, 30)
    assert got == frames
    state = guest.ring_state(RX_QUEUE)
    assert state.used_idx == 40 == state.last_used_idx
    if interrupts:
        assert guest.stats()["interrupts"] >= 1  # the device called; the driver slept on it


def test_rx_merges_buffers_with_mrg_rxbuf(vm, peer):
    guest = vm.guest(features=1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_MRG_RXBUF)
    assert guest.hdr_len == 12
    guest.post_rx_buffers(64, size=256)
    frames = [f[:1000] for f in frames_of(4, seed=2)]
    frames[0] = frames[0][:100]               # one fits a buffer, the others span several
    for f in frames:
        peer.sendto(f, vm.peer_addr)
    assert receive_n(guest, 4) == frames
    assert guest.ring_state(RX_QUEUE).used_idx > 4   # more buffers than frames were used


def test_tx_with_mrg_rxbuf_and_event_idx(vm, peer):
    feats = 1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_RING_F_EVENT_IDX
    guest = vm.guest(features=feats)
    assert guest.guest_features == feats          # QEMU offers both
    for round_ in range(3):
        frames = frames_of(5, seed=10 + round_)
        guest.transmit(frames)
        assert [peer.recv(4096) for _ in frames] == frames
        guest.wait_used(TX_QUEUE, 5, timeout=10)
    assert len(guest.reap_used(TX_QUEUE)) == 5
    # used_event is written by the driver, avail_event by the device.
    state = guest.ring_state(TX_QUEUE)
    assert state.used_idx == state.last_used_idx == state.used_event == 15
    assert state.avail_event == 15
    assert guest.stats()["queue1"]["notifications"] >= 1


def test_old_socket_udp_netdev_works_too(requires_qemu, peer):
    q = _start(requires_qemu, peer, make=udp_socket_netdev)
    try:
        guest = q.guest()
        frames = frames_of(2)
        guest.transmit(frames)
        assert [peer.recv(4096) for _ in frames] == frames
    finally:
        q.close()


def test_oversized_frame_and_full_ring_are_named_errors(vm):
    guest = vm.guest()
    with pytest.raises(GuestDriverError, match="frame 1 is 3000 bytes"):
        guest.transmit([b"x" * 60, b"y" * 3000])
    guest.post_rx_buffers()                        # every RX descriptor is now posted
    with pytest.raises(GuestDriverError, match="needs 1 descriptors, 0 free"):
        guest.post_rx_buffers(1)
    with pytest.raises(GuestDriverError, match="size 100 outside 1524"):
        vm.guest().post_rx_buffers(1, size=100)    # no MRG_RXBUF: a buffer holds a frame


def test_unsupported_features_are_refused(vm):
    with pytest.raises(ValueError, match="not implemented"):
        vm.guest(features=1 << 0)                  # VIRTIO_NET_F_CSUM: an offload


def test_qemu_killed_under_the_driver_is_a_named_error(vm):
    guest = vm.guest()
    os.kill(vm.pid, signal.SIGKILL)
    with pytest.raises(QTestConnectionError) as err:
        guest.transmit([b"z" * 60])
    e = err.value
    assert e.exit_code == -signal.SIGKILL
    assert "SIGKILL" in str(e) and "qtest" in str(e)
    with pytest.raises(QTestConnectionError):     # and stays failed, without hanging
        guest.status()
