"""The ring seam (vhostlab.ring.format): what a back-end calls on a ring, whatever its format."""
from __future__ import annotations

import pytest

from vhostlab.ring import (RING_FORMATS, DeviceRing, RingConfigError, RingState, Virtqueue,
                           make_ring, ring_format, vring_avail_size, vring_desc_size,
                           vring_used_size)


def test_the_split_ring_is_a_device_ring():
    ring = make_ring("split", 1, "tx")
    assert isinstance(ring, Virtqueue) and isinstance(ring, DeviceRing)
    assert ring_format("split").area_sizes(256) == (
        vring_desc_size(256), vring_avail_size(256), vring_used_size(256))


def test_an_unknown_format_is_refused_with_the_known_ones():
    with pytest.raises(RingConfigError) as info:
        make_ring("ring-of-bells", 3)
    assert info.value.field == "format" and info.value.value == "ring-of-bells"
    assert info.value.limit == sorted(RING_FORMATS)


def test_the_back_end_makes_its_rings_in_its_format(monkeypatch):
    """A second format is a class registered in RING_FORMATS: the back-end takes it as is."""
    from vhostlab.backend import VhostUserNetDevice
    from vhostlab.backend.rings import _map
    from vhostlab.memory import GuestMemory
    from vhostlab.protocol import VringAddr

    class Sibling(Virtqueue):
        pass

    monkeypatch.setitem(RING_FORMATS, "sibling", Sibling)
    dev = VhostUserNetDevice(ring_format="sibling")
    dev.memory = GuestMemory.allocate(1 << 20, layout="flat")
    uva = dev.memory.regions[0].userspace_addr
    vring = dev.vrings[1]
    vring.num = 8
    try:
        _map(dev, vring, VringAddr(1, 0, uva + 0x1000, uva + 0x3000, uva + 0x2000, 0))
        assert type(vring.ring) is Sibling and vring.ring.num == 8
    finally:
        dev.release()


def test_ring_states_follow_the_spec():
    s = RingState.STOPPED
    assert not s.started and not s.enabled
    assert s.enable(True) is RingState.STOPPED_ENABLED          # tracked while stopped
    assert s.enable(True).start() is RingState.STARTED_ENABLED
    assert s.start() is RingState.STARTED_DISABLED
    assert RingState.STARTED_ENABLED.stop() is RingState.STOPPED_ENABLED
    for change in (RingState.start, RingState.stop, lambda r: r.enable(True)):
        assert change(RingState.BROKEN) is RingState.BROKEN
    assert str(RingState.STARTED_DISABLED) == "started but disabled"
