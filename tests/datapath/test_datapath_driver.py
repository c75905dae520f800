"""The one split-ring driver over its memory interface: what it writes, in how many
accesses, where the ordered accesses fall, and what it does with a ring it did not leave."""
from __future__ import annotations

import numpy as np
import pytest

from vhostlab.memory import GuestMemory
from vhostlab.ring import (VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, GuestDriverError,
                           MappedRingMemory, UsedElem, VirtqueueDriver, vring_layout)

MiB = 1 << 20
RING = 0x200000


class Recording(MappedRingMemory):
    """Mapped RAM that records every access the driver makes (as a qtest log would)."""

    def __init__(self, memory):
        super().__init__(memory, on_write=lambda gpa, n: self.written.append((gpa, n)))
        self.log: list[tuple[str, int]] = []
        self.written: list[tuple[int, int]] = []

    def read(self, gpa, n):
        self.log.append(("read", gpa))
        return super().read(gpa, n)

    def write(self, gpa, data):
        self.log.append(("write", gpa))
        super().write(gpa, data)

    def load_acquire_w(self, gpa):
        self.log.append(("acquire", gpa))
        return super().load_acquire_w(gpa)

    def store_release_w(self, gpa, value):
        self.log.append(("release", gpa))
        super().store_release_w(gpa, value)

    def mb(self):
        self.log.append(("mb", 0))
        super().mb()


@pytest.fixture
def memory():
    mem = GuestMemory.allocate(4 * MiB, layout="pc")
    yield mem
    mem.close()


def _device_returns(drv: VirtqueueDriver, elems: list[tuple[int, int]]) -> None:
    """Play the device: put ``elems`` in the used ring and bump used->idx."""
    idx = int(drv.views.used_idx[0])
    for k, (head, length) in enumerate(elems):
        drv.views.used_ring[(idx + k) % drv.num] = (head, length)
    drv.views.used_idx[0] = (idx + len(elems)) & 0xFFFF


def test_a_batch_is_one_write_per_run_and_publish_is_the_release_store(memory):
    ram = Recording(memory)
    lay = vring_layout(RING, 16)
    drv = VirtqueueDriver(ram, 16, lay.desc)       # zeroes the ring: three writes
    assert [gpa for gpa, _ in ram.written] == [lay.desc, lay.avail, lay.used]
    ram.log.clear()
    ram.written.clear()
    heads = drv.add_buffers([[(0x300000 + 0x1000 * i, 100, True)] for i in range(8)])
    assert heads == list(range(8))
    # the 8 descriptors in one write, the 8 avail entries in another
    assert ram.log == [("write", lay.desc), ("write", lay.avail + 4)]
    assert int(drv.views.avail_idx[0]) == 0          # not visible before publish
    drv.publish()
    assert ram.log[-1] == ("release", lay.avail + 2) and int(drv.views.avail_idx[0]) == 8
    assert drv.views.desc[3]["flags"] == VRING_DESC_F_WRITE
    ram.log.clear()
    drv.kick_needed()
    assert ram.log[0] == ("mb", 0)                   # before reading the device's fields
    ram.log.clear()
    _device_returns(drv, [(2, 50), (0, 60)])
    assert drv.get_used() == [UsedElem(2, 50), UsedElem(0, 60)]
    assert ram.log == [("acquire", lay.used + 2), ("read", lay.used + 4)]
    # the write hook saw every byte the driver wrote, and nothing of the device's
    assert {gpa for gpa, _ in ram.written} == {lay.desc, lay.avail + 4, lay.avail + 2}
    drv.close()


def test_chains_and_indirect_tables_link_their_descriptors(memory):
    drv = VirtqueueDriver(memory, 8, RING)
    head = drv.add_buffer([(0x300000, 10, False), (0x301000, 20, True)])
    assert drv.chains == {head: [0, 1]}
    assert drv.views.desc[0]["flags"] == VRING_DESC_F_NEXT and drv.views.desc[0]["next"] == 1
    drv.add_buffer([(0x302000, 12, False), (0x303000, 14, True)], indirect=0x310000)
    table = np.frombuffer(memory.read(0x310000, 32), drv.views.desc.dtype)
    assert table[0]["next"] == 1 and table[1]["flags"] == VRING_DESC_F_WRITE
    assert drv.num_free == 5
    drv.close()


def test_descriptors_come_back_lifo_and_top_first_hands_out_from_the_top(memory):
    drv = VirtqueueDriver(memory, 8, RING)
    assert drv.next_free(3) == [0, 1, 2]
    top = VirtqueueDriver(memory, 8, 0x220000, top_first=True)
    assert top.next_free(3) == [7, 6, 5]
    heads = drv.add_buffers([[(0x300000, 10, True)]] * 3)
    drv.publish()
    _device_returns(drv, [(heads[1], 0)])
    drv.get_used()
    assert drv.next_free(1) == [heads[1]]          # the chain just returned goes out next
    with pytest.raises(GuestDriverError, match="sending needs 9 descriptors, 6 free of 8"):
        drv.next_free(9, what="sending ")
    drv.close()
    top.close()


def test_a_ring_not_as_the_driver_left_it(memory):
    drv = VirtqueueDriver(memory, 8, RING, queue=1)
    drv.add_buffer([(0x300000, 10, True)])
    drv.publish()
    _device_returns(drv, [(5, 10)])                  # 5 was never given to the device
    with pytest.raises(GuestDriverError, match="head 5, which is not in flight"):
        drv.get_used()
    _device_returns(drv, [(5, 10), (0, 10)])
    assert drv.pop_used() == [(5, 10, None), (0, 10, [0])]     # passed over, then freed
    drv.views.used_idx[0] = 100                      # further ahead than num
    with pytest.raises(GuestDriverError, match=r"queue 1: used.idx=100: .*limit: 8"):
        drv.pop_used()
    drv.close()


def test_used_event_is_written_only_when_it_moves(memory):
    ram = Recording(memory)
    drv = VirtqueueDriver(ram, 8, RING, event_idx=True)
    drv.add_buffers([[(0x300000, 10, True)]] * 2)
    drv.publish()
    ram.written.clear()
    assert drv.get_used() == []
    assert ram.written == []                         # nothing seen, nothing to say
    _device_returns(drv, [(0, 10)])
    drv.get_used()
    assert int(drv.views.used_event[0]) == 1 and len(ram.written) == 1
    drv.close()


def test_export_and_restore_carry_the_bookkeeping_to_another_driver(memory):
    drv = VirtqueueDriver(memory, 8, RING)
    drv.add_buffers([[(0x300000, 10, True)]] * 3)
    drv.publish()
    _device_returns(drv, [(1, 10)])
    drv.get_used()
    state = drv.export_state()
    again = VirtqueueDriver(memory, 8, RING, clear=False)
    again.restore_state(state)
    assert again.export_state() == state and again.chains == {0: [0], 2: [2]}
    _device_returns(again, [(0, 4)])
    assert again.get_used() == [(0, 4)]
    drv.close()
    again.close()
