"""The split virtqueue in memory (virtio 1.x section 2.7), and a ring's state.

A split virtqueue of ``num`` entries (a power of 2, at most 32768) is three
areas of guest memory, all little-endian::

    descriptor table  num x {addr u64, len u32, flags u16, next u16}   align 16
    avail ring        flags u16, idx u16, ring[num] u16, used_event u16  align 2
    used ring         flags u16, idx u16, ring[num] {id u32, len u32},
                      avail_event u16                                    align 4

The driver (guest) fills descriptors, puts chain heads in avail.ring and bumps
avail.idx; the device (back-end) takes them, and returns each chain with its
head and the byte count it wrote in used.ring, then bumps used.idx. The
indices run freely and wrap at 2**16; the slot is ``idx % num``.

QEMU's legacy device (disable-modern=on) puts the three areas in one block:
the descriptor table, the avail ring right after it, and the used ring at the
next multiple of 4096 (``vring_size`` / ``vring_layout``, as Linux's
vring_init).

EVENT_IDX (VIRTIO_RING_F_EVENT_IDX, 2.7.7 and 2.7.10): ``used_event`` (the
last avail slot) tells the device the used index at which the driver wants an
interrupt; ``avail_event`` (the last used slot) tells the driver the avail
index at which the device wants a kick. Both sides decide with
:func:`vring_need_event`.

``VRING_STATE_DTYPE`` is what the device remembers about one ring (libvhost-
user's VuVirtq): where the areas are (GPAs), last_avail_idx and used_idx (what
GET_VRING_BASE / SET_VRING_BASE read and set), the EVENT_IDX bookkeeping,
counters, and the error record of a broken ring (see ``errors``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit

from ..protocol.constants import VHOST_VRING_F_LOG

__all__ = [
    # flags: descriptor (2.7.5), avail and used (2.7.7, 2.7.10), vhost_vring_addr
    "VRING_DESC_F_NEXT", "VRING_DESC_F_WRITE", "VRING_DESC_F_INDIRECT",
    "VRING_AVAIL_F_NO_INTERRUPT", "VRING_USED_F_NO_NOTIFY",
    "VHOST_VRING_F_LOG",
    # sizes and alignments
    "VIRTQUEUE_MAX_SIZE", "VRING_DESC_SIZE", "INDIRECT_MAX_ENTRIES",
    "VRING_DESC_ALIGN", "VRING_AVAIL_ALIGN", "VRING_USED_ALIGN",
    "vring_desc_size", "vring_avail_size", "vring_used_size", "vring_size",
    # the virtio-net header in front of every frame
    "VIRTIO_NET_HDR_LEN", "VIRTIO_NET_HDR_MRG_LEN", "MAX_HDR_LEN",
    # where a ring lies, and numpy views of it
    "VRING_DESC_DTYPE", "VRING_USED_ELEM_DTYPE", "VRING_STATE_DTYPE",
    "VringLayout", "VringViews", "VringCopy", "vring_layout", "vring_views",
    # EVENT_IDX (2.7.10)
    "vring_need_event", "vring_need_event_py",
]

# Descriptor flags (2.7.5)
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
# Avail and used flags (2.7.7, 2.7.10)
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

# The virtio spec's largest split ring (2.7: "The maximum Queue Size value is
# 32768"), which a back-end accepts. QEMU's and libvhost-user's own
# VIRTQUEUE_MAX_SIZE is 1024: the most their devices create.
VIRTQUEUE_MAX_SIZE = 32768
VRING_DESC_ALIGN, VRING_AVAIL_ALIGN, VRING_USED_ALIGN = 16, 2, 4
VRING_DESC_SIZE = 16
# next is a u16, so an indirect table can chain at most 65536 entries (Linux
# vhost refuses longer tables the same way).
INDIRECT_MAX_ENTRIES = 65536

# virtio-net header (5.1.6): 10 bytes, 12 with VERSION_1 or MRG_RXBUF
# (num_buffers u16 at offset 10).
VIRTIO_NET_HDR_LEN = 10
VIRTIO_NET_HDR_MRG_LEN = 12
MAX_HDR_LEN = 64    # what the kernels accept for hdr_len (a sanity bound)

VRING_DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"),
                             ("next", "<u2")])
VRING_USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])

VRING_STATE_DTYPE = np.dtype([(name, "<i8") for name in (
    "num",                 # SET_VRING_NUM
    "desc", "avail", "used",   # GPAs of the three areas (QEMU's VRing)
    "log_guest_addr",      # GPA at which used-ring writes are logged
    "flags",               # vhost_vring_addr.flags (VHOST_VRING_F_LOG)
    "last_avail_idx",      # next avail entry the device will take
    "used_idx",            # the device's copy of used->idx
    "event_idx",           # VIRTIO_RING_F_EVENT_IDX negotiated
    "signalled_used", "signalled_used_valid",   # used idx at the last call
    "call_pending",        # the driver wants an interrupt (set by kernels)
    "avail_pending",       # avail entries not yet taken, seen at the end of a burst
    "frames", "bytes", "dropped",   # counters (dropped: RX frames too big)
    "logged",              # dirty-log bits this ring's bursts set (were clear before)
    "descs",               # descriptors walked (the service's weight; it resets it)
    "desc_budget",         # no new chain once descs reaches it (0: no budget)
    "max_chain",           # TX: longest chain taken as a frame, in bytes (0: no limit)
    "oversized", "oversized_head", "oversized_len",   # TX chains over max_chain: dropped
    "status", "err_head", "err_index", "err_table", "err_value", "err_limit",
)], align=True)


def vring_desc_size(num: int) -> int:
    """Bytes of a descriptor table of ``num`` entries."""
    return VRING_DESC_SIZE * num


def vring_avail_size(num: int) -> int:
    """Bytes of an avail ring: flags, idx, ring[num], used_event."""
    return 6 + 2 * num


def vring_used_size(num: int) -> int:
    """Bytes of a used ring: flags, idx, ring[num], avail_event."""
    return 6 + 8 * num


def vring_size(num: int, align: int = 4096) -> int:
    """Bytes of a legacy ring block (Linux's vring_size)."""
    used = (vring_desc_size(num) + vring_avail_size(num) + align - 1) // align * align
    return used + vring_used_size(num)


class VringLayout(NamedTuple):
    """GPAs of a ring's three areas and the block's total size."""

    desc: int
    avail: int
    used: int
    size: int


def vring_layout(desc: int, num: int, align: int = 4096) -> VringLayout:
    """The legacy layout of a ring whose descriptor table starts at ``desc``."""
    avail = desc + vring_desc_size(num)
    used = (avail + vring_avail_size(num) + align - 1) // align * align
    return VringLayout(desc, avail, used, vring_size(num, align))


def vring_need_event_py(event_idx, new_idx, old_idx):
    """Does moving an index from ``old_idx`` to ``new_idx`` pass ``event_idx``?

    The spec's (and Linux's) vring_need_event, in u16 arithmetic: true when
    event_idx lies in [old_idx, new_idx). Used for interrupts with used_event
    and for kicks with avail_event.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


vring_need_event = njit(cache=True, nogil=True)(vring_need_event_py)
vring_need_event.__doc__ = "numba twin of :func:`vring_need_event_py`."


class VringViews(NamedTuple):
    """numpy views of one ring over guest memory (for drivers and labs).

    ``desc`` and ``used_ring`` are structured (VRING_DESC_DTYPE,
    VRING_USED_ELEM_DTYPE); the u16 fields are 1-element uint16 arrays, so
    ``views.avail_idx[0]`` reads the live value. The views keep guest memory
    mapped: drop them before closing it.
    """

    desc: np.ndarray
    avail_flags: np.ndarray
    avail_idx: np.ndarray
    avail_ring: np.ndarray
    used_event: np.ndarray
    used_flags: np.ndarray
    used_idx: np.ndarray
    used_ring: np.ndarray
    avail_event: np.ndarray


@dataclass(frozen=True)
class VringCopy:
    """One ring's three areas copied out of guest memory at one moment:
    plain values and numpy copies (``desc``: VRING_DESC_DTYPE, ``used_ring``:
    VRING_USED_ELEM_DTYPE) that keep nothing mapped. The switch-over record
    and the virtqueue view's snapshot add what they know about the ring."""

    num: int
    desc: np.ndarray
    avail_flags: int
    avail_idx: int
    avail_ring: np.ndarray
    used_flags: int
    used_idx: int
    used_ring: np.ndarray


def vring_views(memory, num: int, desc: int, avail: int, used: int) -> VringViews:
    """Views of the ring at GPAs ``desc``, ``avail``, ``used`` in ``memory``
    (anything with ``view(gpa, n) -> uint8 array``, e.g. GuestMemory)."""
    d = memory.view(desc, vring_desc_size(num)).view(VRING_DESC_DTYPE)
    a = memory.view(avail, vring_avail_size(num)).view("<u2")
    u = memory.view(used, vring_used_size(num))
    u16 = u.view("<u2")
    return VringViews(
        desc=d, avail_flags=a[0:1], avail_idx=a[1:2], avail_ring=a[2:2 + num],
        used_event=a[2 + num:3 + num], used_flags=u16[0:1], used_idx=u16[1:2],
        used_ring=u[4:4 + 8 * num].view(VRING_USED_ELEM_DTYPE),
        avail_event=u16[2 + 4 * num:3 + 4 * num])
