"""The built-in guest: memfd RAM in QEMU's regions and a virtio-net driver over split rings.

It plays two parts that QEMU keeps apart:

* the **guest**: a virtio-net driver (Linux's virtio_net, very much reduced)
  that posts RX buffers, transmits frames, kicks through an eventfd and reads
  used entries; one queue pair, RX = queue 0, TX = queue 1, one descriptor
  per buffer;
* QEMU's **VirtIODevice** for :class:`~vhostlab.frontend.vhost_dev.VhostDev`:
  where each queue lives (GPAs), its size, its ``last_avail_idx`` (the
  device-side number GET_VRING_BASE returns and SET_VRING_BASE restores), the
  host notifier (kick) and guest notifier (call) eventfds, and the guest's RAM.

Every write the guest makes to its RAM goes through :meth:`VirtioNetGuest.write`
or :meth:`VirtioNetGuest.touch`, which mark the page in ``guest_dirty``: that is
what QEMU's own migration dirty bitmap sees of a guest (writes made by vCPUs
through QEMU). Writes made by the back-end are not seen here: that is exactly
what the vhost dirty log is for.

Layout (guest-physical): the RX ring at 0x200000, the TX ring at 0x210000
(legacy layout: used ring at the next 4 KiB), RX buffers from 0x400000 and TX
buffers from 0x600000, ``BUF_SIZE`` bytes each.
"""
from __future__ import annotations

from ..errors import VhostlabError

import os
import select
from dataclasses import dataclass, field

import numpy as np

from vhostlab.memory import TARGET_PAGE_SIZE, GuestMemory
from vhostlab.protocol import Feature
from vhostlab.ring.atomics import smp_load_acquire, smp_store_release
from vhostlab.ring.layout import (VRING_DESC_F_WRITE, vring_avail_size, vring_layout,
                                  vring_used_size, vring_views)

__all__ = ["VirtioNetGuest", "GuestQueue", "GuestError", "RX_QUEUE", "TX_QUEUE", "BUF_SIZE",
           "DRIVER_FEATURES"]

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


class GuestError(VhostlabError):
    """The guest driver met something it cannot use (names queue, field, value)."""


@dataclass
class GuestQueue:
    """The driver's side of one virtqueue, plus the device state QEMU keeps for it."""

    index: int
    num: int
    desc: int
    avail: int
    used: int
    free: list = field(default_factory=list)     # free descriptor ids
    avail_idx: int = 0                           # driver's shadow of avail->idx
    last_used_idx: int = 0                       # next used entry the driver reads
    inflight: dict = field(default_factory=dict)  # descriptor id -> (buffer gpa, length)
    last_avail_idx: int = 0                      # device state (VirtQueue.last_avail_idx)
    kick_fd: int = -1                            # host notifier
    call_fd: int = -1                            # guest notifier
    kicks: int = 0
    interrupts: int = 0


class VirtioNetGuest:
    """A guest with ``ram_size`` bytes of memfd RAM (QEMU pc layout) and a virtio-net driver."""

    def __init__(self, ram_size: int = 16 << 20, queue_size: int = 256,
                 memory: GuestMemory | None = None):
        if ram_size < MIN_RAM:
            raise GuestError(f"ram_size {ram_size:#x} is below the {MIN_RAM:#x} the layout needs")
        if queue_size & (queue_size - 1) or not 2 <= queue_size <= 256:
            raise GuestError(f"queue_size {queue_size}: a power of two in [2, 256] "
                             f"(buffers are {BUF_SIZE} bytes in a fixed area)")
        self.memory = memory if memory is not None else GuestMemory.allocate(
            ram_size, reserve=4 * ram_size + (64 << 20))
        self.ram_size = ram_size
        self.npages = self._top_page() + 1
        self.guest_dirty = np.zeros(self.npages, dtype=bool)
        self.guest_features = 0
        self.hdr_len = 12
        self.queues = []
        for q in (RX_QUEUE, TX_QUEUE):
            lay = vring_layout(RING_GPA[q], queue_size)
            self.queues.append(GuestQueue(q, queue_size, lay.desc, lay.avail, lay.used,
                                          free=list(range(queue_size))))
        self._views = [None, None]
        self._new_notifiers()
        self._bind()

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

    def _bind(self) -> None:
        self._views = [vring_views(self.memory, q.num, q.desc, q.avail, q.used)
                       for q in self.queues]

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
        """Accept DRIVER_FEATURES & ``offered``; the header is 12 bytes with
        VERSION_1 or MRG_RXBUF, else 10 (virtio 5.1.6)."""
        self.guest_features = offered & DRIVER_FEATURES
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
        return vring_avail_size(self.queues[idx].num)

    def virtio_queue_get_used_size(self, idx: int) -> int:
        return vring_used_size(self.queues[idx].num)

    def virtio_queue_get_last_avail_idx(self, idx: int) -> int:
        return self.queues[idx].last_avail_idx

    def virtio_queue_set_last_avail_idx(self, idx: int, value: int) -> None:
        self.queues[idx].last_avail_idx = value

    def host_notifier_fd(self, idx: int) -> int:
        return self.queues[idx].kick_fd

    def guest_notifier_fd(self, idx: int) -> int:
        return self.queues[idx].call_fd

    # -- the driver ------------------------------------------------------------------
    def _add_buffer(self, q: GuestQueue, gpa: int, length: int, writable: bool) -> int:
        if not q.free:
            raise GuestError(f"queue {q.index}: no free descriptor (all {q.num} in flight)")
        views = self._views[q.index]
        head = q.free.pop()
        d = views.desc[head]
        d["addr"], d["len"] = gpa, length
        d["flags"], d["next"] = VRING_DESC_F_WRITE if writable else 0, 0
        self.touch(q.desc + 16 * head, 16)
        slot = q.avail_idx % q.num
        views.avail_ring[slot] = head
        self.touch(q.avail + 4 + 2 * slot, 2)
        q.inflight[head] = (gpa, length)
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        return head

    def _publish(self, q: GuestQueue) -> None:
        # virtio 2.7.13: descriptors and ring entries first, then avail->idx (release).
        smp_store_release(self._views[q.index].avail_idx, 0, np.uint16(q.avail_idx))
        self.touch(q.avail + 2, 2)

    def kick(self, q: GuestQueue) -> None:
        """Notify the device: one write to the queue's host notifier (eventfd)."""
        os.eventfd_write(q.kick_fd, 1)
        q.kicks += 1

    def post_rx_buffers(self, n: int | None = None) -> int:
        """Post up to ``n`` empty RX buffers (all free ones by default), then kick."""
        q = self.queues[RX_QUEUE]
        count = len(q.free) if n is None else min(n, len(q.free))
        for _ in range(count):
            head = q.free[-1]
            self._add_buffer(q, BUF_GPA[RX_QUEUE] + head * BUF_SIZE, BUF_SIZE, True)
        if count:
            self._publish(q)
            self.kick(q)
        return count

    def transmit(self, frames) -> int:
        """Put each frame (behind a zeroed virtio-net header) in a TX buffer, publish, kick."""
        q = self.queues[TX_QUEUE]
        self.reap(TX_QUEUE)
        sent = 0
        for frame in frames:
            if len(frame) + self.hdr_len > BUF_SIZE:
                raise GuestError(f"frame of {len(frame)} bytes does not fit a {BUF_SIZE}-byte "
                                 "TX buffer with its header")
            if not q.free:
                break
            head = q.free[-1]
            gpa = BUF_GPA[TX_QUEUE] + head * BUF_SIZE
            self.write(gpa, bytes(self.hdr_len) + frame)
            self._add_buffer(q, gpa, self.hdr_len + len(frame), False)
            sent += 1
        if sent:
            self._publish(q)
            self.kick(q)
        return sent

    def used_idx(self, idx: int) -> int:
        """The device's used->idx as the guest reads it now (acquire)."""
        return int(smp_load_acquire(self._views[idx].used_idx, 0))

    def reap(self, idx: int) -> list[tuple[int, int, int]]:
        """Used entries the device returned since the last call: (id, len, buffer gpa).

        An entry naming a descriptor that is not in flight is skipped and
        reported as ``(id, len, -1)``: the ring's memory is not what the guest left.
        """
        q = self.queues[idx]
        views = self._views[idx]
        self._drain_call(q)
        end = self.used_idx(idx)
        # virtio 2.7.8: the device never has more than num entries outstanding;
        # a used->idx further ahead (or behind) means the ring is not what the
        # guest left, as when RAM arrived stale from a migration.
        pending = (end - q.last_used_idx) & 0xFFFF
        if pending > q.num:
            raise GuestError(f"queue {q.index}: used.idx is {end} but the driver's "
                             f"last_used_idx is {q.last_used_idx}: {pending} entries apart "
                             f"(mod 2**16), more than num = {q.num}; the used ring is not "
                             "what the guest left")
        out = []
        while q.last_used_idx != end:
            elem = views.used_ring[q.last_used_idx % q.num]
            head, length = int(elem["id"]), int(elem["len"])
            q.last_used_idx = (q.last_used_idx + 1) & 0xFFFF
            buf = q.inflight.pop(head, None)
            if buf is None:
                out.append((head, length, -1))
                continue
            q.free.append(head)
            out.append((head, length, buf[0]))
        return out

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
        self._views = [None, None]
        self._close_notifiers()
        self.memory = memory
        self.guest_dirty[:] = False
        self._new_notifiers()
        self._bind()

    def close(self, close_memory: bool = True) -> None:
        """Close the notifiers and (by default) the guest's RAM."""
        self._views = [None, None]
        self._close_notifiers()
        if close_memory and self.memory is not None:
            self.memory.close()
