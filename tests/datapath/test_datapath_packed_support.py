"""A packed ring the datapath tests write by hand, and a minimal driver side for it
(imported by the other packed test modules), with tests of the helper itself.

``PackedRig`` is guest memory with one packed ring, the device-side
PackedVirtqueue for it, and the driver's half of the protocol as the spec
states it (2.8.13, 2.8.14): chains written from the driver's position with
AVAIL/USED for its lap, the head's flags last; used descriptors read at the
driver's used position while AVAIL == USED == its used wrap counter.
"""
from __future__ import annotations

import numpy as np

from vhostlab.memory import GuestMemory
from vhostlab.ring import PackedVirtqueue
from vhostlab.ring.packed_layout import (VRING_PACKED_DESC_DTYPE, packed_avail_flags,
                                         packed_desc_is_used)

NEXT, WRITE, INDIRECT = 1, 2, 4
DESC_GPA, DRIVER_GPA, DEVICE_GPA = 0x10000, 0x8000, 0x8004
BUF_GPA = 0x40000


class PackedRig:
    """Memory + one packed ring + its PackedVirtqueue + the driver's positions."""

    def __init__(self, num: int = 8, ram: int = 1 << 21, memory: GuestMemory | None = None,
                 base: int = 0x8000) -> None:
        self.memory = memory or GuestMemory.allocate(ram, layout="flat")
        self.num = num
        self.memory.write(DESC_GPA, bytes(16 * num))
        self.memory.write(DRIVER_GPA, bytes(8))
        self.descs = self.memory.view(DESC_GPA, 16 * num).view(VRING_PACKED_DESC_DTYPE)
        self.vq = PackedVirtqueue(0, "rig")
        self.vq.set_num(num)
        self.vq.set_base(base)
        self.vq.set_addr(DESC_GPA, DRIVER_GPA, DEVICE_GPA, memory=self.memory)
        self.avail_pos, self.avail_wrap = base & 0x7FFF, base >> 15 & 1
        self.used_pos, self.used_wrap = self.avail_pos, self.avail_wrap
        self.next_id = 0
        self.chain_len: dict[int, int] = {}

    def post(self, bufs, bid: int | None = None) -> int:
        """Make one chain available: ``bufs`` = [(addr, len, flags), ...]; NEXT is
        added on all but the last. Returns its buffer id."""
        bid = self.next_id % self.num if bid is None else bid
        self.next_id += 1
        slots = []
        pos, wrap = self.avail_pos, self.avail_wrap
        for k, (addr, length, flags) in enumerate(bufs):
            more = NEXT if k < len(bufs) - 1 else 0
            slots.append((pos, (addr, length, bid, flags | more | packed_avail_flags(wrap))))
            pos += 1
            if pos == self.num:
                pos, wrap = 0, wrap ^ 1
        for slot, value in reversed(slots):         # the head's flags last
            self.descs[slot] = value
        self.avail_pos, self.avail_wrap = pos, wrap
        self.chain_len[bid] = len(bufs)
        return bid

    def used(self) -> list[tuple[int, int]]:
        """The used descriptors the device wrote since the last call: (id, len)."""
        out = []
        while True:
            d = self.descs[self.used_pos]
            if not packed_desc_is_used(int(d["flags"]), self.used_wrap):
                return out
            out.append((int(d["id"]), int(d["len"])))
            self.used_pos += self.chain_len.get(int(d["id"]), 1)
            if self.used_pos >= self.num:
                self.used_pos -= self.num
                self.used_wrap ^= 1

    def set_driver_event(self, flags: int, off_wrap: int = 0) -> None:
        self.memory.write(DRIVER_GPA, np.array([off_wrap, flags], "<u2").tobytes())

    def device_event(self) -> tuple[int, int]:
        off_wrap, flags = np.frombuffer(self.memory.read(DEVICE_GPA, 4), "<u2")
        return int(off_wrap), int(flags)

    def close(self) -> None:
        self.descs = None
        self.memory.close()


def test_the_rig_driver_reads_back_what_a_device_would_write():
    rig = PackedRig(num=3)
    try:
        first = rig.post([(BUF_GPA, 10, 0), (BUF_GPA + 0x100, 10, 0)])
        assert rig.used() == []
        # What a device writes at the chain's first slot: id, len, AVAIL = USED = 1.
        rig.descs[0] = (0, 7, first, 0x8080)
        assert rig.used() == [(first, 7)] and (rig.used_pos, rig.used_wrap) == (2, 1)
    finally:
        rig.close()
