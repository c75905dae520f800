"""The back-end offers VIRTIO_F_RING_PACKED: a ring's format follows SET_FEATURES,
SET_VRING_NUM takes a packed ring's sizes, SET_VRING_BASE / GET_VRING_BASE carry
its wrap counters, and the snapshot says which format each ring is."""
from __future__ import annotations

from vhostlab.backend import VhostUserNetDevice, dispatch
from vhostlab.backend.net_device import RING_FEATURES
from vhostlab.backend.snapshot import vring_snapshot
from vhostlab.memory import GuestMemory
from vhostlab.protocol import Feature, Message, Request, U64, VringAddr, VringState
from vhostlab.ring import PackedVirtqueue, Virtqueue
from vhostlab.ring.packed_layout import packed_vring_base, parse_packed_vring_base

SPLIT = int(Feature.VIRTIO_F_VERSION_1 | Feature.VHOST_USER_F_PROTOCOL_FEATURES)
PACKED = SPLIT | int(Feature.VIRTIO_F_RING_PACKED)


def _send(dev, request, payload):
    return dispatch(dev, Message(request, 1, payload, ()))


def _device(features: int) -> VhostUserNetDevice:
    dev = VhostUserNetDevice(ring_features=RING_FEATURES)
    assert _send(dev, Request.SET_FEATURES, U64(features)).error is None
    dev.memory = GuestMemory.allocate(1 << 20, layout="flat")
    return dev


def _addr(dev, index: int) -> VringAddr:
    uva = dev.memory.regions[0].userspace_addr
    return VringAddr(index, 0, uva + 0x1000, uva + 0x8004, uva + 0x8000, 0)


def test_packed_is_offered_and_the_format_follows_the_features():
    dev = VhostUserNetDevice(ring_features=RING_FEATURES)
    try:
        assert dev.offered_features & Feature.VIRTIO_F_RING_PACKED
        assert dev.ring_format == "split"
        assert _send(dev, Request.SET_FEATURES, U64(PACKED)).error is None
        assert dev.ring_format == "packed"
        assert _send(dev, Request.SET_FEATURES, U64(SPLIT)).error is None
        assert dev.ring_format == "split"
    finally:
        dev.release()


def test_queue_sizes_follow_the_format():
    split, packed = _device(SPLIT), _device(PACKED)
    try:
        refused = _send(split, Request.SET_VRING_NUM, VringState(1, 100))
        assert refused.error is not None and "power of 2" in str(refused.error)
        assert _send(packed, Request.SET_VRING_NUM, VringState(1, 100)).error is None
        too_big = _send(packed, Request.SET_VRING_NUM, VringState(1, 40000))
        assert too_big.error is not None and "1 to 32768" in str(too_big.error)
    finally:
        split.release()
        packed.release()


def test_the_vring_base_carries_the_wrap_counters():
    dev = _device(PACKED)
    try:
        base = packed_vring_base(77, 0, 75, 1)
        for request, payload in ((Request.SET_VRING_NUM, VringState(1, 100)),
                                 (Request.SET_VRING_BASE, VringState(1, base)),
                                 (Request.SET_VRING_ADDR, _addr(dev, 1))):
            assert _send(dev, request, payload).error is None, request
        vring = dev.vrings[1]
        assert isinstance(vring.ring, PackedVirtqueue)
        snap = vring_snapshot(dev, vring, True)
        assert snap.ring_format == "packed" and snap.avail_idx is None
        assert (snap.avail_wrap_counter, snap.used_wrap_counter) == (0, 1)
        assert len(snap.descriptors) == 100 and len(snap.descriptors[0]) == 4
        reply = _send(dev, Request.GET_VRING_BASE, VringState(1, 0))
        assert reply.payload.num == base
        assert parse_packed_vring_base(reply.payload.num) == (77, 0, 75, 1)
        # Stopped, the device keeps the position: the same base again.
        assert dev.vrings[1].vring_base == base
        # A base whose positions lie outside the ring is refused, naming them.
        bad = _send(dev, Request.SET_VRING_BASE, VringState(1, packed_vring_base(100, 1, 0, 1)))
        assert bad.error is not None and "last_avail_idx = 100" in str(bad.error)
        # A split ring's base stays 16 bits.
        split = _device(SPLIT)
        try:
            wide = _send(split, Request.SET_VRING_BASE, VringState(1, 0x18000))
            assert wide.error is not None and "u16" in str(wide.error)
        finally:
            split.release()
    finally:
        dev.release()


def test_a_ring_made_before_set_features_is_made_again_in_the_new_format():
    dev = _device(SPLIT)
    try:
        assert _send(dev, Request.SET_VRING_NUM, VringState(1, 64)).error is None
        assert _send(dev, Request.SET_VRING_ADDR, _addr(dev, 1)).error is None
        assert type(dev.vrings[1].ring) is Virtqueue
        assert _send(dev, Request.SET_FEATURES, U64(PACKED)).error is None
        assert type(dev.vrings[1].ring) is PackedVirtqueue
        assert vring_snapshot(dev, dev.vrings[1], False).ring_format == "packed"
    finally:
        dev.release()
