"""The packed virtqueue in memory (virtio 1.1+ section 2.8), and its vring base.

A packed virtqueue of ``num`` entries (any size from 1 to 32768; a power of 2
is not required) is one descriptor ring and two 4-byte event areas, all
little-endian::

    descriptor ring          num x {addr u64, len u32, id u16, flags u16}  align 16
    driver event suppression {off_wrap u16, flags u16}                     align 4
    device event suppression {off_wrap u16, flags u16}                     align 4

SET_VRING_ADDR carries them in the split ring's fields: ``desc_user_addr``
the descriptor ring, ``avail_user_addr`` the driver area, ``used_user_addr``
the device area (QEMU's vhost_virtqueue_set_addr, DPDK's translate_ring_addresses).

There are no indices in memory. The driver makes a descriptor available by
writing its flags with AVAIL equal to its own wrap counter and USED the
opposite; the device marks it used by writing AVAIL and USED both equal to
the device's wrap counter. Each side's wrap counter starts at 1 and flips
every time its position passes the end of the ring. A chain is contiguous in
the ring (NEXT on every descriptor but the last); the device writes back one
descriptor per chain, in the slot of the chain's first, with the buffer ``id``
the driver gave the chain's last descriptor and ``len`` the bytes written.

The vring base. A packed ring's position is an index *and* a wrap counter, so
GET_VRING_BASE / SET_VRING_BASE carry both in ``num`` (vhost-user.rst,
"Ring state"; QEMU's virtio_queue_packed_get_last_avail_idx, DPDK's
vhost_user_get_vring_base)::

    bits  0-14  last_avail_idx        bit 15  avail wrap counter
    bits 16-30  last_used_idx         bit 31  used wrap counter

QEMU sends and expects all 32 bits; DPDK 22.11 reads and writes only the low
16 (it resumes used where avail is, which is true of a stopped ring that has
returned every chain it took).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .layout import VRING_STATE_DTYPE

__all__ = [
    "VRING_PACKED_DESC_F_AVAIL", "VRING_PACKED_DESC_F_USED",
    "VRING_PACKED_EVENT_FLAG_ENABLE", "VRING_PACKED_EVENT_FLAG_DISABLE",
    "VRING_PACKED_EVENT_FLAG_DESC", "VRING_PACKED_EVENT_F_WRAP_CTR",
    "VRING_PACKED_DESC_SIZE", "VRING_PACKED_DESC_ALIGN", "VRING_PACKED_EVENT_ALIGN",
    "VRING_PACKED_EVENT_SIZE", "VRING_PACKED_MAX_SIZE", "VRING_PACKED_DESC_DTYPE",
    "VRING_PACKED_EVENT_DTYPE", "packed_area_sizes", "PackedVringBase",
    "packed_vring_base", "parse_packed_vring_base", "packed_vring_position", "packed_desc_is_avail",
    "packed_desc_is_used", "packed_avail_flags", "packed_used_flags",
    "VRING_PACKED_STATE_DTYPE", "PackedRingSnapshot", "packed_ring_copy", "slot_state",
    "waiting_for_device",
]

# Descriptor flags (2.8.1): NEXT, WRITE, INDIRECT are the split ring's 1, 2, 4.
VRING_PACKED_DESC_F_AVAIL = 1 << 7
VRING_PACKED_DESC_F_USED = 1 << 15

# Event suppression flags (2.8.10): in the low 2 bits of the area's flags.
VRING_PACKED_EVENT_FLAG_ENABLE = 0x0
VRING_PACKED_EVENT_FLAG_DISABLE = 0x1
VRING_PACKED_EVENT_FLAG_DESC = 0x2      # only with VIRTIO_RING_F_EVENT_IDX
VRING_PACKED_EVENT_F_WRAP_CTR = 15      # bit of off_wrap holding the wrap counter

VRING_PACKED_DESC_SIZE = 16
VRING_PACKED_DESC_ALIGN = 16
VRING_PACKED_EVENT_ALIGN = 4
VRING_PACKED_EVENT_SIZE = 4
# Queue sizes up to 2**15: the vring base has 15 bits for an index.
VRING_PACKED_MAX_SIZE = 1 << 15

VRING_PACKED_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"),
                                    ("flags", "<u2")])
VRING_PACKED_EVENT_DTYPE = np.dtype([("off_wrap", "<u2"), ("flags", "<u2")])

# What the device remembers about one packed ring: the split ring's record
# (``desc``, ``avail``, ``used`` hold the descriptor ring, driver and device
# areas; ``last_avail_idx`` and ``used_idx`` are positions in 0..num-1) and the
# two wrap counters.
VRING_PACKED_STATE_DTYPE = np.dtype(
    [(name, VRING_STATE_DTYPE.fields[name][0]) for name in VRING_STATE_DTYPE.names]
    + [("avail_wrap_counter", "<i8"), ("used_wrap_counter", "<i8")], align=True)


def packed_area_sizes(num: int) -> tuple[int, int, int]:
    """Bytes of the three areas SET_VRING_ADDR points at: descriptor ring,
    driver event suppression, device event suppression."""
    return VRING_PACKED_DESC_SIZE * num, VRING_PACKED_EVENT_SIZE, VRING_PACKED_EVENT_SIZE


def packed_avail_flags(wrap: int) -> int:
    """The AVAIL/USED bits a driver writes to make a descriptor available."""
    return VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED


def packed_used_flags(wrap: int) -> int:
    """The AVAIL/USED bits a device writes to mark a descriptor used."""
    return (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) if wrap else 0


def packed_desc_is_avail(flags: int, wrap: int) -> bool:
    """Is a descriptor with these flags available to a device whose avail wrap
    counter is ``wrap``? (AVAIL == wrap and USED != wrap.)"""
    avail = bool(flags & VRING_PACKED_DESC_F_AVAIL)
    used = bool(flags & VRING_PACKED_DESC_F_USED)
    return avail == bool(wrap) and used != bool(wrap)


def packed_desc_is_used(flags: int, wrap: int) -> bool:
    """Has the device used a descriptor with these flags, for a driver whose
    used wrap counter is ``wrap``? (AVAIL == USED == wrap.)"""
    avail = bool(flags & VRING_PACKED_DESC_F_AVAIL)
    used = bool(flags & VRING_PACKED_DESC_F_USED)
    return avail == used == bool(wrap)


class PackedVringBase(NamedTuple):
    """A packed ring's position as GET_VRING_BASE / SET_VRING_BASE carry it."""

    last_avail_idx: int
    avail_wrap_counter: int
    last_used_idx: int
    used_wrap_counter: int

    def __str__(self) -> str:
        return (f"last_avail_idx={self.last_avail_idx} wrap={self.avail_wrap_counter}, "
                f"last_used_idx={self.last_used_idx} wrap={self.used_wrap_counter}")


def packed_vring_base(last_avail_idx: int, avail_wrap: int, last_used_idx: int,
                      used_wrap: int) -> int:
    """The 32-bit ``num`` of a packed ring's vring state (see the module docstring)."""
    for name, idx in (("last_avail_idx", last_avail_idx), ("last_used_idx", last_used_idx)):
        if not 0 <= idx < VRING_PACKED_MAX_SIZE:
            raise ValueError(f"packed vring base: {name}={idx} does not fit in 15 bits")
    return ((last_avail_idx & 0x7FFF) | (bool(avail_wrap) << 15)
            | (last_used_idx & 0x7FFF) << 16 | (bool(used_wrap) << 31))


def parse_packed_vring_base(num: int) -> PackedVringBase:
    """Split a packed ring's 32-bit vring state ``num`` into its four parts."""
    num &= 0xFFFFFFFF
    return PackedVringBase(num & 0x7FFF, num >> 15 & 1, num >> 16 & 0x7FFF, num >> 31 & 1)


def packed_vring_position(num: int) -> PackedVringBase:
    """The device's positions a vring base sets: its four parts, except that the
    16-bit form (bits 16-31 zero, as DPDK sends it) puts used where avail is."""
    base = parse_packed_vring_base(num)
    if num & 0xFFFFFFFF == num & 0xFFFF:
        base = base._replace(last_used_idx=base.last_avail_idx,
                             used_wrap_counter=base.avail_wrap_counter)
    return base


@dataclass(frozen=True)
class PackedRingSnapshot:
    """One packed ring at one moment, as plain values and numpy copies.

    ``desc``: VRING_PACKED_DESC_DTYPE (addr, len, id, flags) per slot;
    ``driver_event`` / ``device_event``: (off_wrap, flags) of the two event
    suppression areas; ``device`` / ``driver``: each side's positions as a
    PackedVringBase (None where the source does not know them).
    """

    num: int
    desc: np.ndarray
    driver_event: tuple[int, int] = (0, 0)
    device_event: tuple[int, int] = (0, 0)
    device: PackedVringBase | None = None
    driver: PackedVringBase | None = None
    index: int | None = None
    gpas: dict | None = None
    error: str | None = None


def packed_ring_copy(memory: Any, num: int, gpas: dict, *, device: Any = None,
                     driver: Any = None, index: int | None = None) -> PackedRingSnapshot:
    """Copy a packed ring out of guest ``memory`` (anything with ``read(gpa, n)``).

    ``gpas``: ``desc``, ``driver`` and ``device`` (the three SET_VRING_ADDR
    areas); ``device``/``driver``: each side's positions, as a
    PackedVringBase or a 4-tuple (see the module docstring).
    """
    desc = np.frombuffer(memory.read(gpas["desc"], VRING_PACKED_DESC_SIZE * num),
                         VRING_PACKED_DESC_DTYPE).copy()

    def event(gpa: int | None) -> tuple[int, int]:
        if gpa is None:
            return (0, 0)
        e = np.frombuffer(memory.read(gpa, VRING_PACKED_EVENT_DTYPE.itemsize),
                          VRING_PACKED_EVENT_DTYPE)[0]
        return int(e["off_wrap"]), int(e["flags"])

    as_base = (lambda b: None if b is None else PackedVringBase(*map(int, b)))
    return PackedRingSnapshot(num, desc, event(gpas.get("driver")), event(gpas.get("device")),
                              as_base(device), as_base(driver), index, dict(gpas))


def slot_state(flags: int) -> tuple[str, int]:
    """("available", lap) when AVAIL != USED (the driver wrote it, with wrap counter
    ``lap``), ("used", lap) when they are equal (the device wrote it back)."""
    avail = int(bool(flags & VRING_PACKED_DESC_F_AVAIL))
    used = int(bool(flags & VRING_PACKED_DESC_F_USED))
    return ("available" if avail != used else "used"), avail


def waiting_for_device(snap: PackedRingSnapshot) -> list[int]:
    """Slots the device has not taken yet: from its ``last_avail_idx`` on, while
    each slot is available in the device's avail lap (at most ``num``)."""
    if snap.device is None or snap.num <= 0:
        return []
    out, slot, wrap_ = [], snap.device.last_avail_idx % snap.num, snap.device.avail_wrap_counter
    for _ in range(snap.num):
        if not packed_desc_is_avail(int(snap.desc[slot]["flags"]), wrap_):
            break
        out.append(slot)
        slot += 1
        if slot == snap.num:
            slot, wrap_ = 0, wrap_ ^ 1
    return out
