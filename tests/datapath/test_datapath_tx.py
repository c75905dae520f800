"""Guest TX through the device: the driver posts frames, the device takes them.

Every test runs with the numba kernel and with its Python twin."""
from __future__ import annotations

import numpy as np
import pytest

from test_datapath_support import BUF_GPA, Rig, net_hdr
from vhostlab.dirtylog import DirtyLog
from vhostlab.memory import GuestMemory
from vhostlab.ring import (VRING_AVAIL_F_NO_INTERRUPT, FrameArena, Virtqueue,
                           VirtqueueDriver, vring_layout)

IMPLS = ["numba", "python"]
MiB = 1 << 20


@pytest.fixture
def tx():
    """A legacy-layout TX ring of 16, driven by a VirtqueueDriver."""
    memory = GuestMemory.allocate(4 * MiB, layout="pc")
    layout = vring_layout(0x200000, 16)
    driver = VirtqueueDriver(memory, 16, layout.desc)
    vq = Virtqueue(1, "tx")
    vq.set_num(16)
    vq.set_addr(layout.desc, layout.avail, layout.used, memory=memory)
    yield memory, driver, vq
    driver.views = None
    del driver
    memory.close()


def _frame(k: int, size: int = 60) -> bytes:
    return bytes([k]) * size


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hdr_len", [0, 10, 12])
def test_frames_come_out_with_the_header_stripped(tx, impl, hdr_len):
    memory, driver, vq = tx
    for k in range(5):
        gpa = 0x300000 + k * 2048
        memory.write(gpa, net_hdr(length=12)[:hdr_len or 12] + _frame(k, 60 + k))
        driver.add_buffer([(gpa, (hdr_len or 12) + 60 + k, False)])
    driver.publish()
    arena = FrameArena(1 << 16, 16)
    assert vq.tx_burst(memory, arena, hdr_len=hdr_len, impl=impl) == 5
    skip = (hdr_len or 12) - hdr_len        # hdr_len 0 keeps the 12 bytes we wrote
    assert arena.frames() == [bytes(skip) + _frame(k, 60 + k) for k in range(5)]
    assert driver.get_used() == [(k, 0) for k in range(5)]     # TX: the device wrote 0
    assert (vq.last_avail_idx, vq.used_idx, vq.frames) == (5, 5, 5)
    assert vq.bytes == sum(skip + 60 + k for k in range(5))
    assert vq.avail_pending == 0 and vq.take_call() and not vq.take_call()


@pytest.mark.parametrize("impl", IMPLS)
def test_header_in_its_own_descriptor_and_frames_in_pieces(tx, impl):
    memory, driver, vq = tx
    memory.write(0x300000, bytes(10))
    memory.write(0x301000, b"abc")
    memory.write(0x302000, b"defgh")
    driver.add_buffer([(0x300000, 10, False), (0x301000, 3, False), (0x302000, 5, False)])
    memory.write(0x303000, bytes(4))                 # header split over two pieces
    memory.write(0x304000, bytes(6) + b"XY")
    driver.add_buffer([(0x303000, 4, False), (0x304000, 8, False)])
    driver.publish()
    arena = FrameArena(4096, 16)
    assert vq.tx_burst(memory, arena, hdr_len=10, impl=impl) == 2
    assert arena.frames() == [b"abcdefgh", b"XY"]


@pytest.mark.parametrize("impl", IMPLS)
def test_indirect_chains(tx, impl):
    memory, driver, vq = tx
    memory.write(0x300000, bytes(12) + b"hello ")
    memory.write(0x301000, b"indirect world")
    driver.add_buffer([(0x300000, 18, False), (0x301000, 14, False)], indirect=0x310000)
    driver.add_buffer([(0x302000, 12, False)], indirect=0x310100)
    driver.publish()
    assert driver.num_free == 14
    arena = FrameArena(4096, 16)
    assert vq.tx_burst(memory, arena, hdr_len=12, impl=impl) == 2
    assert arena.frames() == [b"hello indirect world", b""]
    assert [h for h, _ in driver.get_used()] == [0, 1] and driver.num_free == 16


@pytest.mark.parametrize("impl", IMPLS)
def test_a_full_arena_leaves_the_next_chain_for_the_next_burst(tx, impl):
    memory, driver, vq = tx
    for k in range(4):
        memory.write(0x300000 + k * 4096, bytes(12) + _frame(k, 1000))
        driver.add_buffer([(0x300000 + k * 4096, 1012, False)])
    driver.publish()
    arena = FrameArena(2500, 16)
    assert vq.tx_burst(memory, arena, hdr_len=12, impl=impl) == 2
    assert vq.avail_pending == 2 and vq.last_avail_idx == 2
    assert vq.tx_burst(memory, arena, hdr_len=12, impl=impl) == 2
    assert arena.frames() == [_frame(2, 1000), _frame(3, 1000)]
    assert vq.tx_burst(memory, arena, hdr_len=12, impl=impl) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_max_frames_and_wrapping_indices(tx, impl):
    memory, driver, vq = tx
    vq.set_base(0xFFFE)                  # resume near the 16-bit wrap
    driver.reset(start=0xFFFE)
    for k in range(6):
        memory.write(0x300000 + k * 64, bytes(12) + _frame(k, 20))
        driver.add_buffer([(0x300000 + k * 64, 32, False)])
    driver.publish()
    arena = FrameArena(4096, 16)
    assert vq.tx_burst(memory, arena, hdr_len=12, max_frames=4, impl=impl) == 4
    assert vq.last_avail_idx == 2 and vq.used_idx == 2
    assert vq.tx_burst(memory, arena, hdr_len=12, impl=impl) == 2
    assert arena.frames() == [_frame(4, 20), _frame(5, 20)]
    assert sorted(h for h, _ in driver.get_used()) == list(range(6))
    assert vq.get_base() == 4


@pytest.mark.parametrize("impl", IMPLS)
def test_interrupts_without_event_idx_follow_no_interrupt(tx, impl):
    memory, driver, vq = tx
    driver.views.avail_flags[0] = VRING_AVAIL_F_NO_INTERRUPT
    driver.add_buffer([(0x300000, 20, False)])
    driver.publish()
    assert vq.tx_burst(memory, FrameArena(4096, 4), impl=impl) == 1
    assert not vq.take_call()
    driver.views.avail_flags[0] = 0
    driver.add_buffer([(0x300000, 20, False)])
    driver.publish()
    assert vq.tx_burst(memory, FrameArena(4096, 4), impl=impl) == 1
    assert vq.take_call()


@pytest.mark.parametrize("impl", IMPLS)
def test_event_idx_used_event_and_avail_event(impl):
    rig = Rig(num=8)
    try:
        rig.vq.set_event_idx(True)
        for k in range(8):
            rig.desc(k, BUF_GPA + 64 * k, 30)
        arena = FrameArena(4096, 8)
        rig.views.used_event[0] = 2           # interrupt me once used idx passes 2
        rig.offer(0, 1)
        assert rig.vq.tx_burst(rig.memory, arena, impl=impl) == 2
        assert rig.vq.take_call()             # first signal is always sent
        assert int(rig.views.avail_event[0]) == 2    # kick me when avail passes 2
        rig.offer(2)
        assert rig.vq.tx_burst(rig.memory, arena, impl=impl) == 1
        assert rig.vq.take_call()             # used 2 -> 3 passes used_event 2
        rig.offer(3, 4)
        assert rig.vq.tx_burst(rig.memory, arena, impl=impl) == 2
        assert not rig.vq.take_call()         # 3 -> 5 does not pass 2 again
        rig.views.used_event[0] = 6
        rig.offer(5, 6, 7)
        assert rig.vq.tx_burst(rig.memory, arena, impl=impl) == 3
        assert rig.vq.take_call()             # 5 -> 8 passes 6
        assert int(rig.views.avail_event[0]) == 8
    finally:
        rig.close()


def test_driver_kick_decision_with_and_without_event_idx():
    rig = Rig(num=8)
    try:
        drv = VirtqueueDriver(rig.memory, 8, 0x40000, event_idx=True)
        drv.views.avail_event[0] = 0
        drv.add_buffer([(BUF_GPA, 10, False)])
        drv.publish()
        assert drv.kick_needed()              # avail 0 -> 1 passes avail_event 0
        drv.add_buffer([(BUF_GPA, 10, False)])
        drv.publish()
        assert not drv.kick_needed()          # 1 -> 2 does not
        plain = VirtqueueDriver(rig.memory, 8, 0x50000)
        plain.views.used_flags[0] = 1         # VRING_USED_F_NO_NOTIFY
        plain.add_buffer([(BUF_GPA, 10, False)])
        plain.publish()
        assert not plain.kick_needed()
        del drv, plain
    finally:
        rig.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_tx_logs_only_the_used_ring_at_log_guest_addr(tx, impl):
    memory, driver, vq = tx
    layout = vring_layout(0x200000, 16)
    log_gpa = 0x2FFFFC        # log_guest_addr on purpose not the used ring's GPA
    vq.set_addr(layout.desc, layout.avail, layout.used, log_gpa, 1, memory=memory)
    for k in range(3):
        driver.add_buffer([(0x300000 + k * 4096, 30, False)])
    driver.publish()
    with DirtyLog.allocate(memory) as log:
        assert vq.tx_burst(memory, FrameArena(4096, 4), log=log, impl=impl) == 3
        # used->idx at +2 (page 0x2FF), elems at +4..+28 (page 0x300): no buffer pages
        assert log.sync().tolist() == [0x2FF, 0x300]
        vq.set_addr(layout.desc, layout.avail, layout.used, log_gpa, 0, memory=memory)
        driver.add_buffer([(0x300000, 30, False)])
        driver.publish()
        assert vq.tx_burst(memory, FrameArena(4096, 4), log=log, impl=impl) == 1
        assert log.popcount() == 0            # VHOST_VRING_F_LOG off: nothing


@pytest.mark.parametrize("impl", IMPLS)
def test_an_unconfigured_ring_does_nothing(tx, impl):
    """Whether a ring is enabled is the back-end's decision (its RingState); the
    ring layer only refuses to walk a ring that has no size."""
    memory, driver, vq = tx
    driver.add_buffer([(0x300000, 30, False)])
    driver.publish()
    assert Virtqueue(3).tx_burst(memory, FrameArena(4096, 4), impl=impl) == 0
    assert vq.tx_burst(memory, FrameArena(4096, 4), impl=impl) == 1


def test_set_base_and_get_base_carry_a_ring_across_devices(tx):
    """What migration does: GET_VRING_BASE on one device, SET_VRING_BASE on
    the next; the new device continues where the old one stopped."""
    memory, driver, vq = tx
    for k in range(3):
        memory.write(0x300000 + k * 64, bytes(12) + _frame(k, 20))
        driver.add_buffer([(0x300000 + k * 64, 32, False)])
    driver.publish()
    assert vq.tx_burst(memory, FrameArena(4096, 2), hdr_len=12) == 2
    base = vq.get_base()
    layout = vring_layout(0x200000, 16)
    successor = Virtqueue(1, "tx")
    successor.set_num(16)
    successor.set_base(base)
    successor.set_addr(layout.desc, layout.avail, layout.used, memory=memory)
    arena = FrameArena(4096, 4)
    assert successor.tx_burst(memory, arena, hdr_len=12) == 1
    assert arena.frames() == [_frame(2, 20)]
    assert [h for h, _ in driver.get_used()] == [0, 1, 2]
    np.testing.assert_equal(successor.used_idx, 3)
