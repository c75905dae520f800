"""The guest's side of a split virtqueue, in plain Python (not a hot path).

What Linux's drivers/virtio/virtio_ring.c does, in miniature, for the
built-in front-end's guest and for tests: keep a free list of descriptors,
write a chain (or an indirect table), put its head in the avail ring, publish
avail->idx with a release store, and later collect used elements after an
acquire load of used->idx. Kicking and interrupts are the caller's business:
:meth:`VirtqueueDriver.kick_needed` says whether the device asked for a kick.

    drv = VirtqueueDriver(memory, 256, ring_gpa)       # legacy layout
    head = drv.add_buffer([(buf_gpa, 1526, True)])     # an RX buffer
    drv.publish()
    ...
    for head, length in drv.get_used(): ...
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .atomics import smp_load_acquire, smp_mb, smp_store_release
from .layout import (VIRTQUEUE_MAX_SIZE, VRING_DESC_DTYPE, VRING_DESC_F_INDIRECT,
                     VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
                     vring_avail_size, vring_desc_size, vring_layout, vring_need_event_py,
                     vring_used_size, vring_views)

__all__ = ["VirtqueueDriver"]


class VirtqueueDriver:
    """Driver (guest) side of one split virtqueue over guest memory.

    ``desc``, ``avail``, ``used`` are GPAs; with ``avail``/``used`` omitted the
    legacy layout (``vring_layout(desc, num, align)``) is used. The ring is
    zeroed on creation. The driver holds numpy views of guest memory:
    :meth:`close` it before closing the memory.
    """

    def __init__(self, memory, num: int, desc: int, avail: int | None = None,
                 used: int | None = None, *, align: int = 4096,
                 event_idx: bool = False) -> None:
        if not (1 <= num <= VIRTQUEUE_MAX_SIZE and num & (num - 1) == 0):
            raise ValueError(f"num = {num}: must be a power of 2 up to {VIRTQUEUE_MAX_SIZE}")
        if avail is None or used is None:
            layout = vring_layout(desc, num, align)
            avail, used = layout.avail, layout.used
        self.memory, self.num = memory, num
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc, avail, used
        self.event_idx = event_idx
        self.views = vring_views(memory, num, desc, avail, used)
        # uint16 views for the ordered accesses to the two indices
        self._avail16 = memory.view(avail, vring_avail_size(num)).view(np.uint16)
        self._used16 = memory.view(used, vring_used_size(num)).view(np.uint16)
        self.reset()

    def reset(self, start: int = 0) -> None:
        """Zero the ring and free every descriptor. With ``start``, both
        indices begin there, as in a ring that has been running (the device
        must then be given the same base with SET_VRING_BASE)."""
        for gpa, size in ((self.desc_gpa, vring_desc_size(self.num)),
                          (self.avail_gpa, vring_avail_size(self.num)),
                          (self.used_gpa, vring_used_size(self.num))):
            self.memory.write(gpa, bytes(size))
        start &= 0xFFFF
        self.views.avail_idx[0] = self.views.used_idx[0] = start
        self._free = list(range(self.num - 1, -1, -1))
        self._chains: dict[int, list[int]] = {}
        self.avail_idx = start    # shadow: entries added, published or not
        self._published = start
        self._kicked = start      # avail idx at the last kick decision
        self.last_used_idx = start

    @property
    def num_free(self) -> int:
        return len(self._free)

    def add_buffer(self, segments: Sequence[tuple[int, int, bool]], *,
                   indirect: int | None = None) -> int:
        """Add one chain of ``(gpa, len, device_writable)`` segments.

        With ``indirect`` (the GPA of 16 * len(segments) bytes of guest memory
        for the table) the chain goes in an indirect table and takes one ring
        descriptor. Returns the head; the device sees it after :meth:`publish`.
        """
        if not segments:
            raise ValueError("a chain needs at least one segment")
        needed = 1 if indirect is not None else len(segments)
        if needed > len(self._free):
            raise ValueError(f"{needed} descriptors needed, {len(self._free)} free")
        entries = [(gpa, length, (VRING_DESC_F_WRITE if writable else 0))
                   for gpa, length, writable in segments]
        if indirect is not None:
            table = self.memory.view(indirect, 16 * len(entries)).view(VRING_DESC_DTYPE)
            for i, (gpa, length, flags) in enumerate(entries):
                last = i == len(entries) - 1
                table[i] = (gpa, length, flags | (0 if last else VRING_DESC_F_NEXT),
                            0 if last else i + 1)
            entries = [(indirect, 16 * len(entries), VRING_DESC_F_INDIRECT)]
        ids = [self._free.pop() for _ in entries]
        for k, (gpa, length, flags) in enumerate(entries):
            last = k == len(entries) - 1
            self.views.desc[ids[k]] = (gpa, length, flags | (0 if last else VRING_DESC_F_NEXT),
                                       0 if last else ids[k + 1])
        head = ids[0]
        self._chains[head] = ids
        self.views.avail_ring[self.avail_idx % self.num] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def publish(self) -> None:
        """Make added chains visible: avail->idx with a release store, after
        the descriptors and ring entries (2.7.13.3)."""
        smp_store_release(self._avail16, 1, np.uint16(self.avail_idx))
        self._published = self.avail_idx

    def kick_needed(self) -> bool:
        """After :meth:`publish`: does the device want a notification?

        EVENT_IDX: vring_need_event(avail_event, new, old) over the entries
        published since the last decision; otherwise, unless the device set
        VRING_USED_F_NO_NOTIFY.
        """
        smp_mb()          # our avail->idx store before the device's fields
        old, new = self._kicked, self._published
        self._kicked = new
        if self.event_idx:
            return vring_need_event_py(int(self.views.avail_event[0]), new, old)
        return not (int(self.views.used_flags[0]) & VRING_USED_F_NO_NOTIFY)

    def get_used(self) -> list[tuple[int, int]]:
        """Collect the chains the device returned: ``[(head, len), ...]``."""
        used_idx = int(smp_load_acquire(self._used16, 1))
        done = []
        while self.last_used_idx != used_idx:
            elem = self.views.used_ring[self.last_used_idx % self.num]
            head, length = int(elem["id"]), int(elem["len"])
            ids = self._chains.pop(head, None)
            if ids is None:
                raise ValueError(f"the device returned head {head}, which is not in flight")
            self._free.extend(reversed(ids))
            done.append((head, length))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        if self.event_idx:
            # used_event: interrupt me when the device passes what I have seen
            self.views.used_event[0] = self.last_used_idx
        return done

    @property
    def in_flight(self) -> int:
        """Chains added and not yet returned."""
        return len(self._chains)

    def close(self) -> None:
        """Drop the views of guest memory (they keep it mapped, see
        GuestMemory.close). The driver is unusable afterwards."""
        self.views = self._avail16 = self._used16 = None
