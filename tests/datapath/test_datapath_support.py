"""Shared helpers for the datapath tests (imported by the other test modules),
with tests of the helpers themselves.

A ``Rig`` is guest memory (memfd-backed, mapped through GuestMemory) with one
ring whose descriptors the tests write by hand, hostile or not, through numpy
views over that memory, and the device-side Virtqueue for it.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from vhostlab.memory import GuestMemory, GuestMemoryRegion
from vhostlab.ring import (VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
                           Virtqueue, vring_layout, vring_views)

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
RING_GPA = 0x1000
BUF_GPA = 0x8000


class Rig:
    """Memory + one ring at RING_GPA (legacy layout) + its Virtqueue."""

    def __init__(self, num: int = 8, ram: int = 1 << 20, memory: GuestMemory | None = None,
                 ring_gpa: int = RING_GPA, index: int = 0, name: str = "") -> None:
        self.memory = memory or GuestMemory.allocate(ram, layout="flat")
        self.num = num
        self.layout = vring_layout(ring_gpa, num)
        self.views = vring_views(self.memory, num, self.layout.desc, self.layout.avail,
                                 self.layout.used)
        for gpa, size in ((ring_gpa, self.layout.size),):
            self.memory.write(gpa, bytes(size))
        self.vq = Virtqueue(index, name)
        self.vq.set_num(num)
        self.vq.set_addr(self.layout.desc, self.layout.avail, self.layout.used,
                         memory=self.memory)

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.views.desc[i] = (addr, length, flags, nxt)

    def offer(self, *heads: int) -> None:
        """Put heads in the avail ring after the device's last_avail_idx and
        publish them."""
        idx = int(self.views.avail_idx[0])
        for head in heads:
            self.views.avail_ring[idx % self.num] = head
            idx = (idx + 1) & 0xFFFF
        self.views.avail_idx[0] = idx

    def used(self) -> list[tuple[int, int]]:
        """Used elements from the device's point of view (0 .. used_idx)."""
        n = int(self.views.used_idx[0])
        return [(int(e["id"]), int(e["len"])) for e in
                (self.views.used_ring[k % self.num] for k in range(n))]

    def close(self) -> None:
        self.views = None
        self.memory.close()


def memfd_with(size: int, name: str = "test-region") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def two_region_memory(size0: int = 0x10000, gpa1: int = 0x10000, size1: int = 0x4000):
    """Two regions from two memfds; adjacent in GPA by default (to test
    buffers that straddle them). Returns (memory, fds) - the caller closes fds."""
    fds = [memfd_with(size0), memfd_with(size1)]
    memory = GuestMemory.from_table([(GuestMemoryRegion(0, size0, 0x7000_0000_0000, 0), fds[0]),
                                     (GuestMemoryRegion(gpa1, size1, 0x7100_0000_0000, 0), fds[1])])
    return memory, fds


def net_hdr(num_buffers: int | None = None, length: int = 10) -> bytes:
    """A virtio-net header as the device writes it (all zero, num_buffers)."""
    hdr = bytearray(length)
    if num_buffers is not None and length >= 12:
        struct.pack_into("<H", hdr, 10, num_buffers)
    return bytes(hdr)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def maps_lines() -> list[str]:
    with open("/proc/self/maps") as f:
        return f.read().splitlines()


# ---------------------------------------------------------------- self-tests
def test_rig_offer_and_views_agree():
    rig = Rig(num=4)
    try:
        rig.desc(2, BUF_GPA, 64, WRITE)
        rig.offer(2, 3)
        assert int(rig.views.avail_idx[0]) == 2
        assert list(rig.views.avail_ring[:2]) == [2, 3]
        raw = rig.memory.read(rig.layout.desc + 2 * 16, 16)
        assert struct.unpack("<QIHH", raw) == (BUF_GPA, 64, WRITE, 0)
    finally:
        rig.close()


def test_net_hdr_places_num_buffers_at_offset_10():
    assert net_hdr(3, 12) == bytes(10) + b"\x03\x00"
    assert net_hdr(None, 10) == bytes(10)
    assert np.frombuffer(net_hdr(258, 12), "<u2")[5] == 258
