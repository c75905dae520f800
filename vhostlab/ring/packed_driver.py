"""The guest's side of a packed virtqueue (virtio 1.1+ section 2.8, driver side).

What Linux's virtio_ring.c does for packed rings, in miniature, beside the
split driver (:class:`~vhostlab.ring.driver.VirtqueueDriver`) and with the
same public methods, so a guest drives either without asking which:

* **Making buffers available** (2.8.13, 2.8.21.1). Descriptors go in ring
  order from ``next_avail_idx``; a chain is contiguous, NEXT on all but its
  last. Every descriptor carries the chain's buffer ``id`` (any free one, not
  a position) and AVAIL/USED flags from the driver's avail wrap counter
  (``packed_avail_flags``); the counter flips each time ``next_avail_idx``
  passes the end of the ring.
* **Flags last, with release** (2.8.21.3.1: "the driver MUST NOT make the
  first descriptor in the list available before all subsequent descriptors
  comprising the list are made available"). A batch's first descriptor is
  written with the previous lap's used flags (what the slot already says: not
  available); :meth:`PackedVirtqueueDriver.publish` stores its real flags
  with a release store, after everything else. The device stops at that
  descriptor until then, so the rest of the batch may already carry theirs.
* **Reading used descriptors** (2.8.14). The device writes one descriptor per
  chain, in ring order from its own used index: the buffer ``id`` and the
  bytes written, with AVAIL == USED == its wrap counter. The driver reads
  at ``last_used_idx``: an acquire load of the flags, then id and len; it
  then skips as many slots as that id's chain took and flips its used wrap
  counter when it passes the end.
* **Event suppression** (2.8.10). The device's area (``flags``, and with
  EVENT_IDX ``off_wrap``) says whether to kick; the driver's area asks for
  interrupts: ENABLE, or with EVENT_IDX ``DESC`` at ``last_used_idx`` and
  the used wrap counter.

There are no indices in memory, so a migration carries the wrap counters in
the vring base (``packed_layout.packed_vring_base``); this driver's own
position moves with the guest (:meth:`PackedVirtqueueDriver.export_state`).

    drv = PackedVirtqueueDriver(memory, 256, ring_gpa)   # driver/device areas follow
    buf_id = drv.add_buffer([(buf_gpa, 1526, True)])     # an RX buffer
    drv.publish()
    ...
    for buf_id, length in drv.get_used(): ...
"""
from __future__ import annotations

import struct
from typing import NamedTuple, Sequence

import numpy as np

from .driver import _DESC, GuestDriverError, RingDriver, write_runs
from .layout import VRING_DESC_F_NEXT, VringLayout, vring_need_event_py
from .packed_layout import (VRING_PACKED_DESC_DTYPE, VRING_PACKED_DESC_F_AVAIL,
                            VRING_PACKED_DESC_F_USED, VRING_PACKED_DESC_SIZE,
                            VRING_PACKED_EVENT_DTYPE, VRING_PACKED_EVENT_FLAG_DESC,
                            VRING_PACKED_EVENT_FLAG_DISABLE,
                            VRING_PACKED_EVENT_F_WRAP_CTR, VRING_PACKED_EVENT_SIZE,
                            VRING_PACKED_MAX_SIZE, packed_area_sizes, packed_avail_flags,
                            packed_desc_is_used, packed_used_flags)

__all__ = ["PackedVirtqueueDriver", "PackedVringViews", "packed_vring_layout",
           "packed_vring_views"]

_FLAGS_OFFSET = 14          # of a descriptor's flags field: {addr u64, len u32, id u16, flags}
_EVENT = struct.Struct("<HH")   # off_wrap, flags


def packed_vring_layout(desc: int, num: int) -> VringLayout:
    """The three areas back to back: the descriptor ring at ``desc``, the
    driver event area after it, the device event area after that
    (``avail``/``used`` hold the driver/device areas, as SET_VRING_ADDR does)."""
    ring, drv, dev = packed_area_sizes(num)
    return VringLayout(desc, desc + ring, desc + ring + drv, ring + drv + dev)


class PackedVringViews(NamedTuple):
    """numpy views of one packed ring over guest memory (for drivers and labs):
    ``desc`` (VRING_PACKED_DESC_DTYPE), ``driver_event`` and ``device_event``
    (1-element VRING_PACKED_EVENT_DTYPE arrays). They keep guest memory mapped."""

    desc: np.ndarray
    driver_event: np.ndarray
    device_event: np.ndarray


def packed_vring_views(memory, num: int, desc: int, driver: int, device: int) -> PackedVringViews:
    """Views of the packed ring at GPAs ``desc``, ``driver``, ``device`` in
    ``memory`` (anything with ``view(gpa, n) -> uint8 array``)."""
    ring, drv, dev = packed_area_sizes(num)
    return PackedVringViews(
        memory.view(desc, ring).view(VRING_PACKED_DESC_DTYPE),
        memory.view(driver, drv).view(VRING_PACKED_EVENT_DTYPE),
        memory.view(device, dev).view(VRING_PACKED_EVENT_DTYPE))


class PackedVirtqueueDriver(RingDriver):
    """Driver (guest) side of one packed virtqueue over guest memory.

    ``memory`` is a GuestMemory or any RingMemory. ``desc``, ``driver``,
    ``device`` are the GPAs of the descriptor ring and the two event areas;
    omitted, the areas follow the ring (:func:`packed_vring_layout`). ``num``
    is any size from 1 to 32768. The ring is zeroed on creation unless
    ``clear=False`` (memory known to be zero). Buffer ids are handed out from
    0 up, or with ``top_first`` from ``num - 1`` down; a returned id is the
    next handed out (Linux's free_head). ``chains`` maps each id in flight to
    the ring slots its descriptors took.
    """

    def __init__(self, memory, num: int, desc: int, driver: int | None = None,
                 device: int | None = None, *, event_idx: bool = False,
                 queue: int | None = None, top_first: bool = False, clear: bool = True) -> None:
        if not 1 <= num <= VRING_PACKED_MAX_SIZE:
            raise GuestDriverError("outside a packed ring's sizes", what=self._name(queue),
                                   field="num", value=num, limit=VRING_PACKED_MAX_SIZE)
        if driver is None or device is None:
            layout = packed_vring_layout(desc, num)
            driver, device = layout.avail, layout.used
        self.desc_gpa, self.driver_gpa, self.device_gpa = desc, driver, device
        self._init(memory, num, queue, event_idx, top_first, clear)

    def _indirect_table(self, entries: Sequence[tuple[int, int, int]]) -> bytes:
        """A packed indirect table (2.8.19): the entries in order, no NEXT, ids unused."""
        return b"".join(_DESC.pack(gpa, length, 0, flags) for gpa, length, flags in entries)

    def _views(self) -> PackedVringViews:
        return packed_vring_views(self.ram, self.num, self.desc_gpa, self.driver_gpa,
                                  self.device_gpa)

    def reset(self, start: int = 0, wrap: int = 1, *, clear: bool = True) -> None:
        """Free every id and slot and (with ``clear``) clear the ring. Both
        positions begin at ``start`` with wrap counter ``wrap`` (1 in a new
        ring; the device must be given the same with SET_VRING_BASE)."""
        if not 0 <= start < self.num:
            raise GuestDriverError("outside the ring", what=self._name(self.queue),
                                   field="start", value=start, limit=self.num)
        wrap = int(bool(wrap))
        if clear:
            # Every slot as the device leaves it after the lap before: not available,
            # not used (all zero when the wrap counter is 1).
            old = _DESC.pack(0, 0, 0, packed_used_flags(wrap ^ 1))
            self.ram.write(self.desc_gpa, old * self.num)
            for gpa in (self.driver_gpa, self.device_gpa):
                self.ram.memset(gpa, VRING_PACKED_EVENT_SIZE, 0)
        ids = range(self.num)
        self._free = list(ids if self.top_first else reversed(ids))   # pop() hands out
        self._chains: dict[int, list[int]] = {}
        self._num_free = self.num                 # ring slots not in flight
        self.next_avail_idx, self.avail_wrap_counter = start, wrap
        self.last_used_idx, self.used_wrap_counter = start, wrap
        self._pending: tuple[int, int] | None = None   # (slot, flags) written at publish
        self._published = (start, wrap)           # position the device may read up to
        self._unkicked = 0                        # slots published since the last decision
        self._off_wrap: int | None = None         # what the driver area's off_wrap holds
        if self.event_idx:
            self._ask_interrupt_at_used()
            if clear:
                self.ram.writew(self.driver_gpa + 2, VRING_PACKED_EVENT_FLAG_DESC)

    # -- bookkeeping -----------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Ring slots free (each chain takes one per descriptor, and one id)."""
        return self._num_free

    # -- adding and publishing ---------------------------------------------------
    def add_buffers(self, chains: Sequence[Sequence[tuple[int, int, bool]]], *,
                    indirect: Sequence[int] | None = None) -> list[int]:
        """Add several chains of ``(gpa, len, device_writable)`` segments
        (``indirect``: one table GPA per chain, 16 bytes per segment); returns
        their buffer ids. Consecutive descriptors go to guest memory in one
        write per run; the device sees them after :meth:`publish`."""
        self._check_chains(chains, indirect)
        descs: dict[int, bytes] = {}
        ids = []
        for k, segs in enumerate(chains):
            entries = self._ring_entries(segs, None if indirect is None else indirect[k])
            buf_id = self._free.pop()
            slots = []
            for i, (gpa, length, flags) in enumerate(entries):
                slot = self.next_avail_idx
                flags |= (VRING_DESC_F_NEXT if i < len(entries) - 1 else 0)
                flags |= packed_avail_flags(self.avail_wrap_counter)
                if self._pending is None:
                    # the batch's first descriptor: its flags are published last
                    self._pending = (slot, flags)
                    flags = ((flags & ~(VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED))
                             | packed_used_flags(self.avail_wrap_counter ^ 1))
                descs[slot] = _DESC.pack(gpa, length, buf_id, flags)
                slots.append(slot)
                self._advance_avail()
            self._chains[buf_id] = slots
            self._num_free -= len(slots)
            ids.append(buf_id)
        write_runs(self.ram, self.desc_gpa, VRING_PACKED_DESC_SIZE, descs)
        return ids

    def _advance_avail(self) -> None:
        self.next_avail_idx += 1
        if self.next_avail_idx == self.num:
            self.next_avail_idx = 0
            self.avail_wrap_counter ^= 1

    def publish(self) -> None:
        """Make added chains visible: the batch's first flags with a release
        store, after every other descriptor (2.8.21.3.1)."""
        if self._pending is not None:
            slot, flags = self._pending
            self.ram.store_release_w(self.desc_gpa + VRING_PACKED_DESC_SIZE * slot
                                     + _FLAGS_OFFSET, flags)
            self._pending = None
        old_idx, old_wrap = self._published
        added = self.next_avail_idx - old_idx
        if self.avail_wrap_counter != old_wrap:
            added += self.num
        self._unkicked += added
        self._published = (self.next_avail_idx, self.avail_wrap_counter)

    def kick_needed(self) -> bool:
        """After :meth:`publish`: does the device want a notification?

        The device event area (2.8.10): DISABLE no, ENABLE yes, DESC (EVENT_IDX)
        when the slots published since the last decision pass ``off_wrap``'s
        index, taken a ring back when its wrap counter is not the driver's
        (Linux's virtqueue_kick_prepare_packed).
        """
        self.ram.mb()          # our flags store before the device's area
        added, self._unkicked = self._unkicked, 0
        off_wrap, flags = _EVENT.unpack(self.ram.read(self.device_gpa, VRING_PACKED_EVENT_SIZE))
        flags &= 0x3
        if flags != VRING_PACKED_EVENT_FLAG_DESC:
            return flags != VRING_PACKED_EVENT_FLAG_DISABLE
        new, wrap = self._published
        event = off_wrap & ~(1 << VRING_PACKED_EVENT_F_WRAP_CTR)
        if off_wrap >> VRING_PACKED_EVENT_F_WRAP_CTR != wrap:
            event -= self.num
        return vring_need_event_py(event & 0xFFFF, new, (new - added) & 0xFFFF)

    # -- used buffers --------------------------------------------------------------
    def _used_at(self, slot: int, wrap: int) -> tuple[int, int] | None:
        """(id, len) of the used descriptor at ``slot``, or None when the device
        has not marked it used for wrap counter ``wrap`` (flags: acquire)."""
        gpa = self.desc_gpa + VRING_PACKED_DESC_SIZE * slot
        if not packed_desc_is_used(self.ram.load_acquire_w(gpa + _FLAGS_OFFSET), wrap):
            return None
        _addr, length, buf_id, _flags = _DESC.unpack(self.ram.read(gpa, VRING_PACKED_DESC_SIZE))
        return buf_id, length

    def _skip(self, slot: int, wrap: int, n: int) -> tuple[int, int]:
        slot += n
        if slot >= self.num:
            slot -= self.num
            wrap ^= 1
        return slot, wrap

    def _chain_len(self, buf_id: int) -> int:
        """Slots the chain with ``buf_id`` took; 1 for an id not in flight
        (the driver cannot know more of a ring it did not leave)."""
        return len(self._chains.get(buf_id, ())) or 1

    def pending_used(self) -> int:
        """Used descriptors the device returned and the driver has not collected."""
        slot, wrap, n = self.last_used_idx, self.used_wrap_counter, 0
        while n < self.num and (used := self._used_at(slot, wrap)) is not None:
            slot, wrap = self._skip(slot, wrap, self._chain_len(used[0]))
            n += 1
        return n

    def pop_used(self) -> list[tuple[int, int, list[int] | None]]:
        """Take the used descriptors the device returned: ``[(id, len, slots), ...]``.

        ``slots`` are the ring slots the id's chain took, now free again, or
        None when the id was not in flight (the descriptor is passed over as
        one slot: the ring is not what the driver left). At most ``num`` per
        call.
        """
        out = []
        while len(out) < self.num:
            used = self._used_at(self.last_used_idx, self.used_wrap_counter)
            if used is None:
                break
            buf_id, length = used
            n = self._chain_len(buf_id)
            slots = self._chains.pop(buf_id, None)
            if slots is not None:
                self._free.append(buf_id)
                self._num_free += len(slots)
            self.last_used_idx, self.used_wrap_counter = self._skip(
                self.last_used_idx, self.used_wrap_counter, n)
            out.append((buf_id, length, slots))
        if self.event_idx:
            self._ask_interrupt_at_used()
        return out

    def _ask_interrupt_at_used(self) -> None:
        """EVENT_IDX: off_wrap = where the driver reads next, with its wrap counter."""
        off_wrap = self.last_used_idx | self.used_wrap_counter << VRING_PACKED_EVENT_F_WRAP_CTR
        if off_wrap != self._off_wrap:
            self.ram.writew(self.driver_gpa, off_wrap)
            self._off_wrap = off_wrap

    def used_idx(self) -> int:
        """A packed ring has no used index in memory: GuestDriverError (use
        :meth:`pending_used`)."""
        raise GuestDriverError(f"{self._name(self.queue)}: a packed ring has no used->idx; "
                               "count used descriptors with pending_used()")

    # -- state ----------------------------------------------------------------------
    def export_state(self) -> dict:
        """The driver's bookkeeping, which a real guest keeps in its RAM (a
        migration moves it); :meth:`restore_state` takes it back."""
        return {"free": list(self._free), "chains": self.chains, "num_free": self._num_free,
                "next_avail_idx": self.next_avail_idx,
                "avail_wrap_counter": self.avail_wrap_counter,
                "last_used_idx": self.last_used_idx, "used_wrap_counter": self.used_wrap_counter,
                "pending": self._pending, "published": self._published,
                "unkicked": self._unkicked, "off_wrap": self._off_wrap}

    def restore_state(self, state: dict) -> None:
        """Take over the bookkeeping of :meth:`export_state` (the ring is not touched)."""
        self._free = list(state["free"])
        self._chains = {int(h): list(s) for h, s in state["chains"].items()}
        self._num_free = state["num_free"]
        self.next_avail_idx = state["next_avail_idx"]
        self.avail_wrap_counter = state["avail_wrap_counter"]
        self.last_used_idx = state["last_used_idx"]
        self.used_wrap_counter = state["used_wrap_counter"]
        self._pending = None if state["pending"] is None else tuple(state["pending"])
        self._published = tuple(state["published"])
        self._unkicked, self._off_wrap = state["unkicked"], state["off_wrap"]

