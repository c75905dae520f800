"""The guest's side of a split virtqueue: the kit's one split-ring driver (not a hot path).

What Linux's drivers/virtio/virtio_ring.c does, in miniature: keep a free
list of descriptors, write a chain (or an indirect table), put its head in
the avail ring, publish avail->idx, and later collect used elements. Kicking
and interrupts are the caller's business: :meth:`VirtqueueDriver.kick_needed`
says whether the device asked for a kick (EVENT_IDX or VRING_USED_F_NO_NOTIFY).

Both guests drive their rings with it, over different ways into guest RAM
(a :class:`RingMemory`):

* the built-in guest (``frontend.guest``) and the ring layer's tests reach the
  memfd directly (:class:`MappedRingMemory`); a write hook marks the pages the
  guest wrote (QEMU's own dirty bitmap, which a migration copies by);
* the QEMU guest (``qemu.guest``) reads and writes guest RAM with qtest
  commands (``qemu.qtest.QTestRingMemory``); QEMU's migration sees those
  writes, and the connection's ``on_write`` hook reports them.

Memory ordering (virtio 2.7.13, Linux's virtio_store_mb / virtio_load_acquire):
avail->idx is stored with release after the descriptors and ring entries it
exposes; used->idx is loaded with acquire before the used elements; a full
barrier separates our avail->idx store from reading the device's avail_event
or used flags. :class:`MappedRingMemory` does these with real atomics; over
qtest QEMU orders them itself (each command is carried out and answered
before the next is sent; see QTestRingMemory).

    drv = VirtqueueDriver(memory, 256, ring_gpa)       # legacy layout
    head = drv.add_buffer([(buf_gpa, 1526, True)])     # an RX buffer
    drv.publish()
    ...
    for head, length in drv.get_used(): ...
"""
from __future__ import annotations

import struct
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np

from ..errors import VhostlabError
from .atomics import smp_load_acquire, smp_mb, smp_store_release
from .layout import (VIRTQUEUE_MAX_SIZE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                     VRING_DESC_F_WRITE, VRING_USED_ELEM_DTYPE, VRING_USED_F_NO_NOTIFY,
                     vring_avail_size, vring_desc_size, vring_layout, vring_need_event_py,
                     vring_used_size, vring_views)

__all__ = ["VirtqueueDriver", "RingDriver", "UsedElem", "RingMemory", "MappedRingMemory",
           "GuestDriverError", "write_runs"]

_DESC = struct.Struct("<QIHH")


class GuestDriverError(VhostlabError):
    """A guest's virtio driver met a ring, a device state or a request it cannot use.

    Raised by both guests (built-in and QEMU). ``message`` is the sentence
    with its fields, ``hint`` (or None) what to do about it.
    """

    def __init__(self, message: str, *, hint: str | None = None, **fields) -> None:
        super().__init__(message, **fields)
        self.message = VhostlabError.render(self)
        self.hint = hint

    def render(self) -> str:
        text = super().render()
        return f"{text}\nWhat to do: {self.hint}" if self.hint else text


class UsedElem(NamedTuple):
    """One used-ring element as the device wrote it: chain head ``id``, bytes written ``len``."""

    id: int
    len: int


class RingMemory(Protocol):
    """What the driver needs of guest RAM: bytes and little-endian u16 at a GPA.

    The three ordered accesses carry the driver's memory-ordering points.
    ``view`` (optional) gives numpy views, for :attr:`VirtqueueDriver.views`.
    """

    def read(self, gpa: int, n: int) -> bytes: ...
    def write(self, gpa: int, data: bytes) -> None: ...
    def memset(self, gpa: int, n: int, byte: int) -> None: ...
    def readw(self, gpa: int) -> int: ...
    def writew(self, gpa: int, value: int) -> None: ...
    def load_acquire_w(self, gpa: int) -> int: ...
    def store_release_w(self, gpa: int, value: int) -> None: ...
    def mb(self) -> None: ...


class MappedRingMemory:
    """A :class:`RingMemory` over mapped guest RAM (a GuestMemory): plain copies,
    and real acquire/release/full barriers for the ordered accesses.

    ``on_write(gpa, length)`` is called after every write (the built-in guest
    marks those pages in its dirty set).
    """

    def __init__(self, memory, on_write: Callable[[int, int], None] | None = None) -> None:
        self.memory = memory
        self.on_write = on_write

    def _wrote(self, gpa: int, n: int) -> None:
        if self.on_write is not None and n:
            self.on_write(gpa, n)

    def read(self, gpa: int, n: int) -> bytes:
        return self.memory.read(gpa, n)

    def write(self, gpa: int, data: bytes) -> None:
        self.memory.write(gpa, data)
        self._wrote(gpa, len(data))

    def memset(self, gpa: int, n: int, byte: int) -> None:
        self.write(gpa, bytes([byte]) * n)

    def readw(self, gpa: int) -> int:
        return int.from_bytes(self.memory.read(gpa, 2), "little")

    def writew(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(2, "little"))

    def _u16(self, gpa: int) -> np.ndarray:
        return self.memory.view(gpa, 2).view(np.uint16)

    def load_acquire_w(self, gpa: int) -> int:
        return int(smp_load_acquire(self._u16(gpa), 0))

    def store_release_w(self, gpa: int, value: int) -> None:
        smp_store_release(self._u16(gpa), 0, np.uint16(value))
        self._wrote(gpa, 2)

    def mb(self) -> None:
        smp_mb()

    def view(self, gpa: int, n: int) -> np.ndarray:
        return self.memory.view(gpa, n)


def ring_memory(memory) -> RingMemory:
    """``memory`` as a RingMemory: itself if it is one, else mapped RAM (a GuestMemory)."""
    return memory if hasattr(memory, "store_release_w") else MappedRingMemory(memory)


def _link(entries: Sequence[tuple[int, int, int]], ids: Sequence[int]) -> dict[int, bytes]:
    """Descriptors ``ids[i]`` for ``entries[i]`` = (addr, len, flags), each
    chained to the next with VRING_DESC_F_NEXT: id -> 16 bytes."""
    out = {}
    for i, (gpa, length, flags) in enumerate(entries):
        last = i == len(entries) - 1
        out[ids[i]] = _DESC.pack(gpa, length, flags | (0 if last else VRING_DESC_F_NEXT),
                                 0 if last else ids[i + 1])
    return out


def write_runs(ram: RingMemory, base: int, size: int, items: dict[int, bytes]) -> None:
    """Write ``items`` (index -> bytes) at ``base + size * index``, one write
    per run of consecutive indices (a qtest command each)."""
    run: list[int] = []
    for i in sorted(items) + [None]:
        if run and (i is None or i != run[-1] + 1):
            ram.write(base + size * run[0], b"".join(items[j] for j in run))
            run = []
        if i is not None:
            run.append(i)


class RingDriver:
    """What every ring format's driver keeps alike: the guest memory it reaches
    (:meth:`bind`), the free list ``_free`` (the next id handed out last), the
    chains in flight ``_chains`` (id -> descriptors), and the checks on a
    request. A format defines ``num_free``, ``add_buffers``, ``publish``,
    ``kick_needed``, ``pop_used``, ``pending_used``, ``reset`` and ``_views``.
    """

    num: int
    queue: int | None
    _free: list[int]
    _chains: dict[int, list[int]]

    def _init(self, memory, num: int, queue: int | None, event_idx: bool, top_first: bool,
              clear: bool) -> None:
        """The constructors' common part, once the ring's GPAs are set."""
        self.num, self.queue = num, queue
        self.event_idx, self.top_first = event_idx, top_first
        self.bind(memory)
        self.reset(clear=clear)

    @staticmethod
    def _name(queue: int | None) -> str:
        return "virtqueue" if queue is None else f"queue {queue}"

    def bind(self, memory) -> None:
        """Reach the ring through ``memory`` from now on (a migration's destination
        RAM); the driver's bookkeeping stays as it is."""
        self.ram = ring_memory(memory)
        self.memory = getattr(self.ram, "memory", memory)
        self.views = self._views() if hasattr(self.ram, "view") else None

    def _views(self):
        raise NotImplementedError

    @property
    def num_free(self) -> int:
        raise NotImplementedError

    @property
    def free(self) -> list[int]:
        """The free ids, the next one handed out last (a copy)."""
        return list(self._free)

    def next_free(self, n: int, *, what: str = "") -> list[int]:
        """The ids the next ``n`` one-descriptor chains will get, in order (none is taken).

        For guests whose buffer slot is tied to the id: write the buffers
        first, then add them. ``what`` starts the error message when fewer
        are free."""
        if n > self.num_free:
            self._no_room(n, what)
        return self._free[::-1][:n]

    @property
    def chains(self) -> dict[int, list[int]]:
        """Chains in flight: id -> its descriptors (a copy)."""
        return {h: list(ids) for h, ids in self._chains.items()}

    @property
    def in_flight(self) -> int:
        """Chains added and not yet returned."""
        return len(self._chains)

    def _no_room(self, needed: int, what: str) -> None:
        raise GuestDriverError(
            f"{self._name(self.queue)}: {what}needs {needed} descriptors, "
            f"{self.num_free} free of {self.num}",
            hint="reap used buffers first")

    def _check_chains(self, chains, indirect) -> None:
        """Every chain has a segment, and the ring has room for them all."""
        if any(not segs for segs in chains):
            raise GuestDriverError(f"{self._name(self.queue)}: a chain needs at least "
                                   "one segment")
        needed = len(chains) if indirect is not None else sum(len(s) for s in chains)
        if needed > self.num_free:
            self._no_room(needed, "")

    def _ring_entries(self, segs: Sequence[tuple[int, int, bool]],
                      table_gpa: int | None) -> list[tuple[int, int, int]]:
        """(addr, len, flags) of one chain's ring descriptors; with ``table_gpa``
        its segments go in an indirect table written there, and the ring gets
        one INDIRECT descriptor."""
        entries = [(gpa, length, VRING_DESC_F_WRITE if writable else 0)
                   for gpa, length, writable in segs]
        if table_gpa is None:
            return entries
        table = self._indirect_table(entries)
        self.ram.write(table_gpa, table)
        return [(table_gpa, len(table), VRING_DESC_F_INDIRECT)]

    def _indirect_table(self, entries: Sequence[tuple[int, int, int]]) -> bytes:
        raise NotImplementedError

    def add_buffer(self, segments: Sequence[tuple[int, int, bool]], *,
                   indirect: int | None = None) -> int:
        """Add one chain of ``(gpa, len, device_writable)`` segments.

        With ``indirect`` (the GPA of 16 * len(segments) bytes of guest memory
        for the table) the chain goes in an indirect table and takes one ring
        descriptor. Returns its id; the device sees it after ``publish``.
        """
        return self.add_buffers([segments], indirect=None if indirect is None else [indirect])[0]

    def pop_used(self) -> list[tuple[int, int, list[int] | None]]:
        raise NotImplementedError

    def get_used(self) -> list[UsedElem]:
        """Collect the chains the device returned: ``[(id, len), ...]``.

        Raises GuestDriverError on an id that is not in flight.
        """
        out = []
        for head, length, ids in self.pop_used():
            if ids is None:
                raise GuestDriverError(
                    f"{self._name(self.queue)}: the device returned head {head}, "
                    "which is not in flight")
            out.append(UsedElem(head, length))
        return out

    def close(self) -> None:
        """Drop the views of guest memory (they keep it mapped, see
        GuestMemory.close). The driver is unusable afterwards."""
        self.views = self.ram = None


class VirtqueueDriver(RingDriver):
    """Driver (guest) side of one split virtqueue over guest memory.

    ``memory`` is a GuestMemory or any :class:`RingMemory`. ``desc``,
    ``avail``, ``used`` are GPAs; with ``avail``/``used`` omitted the legacy
    layout (``vring_layout(desc, num, align)``) is used. The ring is zeroed on
    creation unless ``clear=False`` (memory known to be zero, or a ring taken
    over). ``queue`` names the queue in errors. Descriptors are handed out
    from 0 up, or with ``top_first`` from ``num - 1`` down; a returned chain's
    descriptors are the next handed out (Linux's free list).

    Over mapped memory the driver holds numpy views of the ring
    (:attr:`views`, for the labs): :meth:`close` it before closing the memory.
    """

    def __init__(self, memory, num: int, desc: int, avail: int | None = None,
                 used: int | None = None, *, align: int = 4096, event_idx: bool = False,
                 queue: int | None = None, top_first: bool = False, clear: bool = True) -> None:
        if not (1 <= num <= VIRTQUEUE_MAX_SIZE and num & (num - 1) == 0):
            raise GuestDriverError("not a power of 2", what=self._name(queue), field="num",
                                   value=num, limit=VIRTQUEUE_MAX_SIZE)
        if avail is None or used is None:
            layout = vring_layout(desc, num, align)
            avail, used = layout.avail, layout.used
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc, avail, used
        self._init(memory, num, queue, event_idx, top_first, clear)

    def _indirect_table(self, entries: Sequence[tuple[int, int, int]]) -> bytes:
        """A split indirect table: the entries chained 0, 1, ... with NEXT (2.7.5.3)."""
        return b"".join(_link(entries, range(len(entries))).values())

    def _views(self):
        return vring_views(self.ram, self.num, self.desc_gpa, self.avail_gpa, self.used_gpa)

    def reset(self, start: int = 0, *, clear: bool = True) -> None:
        """Free every descriptor and (with ``clear``) zero the ring. With
        ``start``, both indices begin there, as in a ring that has been running
        (the device must then be given the same base with SET_VRING_BASE)."""
        start &= 0xFFFF
        if clear:
            for gpa, size in ((self.desc_gpa, vring_desc_size(self.num)),
                              (self.avail_gpa, vring_avail_size(self.num)),
                              (self.used_gpa, vring_used_size(self.num))):
                self.ram.memset(gpa, size, 0)
            if start:
                self.ram.writew(self.avail_gpa + 2, start)
                self.ram.writew(self.used_gpa + 2, start)
        ids = range(self.num)
        self._free = list(ids if self.top_first else reversed(ids))   # pop() hands out
        self._chains: dict[int, list[int]] = {}
        self.avail_idx = start    # shadow: entries added, published or not
        self._published = start
        self._kicked = start      # avail idx at the last kick decision
        self.last_used_idx = start
        self._used_event = 0 if clear else None   # what used_event holds, if known

    # -- bookkeeping -----------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    # -- adding and publishing ---------------------------------------------------
    def add_buffers(self, chains: Sequence[Sequence[tuple[int, int, bool]]], *,
                    indirect: Sequence[int] | None = None) -> list[int]:
        """Add several chains (see :meth:`add_buffer`; ``indirect``: one table GPA
        per chain); returns their heads. Consecutive descriptors and avail
        entries go to guest memory in one write per run (one qtest command)."""
        self._check_chains(chains, indirect)
        descs: dict[int, bytes] = {}
        heads = []
        for k, segs in enumerate(chains):
            entries = self._ring_entries(segs, None if indirect is None else indirect[k])
            ids = [self._free.pop() for _ in entries]
            descs.update(_link(entries, ids))
            self._chains[ids[0]] = ids
            heads.append(ids[0])
        write_runs(self.ram, self.desc_gpa, 16, descs)
        slots = {}
        for head in heads:
            slots[self.avail_idx % self.num] = struct.pack("<H", head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        write_runs(self.ram, self.avail_gpa + 4, 2, slots)
        return heads

    def publish(self) -> None:
        """Make added chains visible: avail->idx with a release store, after
        the descriptors and ring entries (2.7.13.3)."""
        self.ram.store_release_w(self.avail_gpa + 2, self.avail_idx)
        self._published = self.avail_idx

    def kick_needed(self) -> bool:
        """After :meth:`publish`: does the device want a notification?

        EVENT_IDX: vring_need_event(avail_event, new, old) over the entries
        published since the last decision; otherwise, unless the device set
        VRING_USED_F_NO_NOTIFY.
        """
        self.ram.mb()          # our avail->idx store before the device's fields
        old, new = self._kicked, self._published
        self._kicked = new
        if self.event_idx:
            avail_event = self.ram.readw(self.used_gpa + 4 + 8 * self.num)
            return vring_need_event_py(avail_event, new, old)
        return not self.ram.readw(self.used_gpa) & VRING_USED_F_NO_NOTIFY

    # -- used buffers --------------------------------------------------------------
    def used_idx(self) -> int:
        """used->idx as the driver reads it now (acquire)."""
        return self.ram.load_acquire_w(self.used_gpa + 2)

    def pending_used(self) -> int:
        """Used entries the device returned and the driver has not collected."""
        return (self.used_idx() - self.last_used_idx) & 0xFFFF

    def pop_used(self) -> list[tuple[int, int, list[int] | None]]:
        """Take the used entries the device returned: ``[(head, len, chain), ...]``.

        ``chain`` is the head's descriptor ids, now free again, or None when
        the head was not in flight (the entry is passed over: the ring is not
        what the driver left). More than ``num`` entries apart from the
        driver's last_used_idx raises GuestDriverError (virtio 2.7.8: the
        device never has more than num outstanding).
        """
        end = self.used_idx()
        n = (end - self.last_used_idx) & 0xFFFF
        if n > self.num:
            raise GuestDriverError(
                f"the driver's last_used_idx is {self.last_used_idx}: {n} entries apart "
                "(mod 2**16); the used ring is not what the guest left",
                what=self._name(self.queue), field="used.idx", value=end, limit=self.num)
        out = []
        if n:
            first = self.last_used_idx % self.num
            k = min(n, self.num - first)
            raw = self.ram.read(self.used_gpa + 4 + 8 * first, 8 * k)
            if k < n:       # wrapped around the end of the ring
                raw += self.ram.read(self.used_gpa + 4, 8 * (n - k))
            for elem in np.frombuffer(raw, VRING_USED_ELEM_DTYPE):
                head, length = int(elem["id"]), int(elem["len"])
                ids = self._chains.pop(head, None)
                if ids is not None:
                    self._free.extend(reversed(ids))
                out.append((head, length, ids))
            self.last_used_idx = end
        if self.event_idx and self._used_event != self.last_used_idx:
            # used_event: interrupt me when the device passes what I have seen
            self.ram.writew(self.avail_gpa + 4 + 2 * self.num, self.last_used_idx)
            self._used_event = self.last_used_idx
        return out

    # -- state ----------------------------------------------------------------------
    def export_state(self) -> dict:
        """The driver's bookkeeping, which a real guest keeps in its RAM (a
        migration moves it); :meth:`restore_state` takes it back."""
        return {"free": list(self._free), "chains": self.chains, "avail_idx": self.avail_idx,
                "published": self._published, "kicked": self._kicked,
                "last_used_idx": self.last_used_idx, "used_event": self._used_event}

    def restore_state(self, state: dict) -> None:
        """Take over the bookkeeping of :meth:`export_state` (the ring is not touched)."""
        self._free = list(state["free"])
        self._chains = {int(h): list(ids) for h, ids in state["chains"].items()}
        self.avail_idx, self._published = state["avail_idx"], state["published"]
        self._kicked, self.last_used_idx = state["kicked"], state["last_used_idx"]
        self._used_event = state["used_event"]
