"""The packed-ring driver (virtio 2.8, driver side) against a device played here
by the spec's rules: wrap counters over several laps, buffer ids reused, flags
published last with a release store, used descriptors read with the used wrap
counter, and what the driver does with a ring it did not leave."""
from __future__ import annotations

import random

import pytest

from test_datapath_driver import Recording
from vhostlab.memory import GuestMemory
from vhostlab.ring import GuestDriverError, UsedElem
from vhostlab.ring.layout import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from vhostlab.ring.packed_driver import PackedVirtqueueDriver, packed_vring_layout
from vhostlab.ring.packed_layout import (VRING_PACKED_DESC_DTYPE, VRING_PACKED_DESC_F_AVAIL,
                                         VRING_PACKED_DESC_F_USED, VRING_PACKED_EVENT_FLAG_DESC,
                                         VRING_PACKED_EVENT_FLAG_DISABLE, packed_desc_is_avail,
                                         packed_used_flags)

MiB = 1 << 20
RING = 0x200000
BUFS = 0x300000


@pytest.fixture
def memory():
    mem = GuestMemory.allocate(4 * MiB, layout="pc")
    yield mem
    mem.close()


class Device:
    """The device's side of a packed ring, by the spec (2.8.13-2.8.14): take
    available chains in ring order with its avail wrap counter, and write one
    used descriptor per chain, in ring order from its used index."""

    def __init__(self, drv: PackedVirtqueueDriver) -> None:
        self.desc = drv.views.desc
        self.num = drv.num
        self.avail_idx = self.used_idx = 0
        self.avail_wrap = self.used_wrap = 1

    def take(self) -> list[tuple[int, int, list]]:
        """Every available chain: (id, slots, [(addr, len, flags), ...])."""
        chains = []
        while packed_desc_is_avail(int(self.desc[self.avail_idx]["flags"]), self.avail_wrap):
            slots, segs = [], []
            while True:
                d = self.desc[self.avail_idx]
                slots.append(self.avail_idx)
                segs.append((int(d["addr"]), int(d["len"]), int(d["flags"])))
                buf_id = int(d["id"])
                self.avail_idx += 1
                if self.avail_idx == self.num:
                    self.avail_idx, self.avail_wrap = 0, self.avail_wrap ^ 1
                if not segs[-1][2] & VRING_DESC_F_NEXT:
                    break
            chains.append((buf_id, slots, segs))
        return chains

    def give_back(self, buf_id: int, length: int, nslots: int) -> None:
        """One used descriptor at the used index; the index skips the chain's slots."""
        d = self.desc[self.used_idx]
        d["id"], d["len"] = buf_id, length
        d["flags"] = packed_used_flags(self.used_wrap)
        self.used_idx += nslots
        if self.used_idx >= self.num:
            self.used_idx, self.used_wrap = self.used_idx - self.num, self.used_wrap ^ 1


def test_layout_puts_the_event_areas_after_the_ring():
    lay = packed_vring_layout(RING, 8)
    assert (lay.desc, lay.avail, lay.used, lay.size) == (RING, RING + 128, RING + 132, 136)


def test_fifty_chains_through_a_ring_of_eight_wrap_and_reuse_ids(memory):
    drv = PackedVirtqueueDriver(memory, 8, RING, queue=1)
    dev = Device(drv)
    rng = random.Random(18)
    sent, got, wraps_seen, ids_seen = {}, [], set(), set()
    n = 0
    while n < 50:
        k = rng.randint(1, 3)                     # segments in this chain
        if drv.num_free < k:
            for buf_id, slots, segs in dev.take():
                dev.give_back(buf_id, sum(s[1] for s in segs), len(slots))
            got += drv.get_used()
            wraps_seen.add((drv.avail_wrap_counter, drv.used_wrap_counter))
            continue
        segs = [(BUFS + 0x1000 * n + 64 * j, 10 + n + j, j == k - 1) for j in range(k)]
        buf_id = drv.add_buffer(segs)
        drv.publish()
        sent[n] = (buf_id, sum(s[1] for s in segs))
        ids_seen.add(buf_id)
        n += 1
    for buf_id, slots, segs in dev.take():
        dev.give_back(buf_id, sum(s[1] for s in segs), len(slots))
    got += drv.get_used()
    # every chain came back once, in order, with its id and length
    assert got == [UsedElem(*sent[i]) for i in range(50)]
    assert ids_seen <= set(range(8)) and len(ids_seen) < 50       # ids were reused
    assert {(0, 0), (1, 1)} <= wraps_seen                         # several laps both ways
    assert drv.in_flight == 0 and drv.num_free == 8
    assert (drv.next_avail_idx, drv.avail_wrap_counter) == (dev.avail_idx, dev.avail_wrap)
    assert (drv.last_used_idx, drv.used_wrap_counter) == (dev.used_idx, dev.used_wrap)


def test_descriptors_carry_id_flags_and_the_avail_wrap_counter(memory):
    drv = PackedVirtqueueDriver(memory, 4, RING)
    a = drv.add_buffer([(BUFS, 100, False), (BUFS + 100, 200, True)])
    drv.publish()
    d = drv.views.desc
    assert list(d["id"][:2]) == [a, a]
    assert d["flags"][0] == VRING_PACKED_DESC_F_AVAIL | VRING_DESC_F_NEXT
    assert d["flags"][1] == VRING_PACKED_DESC_F_AVAIL | VRING_DESC_F_WRITE
    dev = Device(drv)
    (buf_id, slots, _), = dev.take()
    dev.give_back(buf_id, 200, len(slots))
    assert drv.get_used() == [(a, 200)]
    # the next lap: slots 2, 3 with wrap 1, then 0, 1 with wrap 0 (AVAIL clear, USED set)
    b = drv.add_buffers([[(BUFS, 1, True)]] * 4)
    drv.publish()
    assert drv.avail_wrap_counter == 0
    assert d["flags"][2] == VRING_PACKED_DESC_F_AVAIL | VRING_DESC_F_WRITE
    assert d["flags"][0] == VRING_PACKED_DESC_F_USED | VRING_DESC_F_WRITE
    assert [c[0] for c in dev.take()] == b


def test_the_first_flags_are_stored_last_with_release(memory):
    ram = Recording(memory)
    drv = PackedVirtqueueDriver(ram, 8, RING)
    dev = Device(drv)
    ram.log.clear()
    drv.add_buffers([[(BUFS, 64, False)], [(BUFS + 64, 64, False)], [(BUFS + 128, 64, False)]])
    assert dev.take() == []                       # nothing is available before publish
    assert ram.log == [("write", RING)]           # three descriptors in one write
    drv.publish()
    assert ram.log[-1] == ("release", RING + 14)  # the first descriptor's flags, last
    assert [c[0] for c in dev.take()] == [0, 1, 2]


def test_out_of_order_return_skips_the_slots_of_the_chain_returned(memory):
    drv = PackedVirtqueueDriver(memory, 8, RING)
    dev = Device(drv)
    a = drv.add_buffer([(BUFS, 10, True), (BUFS + 10, 10, True), (BUFS + 20, 10, True)])
    b = drv.add_buffer([(BUFS + 30, 10, True)])
    drv.publish()
    (ia, sa, _), (ib, sb, _) = dev.take()
    dev.give_back(ib, 7, len(sb))                 # b first: at slot 0, the used index skips 1
    assert drv.pop_used() == [(b, 7, [3])]
    assert drv.last_used_idx == 1
    dev.give_back(ia, 30, len(sa))                # a at slot 1: the index skips 3
    assert drv.pop_used() == [(a, 30, [0, 1, 2])]
    assert (drv.last_used_idx, drv.num_free, drv.free[-1]) == (4, 8, a)   # a's id is next


def test_used_wrap_counter_tells_this_lap_from_the_last(memory):
    drv = PackedVirtqueueDriver(memory, 4, RING)
    dev = Device(drv)
    for _ in range(2):
        drv.add_buffers([[(BUFS, 1, True)]] * 4)
        drv.publish()
        for buf_id, slots, _ in dev.take():
            dev.give_back(buf_id, 1, len(slots))
        assert drv.pending_used() == 4
        assert len(drv.get_used()) == 4
    assert drv.used_wrap_counter == 1 and drv.avail_wrap_counter == 1
    # the slots now hold the last lap's used flags: not used for this lap's counter
    drv.add_buffers([[(BUFS, 1, True)]])
    drv.publish()
    assert drv.pending_used() == 0 and drv.pop_used() == []


def test_an_id_not_in_flight_is_passed_over_and_get_used_refuses_it(memory):
    drv = PackedVirtqueueDriver(memory, 4, RING)
    drv.add_buffer([(BUFS, 1, True)])
    drv.publish()
    d = drv.views.desc
    d[0]["id"], d[0]["len"], d[0]["flags"] = 3, 9, packed_used_flags(1)
    assert drv.pop_used() == [(3, 9, None)]
    assert drv.last_used_idx == 1 and drv.in_flight == 1
    d[1]["id"], d[1]["flags"] = 2, packed_used_flags(1)
    with pytest.raises(GuestDriverError, match="head 2, which is not in flight"):
        drv.get_used()


def test_a_full_ring_refuses_with_the_counts(memory):
    drv = PackedVirtqueueDriver(memory, 4, RING, queue=1)
    drv.add_buffer([(BUFS, 1, True)] * 3)
    with pytest.raises(GuestDriverError, match="queue 1: needs 2 descriptors, 1 free of 4"):
        drv.add_buffer([(BUFS, 1, True)] * 2)
    with pytest.raises(GuestDriverError, match="at least one segment"):
        drv.add_buffers([[]])
    with pytest.raises(GuestDriverError, match="packed ring has no used->idx"):
        drv.used_idx()
    with pytest.raises(GuestDriverError, match="num"):
        PackedVirtqueueDriver(memory, 0, RING)


def test_kick_follows_the_device_event_area(memory):
    drv = PackedVirtqueueDriver(memory, 8, RING)
    dev, dev_event = Device(drv), drv.views.device_event
    drv.add_buffer([(BUFS, 1, True)])
    drv.publish()
    assert drv.kick_needed()                       # ENABLE (zero): kick
    dev_event[0]["flags"] = VRING_PACKED_EVENT_FLAG_DISABLE
    drv.add_buffer([(BUFS, 1, True)])
    drv.publish()
    assert not drv.kick_needed()
    # DESC: kick when the published slots pass off_wrap's index (same wrap counter)
    dev_event[0]["flags"] = VRING_PACKED_EVENT_FLAG_DESC
    dev_event[0]["off_wrap"] = 4 | 1 << 15
    drv.add_buffer([(BUFS, 1, True)])
    drv.publish()                                  # slots 2 -> 3: does not pass 4
    assert not drv.kick_needed()
    drv.add_buffers([[(BUFS, 1, True)]] * 2)
    drv.publish()                                  # 3 -> 5 passes 4
    assert drv.kick_needed()
    dev_event[0]["off_wrap"] = 1 | 0 << 15         # index 1 of the next lap
    drv.add_buffers([[(BUFS, 1, True)]] * 3)
    drv.publish()                                  # 5 -> 0 (wrapped): not there yet
    assert not drv.kick_needed() and drv.avail_wrap_counter == 0
    for buf_id, slots, _ in dev.take():            # the ring is full: the device returns all
        dev.give_back(buf_id, 1, len(slots))
    assert len(drv.get_used()) == 8
    drv.add_buffers([[(BUFS, 1, True)]] * 2)
    drv.publish()                                  # 0 -> 2 passes 1
    assert drv.kick_needed()


def test_event_idx_asks_for_an_interrupt_where_the_driver_reads_next(memory):
    drv = PackedVirtqueueDriver(memory, 4, RING, event_idx=True)
    ev = drv.views.driver_event
    assert (int(ev[0]["flags"]), int(ev[0]["off_wrap"])) == (VRING_PACKED_EVENT_FLAG_DESC, 1 << 15)
    dev = Device(drv)
    drv.add_buffers([[(BUFS, 1, True)]] * 4)
    drv.publish()
    for buf_id, slots, _ in dev.take():
        dev.give_back(buf_id, 1, len(slots))
    drv.get_used()
    assert int(ev[0]["off_wrap"]) == 0             # slot 0 of the lap with wrap counter 0


def test_indirect_chain_takes_one_slot(memory):
    drv = PackedVirtqueueDriver(memory, 4, RING)
    table = 0x280000
    buf_id = drv.add_buffer([(BUFS, 12, False), (BUFS + 12, 60, False)], indirect=table)
    drv.publish()
    d = drv.views.desc[0]
    assert (int(d["addr"]), int(d["len"]), int(d["id"])) == (table, 32, buf_id)
    assert d["flags"] == VRING_PACKED_DESC_F_AVAIL | VRING_DESC_F_INDIRECT
    entries = memory.view(table, 32).view(VRING_PACKED_DESC_DTYPE)
    assert [(int(e["addr"]), int(e["len"]), int(e["flags"])) for e in entries] == [
        (BUFS, 12, 0), (BUFS + 12, 60, 0)]
    assert drv.num_free == 3


def test_state_moves_to_another_driver(memory):
    drv = PackedVirtqueueDriver(memory, 4, RING)
    dev = Device(drv)
    drv.add_buffers([[(BUFS, 1, True)]] * 3)
    drv.publish()
    for buf_id, slots, _ in dev.take()[:2]:
        dev.give_back(buf_id, 5, len(slots))
    state = drv.export_state()
    other = PackedVirtqueueDriver(memory, 4, RING, clear=False)
    other.restore_state(state)
    assert other.get_used() == [(0, 5), (1, 5)]
    assert other.chains == {2: [2]} and other.num_free == 3


def test_reset_to_a_position_with_wrap_zero_reads_no_stale_used(memory):
    drv = PackedVirtqueueDriver(memory, 4, RING)
    drv.reset(2, 0)
    assert drv.pending_used() == 0
    assert all(f == VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED
               for f in drv.views.desc["flags"])
    drv.add_buffer([(BUFS, 1, True)])
    drv.publish()
    assert drv.views.desc["flags"][2] == VRING_PACKED_DESC_F_USED | VRING_DESC_F_WRITE
