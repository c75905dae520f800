"""The built-in guest: memfd RAM in QEMU's regions and a virtio-net driver over split or packed rings.

It plays two parts that QEMU keeps apart:

* the **guest**: a virtio-net driver (Linux's virtio_net, very much reduced)
  that posts RX buffers, transmits frames, kicks through an eventfd and reads
  used entries; one queue pair, RX = queue 0, TX = queue 1, one descriptor
  per buffer; the rings are run by the ring layer's
  :class:`~vhostlab.ring.driver.VirtqueueDriver`, or with ``ring="packed"``
  its :class:`~vhostlab.ring.packed_driver.PackedVirtqueueDriver`, straight
  in the mapping;
* QEMU's **VirtIODevice** for :class:`~vhostlab.frontend.vhost_dev.VhostDev`:
  where each queue lives (GPAs), its size, its ``last_avail_idx`` (the
  device-side number GET_VRING_BASE returns and SET_VRING_BASE restores; for
  a packed ring with both wrap counters and the used index, encoded as QEMU's
  virtio_queue_packed_get_last_avail_idx does), the
  host notifier (kick) and guest notifier (call) eventfds, and the guest's RAM.

Every write the guest makes to its RAM goes through :meth:`BuiltinVirtioNetGuest.write`
or :meth:`BuiltinVirtioNetGuest.touch` (the ring driver's write hook), which
mark the page in ``guest_dirty``: that is
what QEMU's own migration dirty bitmap sees of a guest (writes made by vCPUs
through QEMU). Writes made by the back-end are not seen here: that is exactly
what the vhost dirty log is for.

Layout (guest-physical): the RX ring at 0x200000, the TX ring at 0x210000
(split: legacy layout, used ring at the next 4 KiB; packed: the descriptor
ring, then the driver and device event areas), RX buffers from 0x400000 and TX
buffers from 0x600000, ``BUF_SIZE`` bytes each.
"""
from __future__ import annotations

import os
import select
from dataclasses import dataclass

import numpy as np

from vhostlab.memory import TARGET_PAGE_SIZE, GuestMemory
from vhostlab.protocol import Feature
from vhostlab.ring.driver import GuestDriverError, MappedRingMemory, RingDriver, VirtqueueDriver
from vhostlab.ring.layout import vring_avail_size, vring_layout, vring_used_size
from vhostlab.ring.packed_driver import PackedVirtqueueDriver, packed_vring_layout
from vhostlab.ring.packed_layout import (VRING_PACKED_EVENT_SIZE, packed_vring_base,
                                         parse_packed_vring_base)

__all__ = ["BuiltinVirtioNetGuest", "GuestQueue", "GuestDriverError", "RX_QUEUE", "TX_QUEUE",
           "BUF_SIZE", "DRIVER_FEATURES", "RINGS"]

RX_QUEUE, TX_QUEUE = 0, 1
BUF_SIZE = 2048
RING_GPA = {RX_QUEUE: 0x200000, TX_QUEUE: 0x210000}
BUF_GPA = {RX_QUEUE: 0x400000, TX_QUEUE: 0x600000}
MIN_RAM = 0x800000
# What this driver accepts of what the device offers.
# One buffer holds any frame here, so MRG_RXBUF (frames spread over several
# buffers) is not needed.
DRIVER_FEATURES = int(Feature.VIRTIO_F_VERSION_1 | Feature.VIRTIO_NET_F_MAC
                      | Feature.VIRTIO_NET_F_STATUS)
RINGS = ("split", "packed")     # the ring formats this driver runs (VIRTIO_F_RING_PACKED)


@dataclass
class GuestQueue:
    """One virtqueue: the driver's side (:attr:`driver`, the ring layer's
    VirtqueueDriver or PackedVirtqueueDriver) and the device state QEMU keeps
    for it. For a packed ring ``avail`` and ``used`` are the driver and
    device event areas (SET_VRING_ADDR carries them there)."""

    index: int
    num: int
    desc: int
    avail: int
    used: int
    driver: RingDriver
    packed: bool = False
    last_avail_idx: int = 0                      # device state (VirtQueue.last_avail_idx)
    last_avail_wrap_counter: int = 1             # packed only, as QEMU's VirtQueue keeps
    used_idx: int = 0
    used_wrap_counter: int = 1
    kick_fd: int = -1                            # host notifier
    call_fd: int = -1                            # guest notifier
    kicks: int = 0
    interrupts: int = 0

    # What the driver keeps, under the names the tests and the labs' ring views read.
    free = property(lambda q: q.driver.free, doc="Free descriptor ids.")
    last_used_idx = property(lambda q: q.driver.last_used_idx,
                             doc="The next used entry the driver reads.")
    inflight = property(lambda q: q.driver.chains, doc="Chains in flight: head -> descriptor ids.")

    def slot(self, head: int) -> int:
        """GPA of the buffer that goes with descriptor (packed: buffer id) ``head``."""
        return BUF_GPA[self.index] + head * BUF_SIZE

    @property
    def ring_size(self) -> int:
        """Bytes from the descriptor table to the end of the used ring (packed:
        of the device event area)."""
        return self.used + (VRING_PACKED_EVENT_SIZE if self.packed
                            else vring_used_size(self.num)) - self.desc

    def vring_base(self) -> int:
        """The number SET_VRING_BASE sends: last_avail_idx, or for a packed ring
        the four parts in 32 bits (QEMU's virtio_queue_packed_get_last_avail_idx)."""
        if not self.packed:
            return self.last_avail_idx
        return packed_vring_base(self.last_avail_idx, self.last_avail_wrap_counter,
                                 self.used_idx, self.used_wrap_counter)

    def set_vring_base(self, num: int) -> None:
        """Keep what GET_VRING_BASE returned (QEMU's virtio_queue_set_last_avail_idx)."""
        if not self.packed:
            self.last_avail_idx = num
            return
        base = parse_packed_vring_base(num)
        self.last_avail_idx, self.last_avail_wrap_counter = base[0], base[1]
        self.used_idx, self.used_wrap_counter = base[2], base[3]


class BuiltinVirtioNetGuest:
    """The built-in guest: ``ram_size`` bytes of memfd RAM (QEMU pc layout) and
    a virtio-net driver, reaching its rings directly in the mapping. ``ring``
    is "split" or "packed" (the driver then accepts VIRTIO_F_RING_PACKED)."""

    def __init__(self, ram_size: int = 16 << 20, queue_size: int = 256,
                 memory: GuestMemory | None = None, ring: str = "split"):
        if ring not in RINGS:
            raise GuestDriverError(f"not a ring format this driver runs, expected one of "
                                   f"{RINGS}", field="ring", value=ring)
        if ram_size < MIN_RAM:
            raise GuestDriverError("below the size the layout needs", field="ram_size",
                                   value=ram_size, limit=MIN_RAM)
        if queue_size & (queue_size - 1) or not 2 <= queue_size <= 256:
            raise GuestDriverError(f"a power of two in [2, 256] (buffers are {BUF_SIZE} "
                                   "bytes in a fixed area)", field="queue_size",
                                   value=queue_size, limit=256)
        self.memory = memory if memory is not None else GuestMemory.allocate(
            ram_size, reserve=4 * ram_size + (64 << 20))
        self.ram_size = ram_size
        self.npages = self._top_page() + 1
        self.guest_dirty = np.zeros(self.npages, dtype=bool)
        self.guest_features = 0
        self.hdr_len = 12
        self.ring = ring
        self.queues = []
        packed = ring == "packed"
        ram = MappedRingMemory(self.memory, on_write=self.touch)
        for q in (RX_QUEUE, TX_QUEUE):
            # Fresh memfd RAM is zero: nothing to clear (and no page to mark); a
            # zero packed ring is one whose wrap counters start at 1.
            # Ids from the top first, so the labs show them last.
            if packed:
                lay = packed_vring_layout(RING_GPA[q], queue_size)
                driver = PackedVirtqueueDriver(ram, queue_size, lay.desc, lay.avail, lay.used,
                                               queue=q, top_first=True, clear=False)
            else:
                lay = vring_layout(RING_GPA[q], queue_size)
                driver = VirtqueueDriver(ram, queue_size, lay.desc, lay.avail, lay.used,
                                         queue=q, top_first=True, clear=False)
            self.queues.append(GuestQueue(q, queue_size, lay.desc, lay.avail, lay.used, driver,
                                          packed))
        self._new_notifiers()

    def _top_page(self) -> int:
        return max((r.guest_phys_addr + r.memory_size - 1) // TARGET_PAGE_SIZE
                   for r in self.memory.regions)

    def _new_notifiers(self) -> None:
        for q in self.queues:
            q.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            q.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def _close_notifiers(self) -> None:
        for q in self.queues:
            for name in ("kick_fd", "call_fd"):
                fd = getattr(q, name)
                if fd >= 0:
                    os.close(fd)
                    setattr(q, name, -1)

    # -- guest writes: tracked ---------------------------------------------------
    def touch(self, gpa: int, length: int) -> None:
        """Mark the pages of [gpa, gpa + length) written by the guest."""
        if length > 0:
            first, last = gpa // TARGET_PAGE_SIZE, (gpa + length - 1) // TARGET_PAGE_SIZE
            self.guest_dirty[first:last + 1] = True

    def write(self, gpa: int, data: bytes) -> None:
        """A guest (vCPU) write to RAM: store it and mark its pages."""
        self.memory.write(gpa, data)
        self.touch(gpa, len(data))

    def take_guest_dirty(self) -> np.ndarray:
        """Pages the guest wrote since the last call (and clear the set)."""
        pages = np.flatnonzero(self.guest_dirty).astype(np.uint64)
        self.guest_dirty[:] = False
        return pages

    # -- device set-up (what the driver negotiates) -------------------------------
    def negotiate(self, offered: int) -> int:
        """Accept DRIVER_FEATURES & ``offered`` (and VIRTIO_F_RING_PACKED when the
        rings are packed); the header is 12 bytes with VERSION_1 or MRG_RXBUF,
        else 10 (virtio 5.1.6).

        Raises GuestDriverError when the rings are packed and the device does
        not offer VIRTIO_F_RING_PACKED (the driver cannot fall back: its rings
        are laid out already)."""
        accepted = DRIVER_FEATURES
        if self.ring == "packed":
            packed = int(Feature.VIRTIO_F_RING_PACKED)
            if not offered & packed:
                raise GuestDriverError(
                    "the device does not offer VIRTIO_F_RING_PACKED (bit 34), so this "
                    "guest's packed rings cannot run", field="offered features",
                    value=hex(offered), hint="use ring='split', or a back-end that offers "
                    "packed rings (DPDK's vhost back-end does)")
            accepted |= packed
        self.guest_features = offered & accepted
        modern = Feature.VIRTIO_F_VERSION_1 | Feature.VIRTIO_NET_F_MRG_RXBUF
        self.hdr_len = 12 if self.guest_features & modern else 10
        return self.guest_features

    # -- VirtIODevice accessors for VhostDev -----------------------------------------
    def virtio_queue_get_desc_addr(self, idx: int) -> int:
        return self.queues[idx].desc

    def virtio_queue_get_avail_addr(self, idx: int) -> int:
        return self.queues[idx].avail

    def virtio_queue_get_used_addr(self, idx: int) -> int:
        return self.queues[idx].used

    def virtio_queue_get_num(self, idx: int) -> int:
        return self.queues[idx].num

    def virtio_queue_get_desc_size(self, idx: int) -> int:
        return 16 * self.queues[idx].num

    def virtio_queue_get_avail_size(self, idx: int) -> int:
        q = self.queues[idx]
        return VRING_PACKED_EVENT_SIZE if q.packed else vring_avail_size(q.num)

    def virtio_queue_get_used_size(self, idx: int) -> int:
        q = self.queues[idx]
        return VRING_PACKED_EVENT_SIZE if q.packed else vring_used_size(q.num)

    def virtio_queue_get_last_avail_idx(self, idx: int) -> int:
        return self.queues[idx].vring_base()

    def virtio_queue_set_last_avail_idx(self, idx: int, value: int) -> None:
        self.queues[idx].set_vring_base(value)

    def host_notifier_fd(self, idx: int) -> int:
        return self.queues[idx].kick_fd

    def guest_notifier_fd(self, idx: int) -> int:
        return self.queues[idx].call_fd

    # -- the driver ------------------------------------------------------------------
    def kick(self, q: GuestQueue) -> None:
        """Notify the device: one write to the queue's host notifier (eventfd)."""
        os.eventfd_write(q.kick_fd, 1)
        q.kicks += 1

    def post_rx_buffers(self, n: int | None = None) -> int:
        """Post up to ``n`` empty RX buffers (all free ones by default), then kick."""
        q = self.queues[RX_QUEUE]
        count = q.driver.num_free if n is None else min(n, q.driver.num_free)
        if count:
            q.driver.add_buffers([[(q.slot(head), BUF_SIZE, True)]
                                  for head in q.driver.next_free(count)])
            q.driver.publish()
            self.kick(q)
        return count

    def transmit(self, frames) -> int:
        """Put each frame (behind a zeroed virtio-net header) in a TX buffer, publish, kick."""
        q = self.queues[TX_QUEUE]
        self.reap(TX_QUEUE)
        frames = list(frames)
        for frame in frames:
            if len(frame) + self.hdr_len > BUF_SIZE:
                raise GuestDriverError(f"frame of {len(frame)} bytes does not fit a "
                                       f"{BUF_SIZE}-byte TX buffer with its header")
        frames = frames[:q.driver.num_free]
        chains = []
        for frame, head in zip(frames, q.driver.next_free(len(frames))):
            self.write(q.slot(head), bytes(self.hdr_len) + frame)
            chains.append([(q.slot(head), self.hdr_len + len(frame), False)])
        if chains:
            q.driver.add_buffers(chains)
            q.driver.publish()
            self.kick(q)
        return len(chains)

    def used_idx(self, idx: int) -> int:
        """The device's used->idx as the guest reads it now (acquire); a packed
        ring has none (GuestDriverError: use :meth:`pending_used`)."""
        return self.queues[idx].driver.used_idx()

    def pending_used(self, idx: int) -> int:
        """Used entries the device returned on queue ``idx`` and the guest has
        not read yet (either ring format)."""
        return self.queues[idx].driver.pending_used()

    def reap(self, idx: int) -> list[tuple[int, int, int]]:
        """Used entries the device returned since the last call: (id, len, buffer gpa).

        An entry naming a descriptor that is not in flight is skipped and
        reported as ``(id, len, -1)``: the ring's memory is not what the guest
        left (as when RAM arrived stale from a migration). So is a used->idx
        more than ``num`` entries away: GuestDriverError.
        """
        q = self.queues[idx]
        self._drain_call(q)
        return [(head, length, -1 if ids is None else q.slot(head))
                for head, length, ids in q.driver.pop_used()]

    def receive(self) -> list[bytes]:
        """Frames the device put in RX buffers (header stripped), read from guest RAM."""
        frames = []
        for head, length, gpa in self.reap(RX_QUEUE):
            if gpa < 0 or not self.hdr_len <= length <= BUF_SIZE:
                frames.append(b"")      # not a frame this guest can read: corrupted
                continue
            frames.append(self.memory.read(gpa + self.hdr_len, length - self.hdr_len))
        return frames

    def _drain_call(self, q: GuestQueue) -> None:
        try:
            q.interrupts += os.eventfd_read(q.call_fd)
        except BlockingIOError:
            pass

    def wait_call(self, idx: int, timeout: float) -> bool:
        """Sleep until the device signals queue ``idx``'s call eventfd (or ``timeout``)."""
        ready, _, _ = select.select([self.queues[idx].call_fd], [], [], timeout)
        return bool(ready)

    # -- migration ---------------------------------------------------------------------
    def move_to(self, memory: GuestMemory) -> None:
        """Continue on ``memory`` (the destination's RAM) with fresh notifiers.

        What moves with the guest is its CPU-side state: the driver's shadow
        indices and buffer bookkeeping, and the device state QEMU migrates
        (each queue's last_avail_idx). Everything in RAM comes from the copy.
        """
        self._close_notifiers()
        self.memory = memory
        ram = MappedRingMemory(memory, on_write=self.touch)
        for q in self.queues:
            q.driver.bind(ram)
        self.guest_dirty[:] = False
        self._new_notifiers()

    def close(self, close_memory: bool = True) -> None:
        """Close the notifiers and (by default) the guest's RAM."""
        for q in self.queues:
            q.driver.close()
        self._close_notifiers()
        if close_memory and self.memory is not None:
            self.memory.close()
