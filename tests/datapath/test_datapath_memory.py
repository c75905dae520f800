"""GuestMemory: QEMU's layout, translation, bounds, validation, lifetime."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_datapath_support import maps_lines, memfd_with, open_fds, two_region_memory
from vhostlab import memory as memory_module
from vhostlab.memory import (GuestMemory, GuestMemoryError, InvalidRegionError,
                             GuestMemoryRegion, RegionFileError, RegionLimitError,
                             RegionNotFoundError, RegionOverlapError,
                             UnmappedAddressError, gpa_to_host, gpa_to_host_py)

MiB = 1 << 20


def _maps_with_inode(inode: int) -> list[str]:
    return [line for line in maps_lines() if line.split()[4] == str(inode)]


def test_pc_layout_is_qemus_three_regions_from_one_memfd():
    with GuestMemory.allocate(256 * MiB, layout="pc") as mem:
        table = mem.memory_table()
        got = [(r.guest_phys_addr, r.memory_size, r.mmap_offset) for r, _ in table]
        assert got == [(0x0, 0xC0000, 0x0), (0xE0000, 0x10000, 0xE0000),
                       (0x100000, 0xFF00000, 0x100000)]
        fds = {fd for _, fd in table}
        assert len(fds) == 1
        fd = fds.pop()
        assert os.fstat(fd).st_size == 256 * MiB
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")


def test_ram_above_3g_goes_to_a_fourth_region_at_4g():
    # only address space: nothing of the 4 GiB memfd is touched
    with GuestMemory.allocate(4 << 30, layout="pc") as mem:
        last = mem.regions[-1]
        assert (last.guest_phys_addr, last.memory_size, last.mmap_offset) == \
            (1 << 32, 1 << 30, 0xC0000000)


def test_writes_reach_the_memfd_at_mmap_offset_and_a_second_mapping_sees_them():
    with GuestMemory.allocate(4 * MiB, layout="pc") as front:
        table = front.memory_table()
        front.write(0x100000 + 0x1234, b"guest bytes")
        fd = table[0][1]
        assert os.pread(fd, 11, 0x100000 + 0x1234) == b"guest bytes"
        # the back-end maps the same table from the same fd
        with GuestMemory.from_table(table) as back:
            assert back.read(0x101234, 11) == b"guest bytes"
            back.write(0xE0010, b"from the device")
            assert front.read(0xE0010, 15) == b"from the device"


def test_userspace_addr_is_where_the_front_end_mapped_and_translates_back():
    with GuestMemory.allocate(4 * MiB, layout="pc") as mem:
        for region in mem.regions:
            gpa = region.guest_phys_addr + region.memory_size - 8
            uva = mem.gpa_to_uva(gpa)
            assert uva == region.userspace_addr + region.memory_size - 8
            assert mem.uva_to_gpa(uva, 8) == gpa
        region = mem.regions[2]
        with pytest.raises(UnmappedAddressError, match="leaves the region userspace_addr"):
            mem.uva_to_gpa(region.userspace_addr + region.memory_size - 4, 8)
        with pytest.raises(UnmappedAddressError, match="in no mapped region"):
            mem.uva_to_gpa(12345)


def test_bounds_end_of_region_ok_one_more_byte_refused():
    with GuestMemory.allocate(4 * MiB, layout="pc") as mem:
        assert mem.read(0xC0000 - 4, 4) == bytes(4)
        with pytest.raises(UnmappedAddressError, match=r"leaves the region \[0x0, 0xc0000\)"):
            mem.read(0xC0000 - 4, 5)
        with pytest.raises(UnmappedAddressError, match="0xd0000 is in no mapped region"):
            mem.view(0xD0000, 1)
        with pytest.raises(UnmappedAddressError):
            mem.write(4 * MiB - 2, b"abc")
        assert mem.view(4 * MiB - 2, 2).size == 2


def test_a_range_straddling_two_adjacent_regions_is_refused():
    mem, fds = two_region_memory()
    try:
        mem.write(0x10000 - 4, b"abcd")
        mem.write(0x10000, b"efgh")
        with pytest.raises(UnmappedAddressError, match="leaves the region"):
            mem.read(0x10000 - 4, 8)
    finally:
        mem.close()
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("region, fd_size, error, words", [
    (GuestMemoryRegion(0, 0, 0, 0), MiB, InvalidRegionError, "memory_size = 0"),
    (GuestMemoryRegion(0x800, 0x1000, 0, 0), MiB, InvalidRegionError, "multiples of 0x1000"),
    (GuestMemoryRegion(0, 0x1000, 0, 0x10), MiB, InvalidRegionError, "mmap_offset"),
    (GuestMemoryRegion(0, 2 * MiB, 0, 0), MiB, RegionFileError, "exceeds the file size 0x100000"),
    (GuestMemoryRegion(0, MiB, 0, 0x1000), MiB, RegionFileError, "mmap_offset 0x1000 \\+ memory_size"),
    (GuestMemoryRegion((1 << 63) - 0x1000, 0x2000, 0, 0), MiB, InvalidRegionError, "exceeds 0x8000"),
    (GuestMemoryRegion(0, 0x1000, (1 << 64) - 0x800, 0), MiB, InvalidRegionError, "wraps"),
    (GuestMemoryRegion(0, 0x1000, 1 << 64, 0), MiB, InvalidRegionError, "userspace_addr.*u64"),
])
def test_bad_regions_get_named_errors(region, fd_size, error, words):
    fd = memfd_with(fd_size)
    try:
        with GuestMemory() as mem:
            with pytest.raises(error, match=words):
                mem.add_region(region, fd)
            assert mem.regions == ()
    finally:
        os.close(fd)


def test_unusable_fds_are_refused():
    r, w = os.pipe()
    closed = memfd_with(4096)
    os.close(closed)
    try:
        with GuestMemory() as mem:
            with pytest.raises(RegionFileError, match="not a regular file"):
                mem.add_region(GuestMemoryRegion(0, 4096, 0, 0), r)
            with pytest.raises(RegionFileError, match="fstat failed"):
                mem.add_region(GuestMemoryRegion(0, 4096, 0, 0), closed)
    finally:
        os.close(r)
        os.close(w)


def test_overlaps_and_region_limit():
    fd = memfd_with(MiB)
    try:
        with GuestMemory(max_regions=2) as mem:
            mem.add_region(GuestMemoryRegion(0, 0x10000, 0x10000000, 0), fd)
            with pytest.raises(RegionOverlapError, match=r"gpa \[0x8000, 0x18000\) overlaps"):
                mem.add_region(GuestMemoryRegion(0x8000, 0x10000, 0x20000000, 0), fd)
            with pytest.raises(RegionOverlapError, match="userspace_addr"):
                mem.add_region(GuestMemoryRegion(0x20000, 0x10000, 0x10008000, 0), fd)
            mem.add_region(GuestMemoryRegion(0x20000, 0x10000, 0x20000000, 0x10000), fd)
            with pytest.raises(RegionLimitError, match="already 2 regions, the limit is 2"):
                mem.add_region(GuestMemoryRegion(0x40000, 0x10000, 0x30000000, 0), fd)
    finally:
        os.close(fd)


def test_reservation_too_small_is_a_named_error():
    fd = memfd_with(MiB)
    try:
        with GuestMemory(reserve=256 << 10) as mem:
            with pytest.raises(RegionLimitError, match="reserved address space"):
                mem.add_region(GuestMemoryRegion(0, MiB, 0, 0), fd)
    finally:
        os.close(fd)


def test_the_fd_stays_the_callers_and_may_be_closed_after_add():
    fd = memfd_with(MiB)
    before = open_fds()
    with GuestMemory() as mem:
        mem.add_region(GuestMemoryRegion(0x100000, MiB, 0x5000_0000, 0), fd)
        assert open_fds() == before       # nothing kept, nothing dup'ed
        os.close(fd)
        mem.write(0x100000 + 100, b"still mapped")
        assert mem.read(0x100000 + 100, 12) == b"still mapped"


def test_add_and_remove_region_like_add_mem_reg_and_rem_mem_reg():
    with GuestMemory.allocate(2 * MiB, layout="flat") as mem:
        region = mem.allocate_region(0x10000000, MiB)
        assert region.userspace_addr != 0
        mem.write(0x10000000, b"hotplugged")
        assert [fd for _, fd in mem.memory_table()][0] != mem.memory_table()[1][1]
        with pytest.raises(RegionNotFoundError):
            mem.remove_region(region._replace(userspace_addr=region.userspace_addr + 4096))
        fds_before = open_fds()
        mem.remove_region(region)
        assert open_fds() == fds_before - 1      # its owned memfd is closed
        with pytest.raises(UnmappedAddressError):
            mem.read(0x10000000, 1)
        again = mem.allocate_region(0x10000000, MiB)     # the slot can be reused
        assert mem.read(0x10000000, 10) == bytes(10)
        assert again in mem.regions


def test_close_unmaps_everything_and_closes_owned_fds():
    fds_before = open_fds()
    mem = GuestMemory.allocate(8 * MiB, layout="pc")
    fd = mem.memory_table()[0][1]
    inode = os.fstat(fd).st_ino
    mem.write(0x200000, b"x")
    assert len(_maps_with_inode(inode)) == 3
    base = mem.regions[0].userspace_addr
    mem.close()
    assert _maps_with_inode(inode) == []
    assert open_fds() == fds_before
    assert not any(int(line.split("-")[0], 16) <= base < int(line.split()[0].split("-")[1], 16)
                   for line in maps_lines())
    with pytest.raises(GuestMemoryError, match="closed"):
        mem.read(0, 1)
    mem.close()      # idempotent


def test_a_live_view_keeps_memory_mapped_until_it_is_dropped():
    mem = GuestMemory.allocate(MiB, layout="flat")
    inode = os.fstat(mem.memory_table()[0][1]).st_ino
    view = mem.view(0x1000, 16)
    view[:] = 7
    mem.close()
    assert _maps_with_inode(inode), "unmapped under a live view"
    assert int(view.sum()) == 7 * 16          # still readable, no fault
    del view
    assert _maps_with_inode(inode) == []


def test_remove_region_under_a_live_view_keeps_the_view_valid():
    with GuestMemory.allocate(MiB, layout="flat") as mem:
        region = mem.allocate_region(0x4000_0000, 0x10000)
        mem.write(0x4000_0000, b"old data")
        view = mem.view(0x4000_0000, 8)
        mem.remove_region(region)
        with pytest.raises(UnmappedAddressError):
            mem.read(0x4000_0000, 8)
        assert view.tobytes() == b"old data"
        del view


def test_regions_are_surrounded_by_inaccessible_guard_pages():
    with GuestMemory.allocate(MiB, layout="flat") as mem:
        start = mem.regions[0].userspace_addr
        end = start + MiB
        spans = []
        for line in maps_lines():
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            spans.append((lo, hi, line.split()[1]))

        def perms_at(addr):
            return next(p for lo, hi, p in spans if lo <= addr < hi)

        assert perms_at(start).startswith("rw") and perms_at(end - 1).startswith("rw")
        assert perms_at(end) == "---p"            # the page right after the region
        assert perms_at(start - 1) == "---p"      # and the one before it


def test_repr_and_kernel_args_shapes():
    with GuestMemory.allocate(4 * MiB, layout="pc") as mem:
        assert re.search(r"3 regions: \[0x0, 0xc0000\)", repr(mem))
        host, table = mem.kernel_args()
        assert host.dtype == np.uint8 and table.dtype == np.int64 and table.shape == (3, 4)
        assert table[0, memory_module.REGION_SIZE] == 0x300000     # largest first
        assert not table.flags.writeable


@settings(max_examples=200, deadline=None)
@given(gpa=st.one_of(st.integers(0, 0x140000), st.integers(-(1 << 63), (1 << 63) - 1)),
       length=st.one_of(st.integers(0, 0x20000), st.integers(-4, 1 << 40)))
def test_gpa_to_host_kernel_equals_twin_and_checks_containment(gpa, length):
    table = np.array([[0x100000, 0x40000, 0x9000, 0], [0, 0xC0000, 0x200000, 0],
                      [0xE0000, 0x10000, 0x400000, 0]], np.int64)
    got = gpa_to_host(table, gpa, length)
    assert got == gpa_to_host_py(table.tolist(), gpa, length)
    inside = [r for r in table.tolist() if r[0] <= gpa < r[0] + r[1]]
    if length >= 0 and inside and gpa + length <= inside[0][0] + inside[0][1]:
        assert got == inside[0][2] + gpa - inside[0][0]
    else:
        assert got == -1
