"""A hostile guest on a packed ring: every broken rule gives its named error
naming the queue, the descriptor, the field, the value and the limit; the ring
is broken (later bursts raise the same error without touching memory); nothing
outside a region is read or written. Rules the packed ring adds: a chain's
later descriptors must be available in their lap, a chain may not run past the
ring's size, and a buffer id must be below the queue size."""
from __future__ import annotations

import os

import numpy as np
import pytest

from test_datapath_packed_support import (BUF_GPA, DESC_GPA, DEVICE_GPA, DRIVER_GPA, INDIRECT,
                                          NEXT, WRITE, PackedRig)
from test_datapath_support import two_region_memory
from vhostlab.dirtylog import DirtyLog
from vhostlab.ring import (BufferAddressError, DescriptorDirectionError,
                           DescriptorFlagsError, DescriptorIndexError, DescriptorLoopError,
                           FrameArena, IndirectDescriptorError, PackedVirtqueue,
                           RingAddressError, RingConfigError, RingLogError,
                           ZeroLengthBufferError)
from vhostlab.ring.packed_layout import VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED

IMPLS = ["numba", "python"]
TABLE = 0x9000
AVAIL, USED = VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED


def _burst(rig, direction, impl, **kw):
    if direction == "tx":
        return rig.vq.tx_burst(rig.memory, FrameArena(1 << 16, 16), impl=impl, **kw)
    return rig.vq.rx_burst(rig.memory, FrameArena.from_frames([b"f" * 40]), impl=impl, **kw)


def _table(rig, *entries):
    rig.memory.write(TABLE, np.array(list(entries), dtype=[
        ("a", "<u8"), ("l", "<u4"), ("i", "<u2"), ("f", "<u2")]).tobytes())


def _second_not_avail(r, w):
    r.post([(BUF_GPA, 20, w), (BUF_GPA + 0x100, 20, w)])
    r.descs[1]["flags"] = (r.descs[1]["flags"] & 0x7F7F) | USED     # lap 0's pair


def _whole_ring_chained(r, w):
    r.post([(BUF_GPA + 0x100 * k, 20, w) for k in range(r.num)])
    r.descs[r.num - 1]["flags"] |= NEXT                  # the last one chains on


# (name, direction, setup(rig, w) with w the WRITE flag the direction needs,
#  error class, words every message must contain)
CASES = [
    ("later descriptor not available", "tx", _second_not_avail, DescriptorFlagsError,
     ["descriptor 1 (chain head 0)", "flags = 0x8000", "wrap counter 1"]),
    ("chain past the ring's size", "rx", _whole_ring_chained, DescriptorLoopError,
     ["descriptor 0 (chain head 0)", "past 4 descriptors"]),
    ("buffer id out of range", "tx", lambda r, w: r.post([(BUF_GPA, 30, w)], bid=7),
     DescriptorIndexError, ["descriptor 0 (chain head 0)", "buffer id = 7", "< the queue size 4"]),
    ("indirect inside indirect", "tx",
     lambda r, w: (_table(r, (TABLE, 16, 0, INDIRECT)), r.post([(TABLE, 16, INDIRECT)])),
     IndirectDescriptorError, ["indirect descriptor 0 of the table at gpa 0x9000",
                               "INDIRECT inside an indirect table"]),
    ("indirect with next", "rx",
     lambda r, w: r.post([(TABLE, 16, INDIRECT), (BUF_GPA, 8, w)]),
     IndirectDescriptorError, ["descriptor 0 (chain head 0)", "INDIRECT together with NEXT"]),
    ("indirect len not a multiple of 16", "tx",
     lambda r, w: r.post([(TABLE, 24, INDIRECT)]), IndirectDescriptorError,
     ["indirect table len = 24"]),
    ("zero length", "rx", lambda r, w: r.post([(BUF_GPA, 0, w)]), ZeroLengthBufferError,
     ["descriptor 0 (chain head 0)", "len = 0"]),
    ("zero length in a table", "tx",
     lambda r, w: (_table(r, (BUF_GPA, 20, 0, w), (BUF_GPA, 0, 0, w)),
                   r.post([(TABLE, 32, INDIRECT)])),
     ZeroLengthBufferError, ["indirect descriptor 1 of the table at gpa 0x9000", "len = 0"]),
    ("writable buffer on TX", "tx", lambda r, w: r.post([(BUF_GPA, 20, WRITE)]),
     DescriptorDirectionError, ["descriptor 0", "device-writable buffer"]),
    ("readable buffer on RX", "rx", lambda r, w: r.post([(BUF_GPA, 60, 0)]),
     DescriptorDirectionError, ["descriptor 0", "device-readable buffer"]),
    ("buffer outside memory", "rx", lambda r, w: r.post([(1 << 40, 64, w)]),
     BufferAddressError, ["addr = 0x10000000000", "inside one mapped region"]),
    ("buffer at the last byte", "tx", lambda r, w: r.post([((1 << 21) - 8, 64, w)]),
     BufferAddressError, ["addr = 0x1ffff8"]),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,direction,setup,cls,words", CASES, ids=[c[0] for c in CASES])
def test_each_hostile_packed_ring_gets_its_named_error(name, direction, setup, cls, words,
                                                       impl):
    rig = PackedRig(num=4)
    try:
        w = WRITE if direction == "rx" else 0
        setup(rig, w)
        with pytest.raises(cls) as info:
            _burst(rig, direction, impl)
        before = rig.memory.read(0, 1 << 21)
        text = str(info.value)
        assert "queue 0 (rig)" in text
        for word in words:
            assert word in text, text
        assert rig.vq.broken and rig.vq.error.code == info.value.code
        # Broken: the next burst raises the same, and writes nothing.
        with pytest.raises(cls):
            _burst(rig, direction, impl)
        assert rig.memory.read(0, 1 << 21) == before
        assert rig.used() == []
    finally:
        rig.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_ring_areas_unmapped_or_misaligned(impl):
    rig = PackedRig(num=4)
    try:
        for desc, driver, device, words in (
                ((2 << 20) - 32, DRIVER_GPA, DEVICE_GPA, "descriptor table at gpa 0x1fffe0"),
                (DESC_GPA + 8, DRIVER_GPA, DEVICE_GPA, "must be 16-byte aligned"),
                (DESC_GPA, DRIVER_GPA + 2, DEVICE_GPA, "must be 4-byte aligned"),
                (DESC_GPA, DRIVER_GPA, 1 << 30, "used ring at gpa 0x40000000")):
            vq = PackedVirtqueue(2, "x")
            vq.set_num(4)
            with pytest.raises(RingAddressError, match=words):
                vq.set_addr(desc, driver, device, memory=rig.memory)
            vq.set_addr(desc, driver, device)          # unchecked: the burst checks
            with pytest.raises(RingAddressError, match=words):
                vq.tx_burst(rig.memory, FrameArena(4096, 4), impl=impl)
    finally:
        rig.close()


def test_packed_ring_config_errors():
    vq = PackedVirtqueue(5, "cfg")
    for bad in (0, 32769, -1):
        with pytest.raises(RingConfigError, match="packed ring holds 1 to 32768"):
            vq.set_num(bad)
    vq.set_num(3)                                   # not a power of 2: fine
    with pytest.raises(RingConfigError, match="last_avail_idx = 3 must be < the queue size 3"):
        vq.set_base(0x8003)
    with pytest.raises(RingConfigError, match="last_used_idx = 5"):
        vq.set_base(0x80058002)
    with pytest.raises(RingConfigError, match="32 bits"):
        vq.set_base(1 << 32)
    assert not vq.broken


@pytest.mark.parametrize("impl", IMPLS)
def test_a_log_too_small_for_a_used_descriptor_is_a_named_error(impl):
    rig = PackedRig(num=4)
    try:
        rig.vq.set_addr(DESC_GPA, DRIVER_GPA, DEVICE_GPA, DEVICE_GPA, 1, memory=rig.memory)
        rig.post([(BUF_GPA, 30, 0)])
        log = np.zeros(1, np.uint8)                 # 8 pages: the ring is at page 16
        with pytest.raises(RingLogError, match="page 16"):
            rig.vq.tx_burst(rig.memory, FrameArena(4096, 4), log=log, impl=impl)
    finally:
        rig.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_buffers_straddling_two_regions_are_refused(impl):
    memory, fds = two_region_memory()
    for fd in fds:
        os.close(fd)
    try:
        rig = PackedRig(num=4, memory=memory)
        boundary = memory.regions[1].guest_phys_addr
        rig.post([(boundary - 8, 16, 0)])
        with pytest.raises(BufferAddressError):
            rig.vq.tx_burst(memory, FrameArena(4096, 4), impl=impl)
        rig.descs = None
    finally:
        memory.close()


def test_a_log_bitmap_is_marked_for_the_used_descriptor_at_its_gpa():
    rig = PackedRig(num=4)
    try:
        rig.vq.set_addr(DESC_GPA, DRIVER_GPA, DEVICE_GPA, DEVICE_GPA, 1, memory=rig.memory)
        with DirtyLog.allocate(rig.memory) as log:
            rig.post([(BUF_GPA, 30, 0)])
            assert rig.vq.tx_burst(rig.memory, FrameArena(4096, 4), log=log) == 1
            assert list(log.dirty_pages()) == [DESC_GPA // 4096]
    finally:
        rig.close()
