"""A hostile guest: every broken rule gives its named error naming the queue,
the descriptor, the field, the value and the limit; the ring is broken (later
bursts raise the same error without touching memory); other rings work on;
nothing outside a region is ever read or written."""
from __future__ import annotations

import os

import numpy as np
import pytest

from test_datapath_support import (BUF_GPA, INDIRECT, NEXT, WRITE, Rig, maps_lines,
                                   memfd_with, two_region_memory)
from vhostlab.dirtylog import DirtyLog
from vhostlab.memory import GuestMemory, GuestMemoryRegion
from vhostlab.ring import (AvailIndexError, BufferAddressError, ChainLengthError,
                           DescriptorDirectionError, DescriptorIndexError,
                           DescriptorLoopError, FrameArena, IndirectDescriptorError,
                           RingAddressError, RingConfigError, RingError, RingLogError,
                           Virtqueue, ZeroLengthBufferError, vring_layout)

IMPLS = ["numba", "python"]
TABLE = 0x9000          # an indirect table's GPA


def _burst(rig, direction, impl, **kw):
    if direction == "tx":
        return rig.vq.tx_burst(rig.memory, FrameArena(1 << 16, 16), impl=impl, **kw)
    return rig.vq.rx_burst(rig.memory, FrameArena.from_frames([b"f" * 40]), impl=impl, **kw)


def _table(rig, *entries):
    rig.memory.write(TABLE, b"".join(
        np.array([e], dtype=[("a", "<u8"), ("l", "<u4"), ("f", "<u2"), ("n", "<u2")]).tobytes()
        for e in entries))


# (name, direction, setup(rig, w) with w the WRITE flag the direction needs,
#  error class, words every message must contain)
CASES = [
    ("head >= queue size", "tx", lambda r, w: r.offer(8), DescriptorIndexError,
     ["queue 3 (q)", "avail.ring[0] = 8", "< the queue size 8"]),
    ("next >= queue size", "rx", lambda r, w: (r.desc(0, BUF_GPA, 64, w | NEXT, 9),
                                               r.offer(0)),
     DescriptorIndexError, ["descriptor 0 (chain head 0)", "next = 9", "< 8"]),
    ("loop", "tx", lambda r, w: (r.desc(0, BUF_GPA, 4, w | NEXT, 1),
                                 r.desc(1, BUF_GPA, 4, w | NEXT, 0), r.offer(0)),
     DescriptorLoopError, ["descriptor 1 (chain head 0)", "past 8 descriptors", "loop"]),
    ("loop inside an indirect table", "rx",
     lambda r, w: (_table(r, (BUF_GPA, 8, w | NEXT, 1), (BUF_GPA, 8, w | NEXT, 0)),
                   r.desc(2, TABLE, 32, INDIRECT), r.offer(2)),
     DescriptorLoopError, ["indirect descriptor 1 of the table at gpa 0x9000",
                           "(chain head 2)", "past 2 descriptors"]),
    ("indirect inside indirect", "tx",
     lambda r, w: (_table(r, (TABLE, 16, INDIRECT, 0)), r.desc(0, TABLE, 16, INDIRECT),
                   r.offer(0)),
     IndirectDescriptorError, ["indirect descriptor 0 of the table at gpa 0x9000",
                               "flags = 0x4", "INDIRECT inside an indirect table"]),
    ("indirect len not a multiple of 16", "rx",
     lambda r, w: (r.desc(0, TABLE, 24, INDIRECT), r.offer(0)),
     IndirectDescriptorError, ["descriptor 0", "len = 24", "multiple of 16"]),
    ("indirect len zero", "tx", lambda r, w: (r.desc(5, TABLE, 0, INDIRECT), r.offer(5)),
     IndirectDescriptorError, ["descriptor 5 (chain head 5)", "len = 0"]),
    ("indirect with next", "tx",
     lambda r, w: (r.desc(0, TABLE, 16, INDIRECT | NEXT, 1), r.offer(0)),
     IndirectDescriptorError, ["flags = 0x5", "INDIRECT together with NEXT"]),
    ("indirect table misaligned", "rx",
     lambda r, w: (r.desc(0, TABLE + 8, 16, INDIRECT), r.offer(0)),
     IndirectDescriptorError, ["addr = 0x9008", "16-byte aligned"]),
    ("indirect table unmapped", "tx",
     lambda r, w: (r.desc(0, 0x7000_0000, 64, INDIRECT), r.offer(0)),
     BufferAddressError, ["addr = 0x70000000", "len = 0x40"]),
    ("zero-length buffer", "rx", lambda r, w: (r.desc(0, BUF_GPA, 0, w), r.offer(0)),
     ZeroLengthBufferError, ["descriptor 0 (chain head 0)", "len = 0"]),
    ("buffer leaves memory", "tx",
     lambda r, w: (r.desc(0, (1 << 20) - 8, 9, w), r.offer(0)),
     BufferAddressError, ["addr = 0xffff8", "len = 0x9", "inside one mapped region"]),
    ("buffer address beyond 2**63", "rx",
     lambda r, w: (r.desc(0, (1 << 64) - 4096, 16, w), r.offer(0)),
     BufferAddressError, ["addr = 0xfffffffffffff000"]),
    ("avail index runs ahead", "tx",
     lambda r, w: r.views.avail_idx.__setitem__(0, 9), AvailIndexError,
     ["avail.idx = 9", "9 entries ahead of last_avail_idx 0", "queue size 8"]),
    ("writable buffer in TX", "tx", lambda r, w: (r.desc(0, BUF_GPA, 64, WRITE), r.offer(0)),
     DescriptorDirectionError, ["flags = 0x2", "device-writable", "only reads"]),
    ("readable buffer in RX", "rx", lambda r, w: (r.desc(0, BUF_GPA, 64, 0), r.offer(0)),
     DescriptorDirectionError, ["flags = 0x0", "device-readable", "only writes"]),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name, direction, setup, error, words", CASES,
                         ids=[c[0] for c in CASES])
def test_each_hostile_ring_gets_its_named_error_and_breaks_only_that_ring(
        name, direction, setup, error, words, impl):
    rig = Rig(num=8, index=3, name="q")
    other = Rig(num=8, memory=rig.memory, ring_gpa=0x40000, index=4, name="ok")
    try:
        setup(rig, WRITE if direction == "rx" else 0)
        with pytest.raises(error) as caught:
            _burst(rig, direction, impl)
        message = str(caught.value)
        for word in words:
            assert word in message, (word, message)
        assert isinstance(caught.value, RingError) and rig.vq.broken
        assert caught.value.queue == 3 and caught.value.field
        # broken: the same error again, and guest memory is not touched
        before = rig.memory.read(0, 1 << 20)
        with pytest.raises(error) as again:
            _burst(rig, direction, impl)
        assert str(again.value) == message
        assert rig.memory.read(0, 1 << 20) == before
        # the rest of the device keeps working
        other.desc(0, 0x60000, 40, WRITE if direction == "rx" else 0)
        other.offer(0)
        assert _burst(other, direction, impl) == 1
        # a reset ring can be set up again
        rig.vq.reset()
        assert not rig.vq.broken and rig.vq.error is None
    finally:
        other.views = None
        rig.close()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("direction", ["tx", "rx"])
def test_buffer_against_a_guard_page(direction, impl):
    """A region of two pages; the page after it is inaccessible. A buffer
    ending exactly at the region's end works; one more byte is refused."""
    fd = memfd_with(2 * 4096)
    rig = Rig(num=8)
    try:
        rig.memory.add_region(GuestMemoryRegion(0x10_0000_0000, 2 * 4096, 0x6000_0000_0000, 0), fd)
        region = next(r for r in rig.memory.regions if r.guest_phys_addr == 0x10_0000_0000)
        after = _perms_after(rig.memory, region)
        assert after == "---p"
        end = region.guest_phys_addr + region.memory_size
        w = WRITE if direction == "rx" else 0
        rig.desc(0, end - 64, 64, w)
        rig.offer(0)
        assert _burst(rig, direction, impl) == 1
        rig.desc(1, end - 64, 65, w)
        rig.offer(1)
        with pytest.raises(BufferAddressError, match=f"addr = {end - 64:#x}, len = 0x41"):
            _burst(rig, direction, impl)
    finally:
        rig.close()
        os.close(fd)


def _perms_after(memory, region) -> str:
    """Permissions of the page right after ``region`` in this process."""
    host, table = memory.kernel_args()
    row = next(r for r in table.tolist() if r[0] == region.guest_phys_addr)
    addr = host.ctypes.data + row[2] + region.memory_size
    del host
    for line in maps_lines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return line.split()[1]
    return "unmapped"


@pytest.mark.parametrize("impl", IMPLS)
def test_a_buffer_straddling_two_adjacent_regions_is_refused(impl):
    memory, fds = two_region_memory()
    try:
        rig = Rig(num=8, memory=memory)
        rig.desc(0, 0x10000 - 32, 64, 0)           # 32 bytes in each region
        rig.offer(0)
        with pytest.raises(BufferAddressError, match="addr = 0xffe0, len = 0x40"):
            _burst(rig, "tx", impl)
        rig.close()
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("impl", IMPLS)
def test_lengths_past_u32(impl):
    """Three 1-byte descriptors, then one of 0xffffffff bytes inside a (sparse)
    region of that size: the frame reaches the fourth, and the sum passes 2**32
    there (RX walks a chain only as far as its frame goes)."""
    size = (1 << 32) + 4096
    fd = memfd_with(size)
    rig = Rig(num=8)
    try:
        rig.memory.add_region(GuestMemoryRegion(1 << 32, size, 0x6100_0000_0000, 0), fd)
        for i in range(4):
            rig.desc(i, 1 << 32, 1 if i < 3 else 0xFFFFFFFF, WRITE | (NEXT if i < 3 else 0),
                     i + 1)
        rig.offer(0)
        with pytest.raises(ChainLengthError, match="descriptor 3 .* add up to 4294967298, "
                                                  "past 4294967295"):
            _burst(rig, "rx", impl)
    finally:
        rig.close()
        os.close(fd)


@pytest.mark.parametrize("impl", IMPLS)
def test_tx_chain_shorter_than_the_header_and_frame_larger_than_the_arena(impl):
    rig = Rig(num=8)
    try:
        rig.desc(0, BUF_GPA, 6, 0)
        rig.offer(0)
        with pytest.raises(ChainLengthError, match="holds 6 bytes, fewer than the 12-byte"):
            _burst(rig, "tx", impl, hdr_len=12)
        rig.vq.reset()
        rig.vq.set_num(8)
        rig.vq.set_addr(rig.layout.desc, rig.layout.avail, rig.layout.used)
        rig.views.avail_idx[0] = 0
        rig.desc(1, BUF_GPA, 5000, 0)
        rig.offer(1)
        with pytest.raises(ChainLengthError, match="at least 5000 bytes, more than the "
                                                   "frame arena's 4096"):
            rig.vq.tx_burst(rig.memory, FrameArena(4096, 4), impl=impl)
    finally:
        rig.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_frames_before_the_bad_chain_are_completed(impl):
    rig = Rig(num=8)
    try:
        rig.desc(0, BUF_GPA, 30, 0)
        rig.desc(1, BUF_GPA, 0, 0)
        rig.offer(0, 0, 1)
        arena = FrameArena(4096, 8)
        with pytest.raises(ZeroLengthBufferError) as caught:
            rig.vq.tx_burst(rig.memory, arena, impl=impl)
        assert caught.value.frames == 2 and len(arena) == 2
        assert rig.used() == [(0, 0), (0, 0)]
        assert rig.vq.get_base() == 2
    finally:
        rig.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_ring_areas_unmapped_or_misaligned(impl):
    rig = Rig(num=8)
    try:
        layout = vring_layout(0x1000, 8)
        with pytest.raises(RingAddressError, match="used ring at gpa 0x1ffffc"):
            rig.vq.set_addr(layout.desc, layout.avail, 0x1FFFFC, memory=rig.memory)
        with pytest.raises(RingAddressError, match="descriptor table at gpa 0x1008 must be "
                                                   "16-byte aligned"):
            rig.vq.set_addr(0x1008, layout.avail, layout.used, memory=rig.memory)
        assert not rig.vq.broken                  # refusing SET_VRING_ADDR breaks nothing
        rig.vq.set_addr(layout.desc, 0x7000_0000, layout.used)    # not checked now...
        with pytest.raises(RingAddressError, match="avail ring at gpa 0x70000000 "
                                                   r"\(22 bytes\)"):
            _burst(rig, "tx", impl)               # ...but on the burst
    finally:
        rig.close()


def test_ring_config_errors():
    vq = Virtqueue(2)
    for num in (0, 3, 65536, -8):
        with pytest.raises(RingConfigError, match=f"num = {num}"):
            vq.set_num(num)
    with pytest.raises(RingConfigError, match="SET_VRING_BASE num = 65536"):
        vq.set_base(65536)
    with pytest.raises(RingConfigError, match="SET_VRING_ADDR desc"):
        vq.set_addr(-1, 0, 0)
    with GuestMemory.allocate(1 << 20, layout="flat") as memory:
        with pytest.raises(RingConfigError, match="queue size num = 0"):
            vq.set_addr(0x1000, 0x2000, 0x3000, memory=memory)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_log_too_small_for_a_write_is_a_named_error(impl):
    rig = Rig(num=8)
    try:
        rig.desc(0, 0x80000, 64, WRITE)           # page 0x80 = 128
        rig.offer(0)
        with DirtyLog.allocate(16) as log:        # 128 pages: 0 .. 127
            with pytest.raises(RingLogError, match="gpa 0x80000 needs the dirty log to cover "
                                                   "page 128, but it holds 16 bytes"):
                _burst(rig, "rx", impl, log=log)
            assert log.popcount() == 0
    finally:
        rig.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_an_inconsistent_arena_is_the_callers_bug_not_the_guests(impl):
    rig = Rig(num=8)
    try:
        rig.desc(0, BUF_GPA, 64, WRITE)
        rig.offer(0)
        arena = FrameArena.from_frames([b"abc"])
        arena.lengths[0] = 10_000
        with pytest.raises(ValueError, match="arena"):
            rig.vq.rx_burst(rig.memory, arena, impl=impl)
        assert not rig.vq.broken
        with pytest.raises(ValueError, match="hdr_len"):
            rig.vq.rx_burst(rig.memory, arena, hdr_len=-1, impl=impl)
    finally:
        rig.close()
