"""A packed ring served by the device over many bursts: chains wrap past the ring's
end (the wrap counters flip), sizes need not be powers of 2, RX frames span
chains with MRG_RXBUF, interrupts follow the driver's event suppression area,
and the vring base carries both positions and wrap counters."""
from __future__ import annotations

import pytest

from test_datapath_packed_support import BUF_GPA, WRITE, PackedRig
from vhostlab.ring import FrameArena, make_ring
from vhostlab.ring.packed_layout import (VRING_PACKED_EVENT_FLAG_DESC,
                                         VRING_PACKED_EVENT_FLAG_DISABLE, packed_vring_base,
                                         parse_packed_vring_base)

IMPLS = ["numba", "python"]


@pytest.mark.parametrize("impl", IMPLS)
def test_tx_chains_wrap_around_a_ring_of_five(impl):
    rig = PackedRig(num=5)
    try:
        sent, got = [], []
        for k in range(12):                       # 12 chains of 1-2 descriptors: laps
            body = bytes([k]) * (20 + k)
            rig.memory.write(BUF_GPA + 0x1000 * k, bytes(12) + body)
            parts = [(BUF_GPA + 0x1000 * k, 12 + len(body), 0)] if k % 2 else \
                [(BUF_GPA + 0x1000 * k, 12, 0), (BUF_GPA + 0x1000 * k + 12, len(body), 0)]
            rig.post(parts)
            sent.append(body)
            arena = FrameArena(4096, 8)
            assert rig.vq.tx_burst(rig.memory, arena, hdr_len=12, impl=impl) == 1
            got += arena.frames()
            assert rig.used() == [((k) % 5, 0)]
        assert got == sent
        base = parse_packed_vring_base(rig.vq.get_base())
        assert (base.last_avail_idx, base.avail_wrap_counter) == (rig.avail_pos, rig.avail_wrap)
        assert (base.last_used_idx, base.used_wrap_counter) == (rig.used_pos, rig.used_wrap)
        assert base.avail_wrap_counter == 0       # 18 descriptors: three laps of 5 and more
    finally:
        rig.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_rx_frames_span_chains_with_mrg_rxbuf(impl):
    rig = PackedRig(num=6)
    try:
        for k in range(4):
            rig.post([(BUF_GPA + 0x1000 * k, 64, WRITE)])
        frame = bytes(range(100))
        n = rig.vq.rx_burst(rig.memory, FrameArena.from_frames([frame]), hdr_len=12,
                            mrg_rxbuf=True, impl=impl)
        assert n == 1
        assert rig.used() == [(0, 64), (1, 48)]
        hdr = rig.memory.read(BUF_GPA, 12)
        assert hdr[10:12] == (2).to_bytes(2, "little")      # num_buffers
        data = rig.memory.read(BUF_GPA + 12, 52) + rig.memory.read(BUF_GPA + 0x1000, 48)
        assert data == frame
        # Without MRG_RXBUF a frame too big for its chain is dropped, the chain stays.
        assert rig.vq.rx_burst(rig.memory, FrameArena.from_frames([bytes(200)]), hdr_len=12,
                               impl=impl) == 1
        assert rig.vq.dropped == 1 and rig.used() == []
    finally:
        rig.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_interrupts_follow_the_driver_event_area(impl):
    rig = PackedRig(num=8)
    try:
        def one():
            rig.post([(BUF_GPA, 30, 0)])
            rig.vq.tx_burst(rig.memory, FrameArena(4096, 4), impl=impl)
            rig.used()
            return rig.vq.take_call()
        assert one() is True                      # ENABLE (zero) by default
        rig.set_driver_event(VRING_PACKED_EVENT_FLAG_DISABLE)
        assert one() is False
        rig.vq.set_event_idx(True)                # DESC: when slot 4 (lap 1) is used
        rig.set_driver_event(VRING_PACKED_EVENT_FLAG_DESC, off_wrap=4 | 1 << 15)
        assert [one() for _ in range(4)] == [False, False, True, False]
        assert rig.device_event() == (0, 0)       # the device asks for every kick
        rig.memory.write(rig.vq.used + 2, (1).to_bytes(2, "little"))
        one()
        assert rig.device_event() == (0, 0)       # put back to ENABLE
    finally:
        rig.close()


def test_the_vring_base_roundtrip_and_the_16_bit_form():
    vq = make_ring("packed", 1)
    vq.set_num(256)
    vq.set_base(packed_vring_base(17, 0, 12, 1))
    assert parse_packed_vring_base(vq.get_base()) == (17, 0, 12, 1)
    vq.set_base(0x8000 | 40)                      # DPDK's virtio-user: avail only
    assert parse_packed_vring_base(vq.get_base()) == (40, 1, 40, 1)
    assert vq.get_base() == 0x80288028


def test_any_queue_size_works():
    for num in (1, 3, 7, 100):
        rig = PackedRig(num=num)
        try:
            for k in range(num + 2):
                rig.post([(BUF_GPA, 20, 0)])
                assert rig.vq.tx_burst(rig.memory, FrameArena(4096, 4)) == 1
                assert len(rig.used()) == 1
            assert (rig.used_pos, rig.used_wrap) == ((num + 2) % num,
                                                     1 ^ ((num + 2) // num) & 1)
        finally:
            rig.close()
