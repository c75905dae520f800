"""Guest TX: the device takes the frames the guest transmits.

``vring_tx_burst`` (numba) and ``vring_tx_burst_py`` (its plain-Python twin,
same signature, same results) take up to ``max_frames`` available chains and
copy each chain's readable bytes, minus the first ``hdr_len`` (the virtio-net
header: pass 0 to keep it, 10 or 12 to strip it), into a frame arena: one
uint8 buffer ``arena``, frame ``k`` at ``arena[offsets[k]:offsets[k] +
lengths[k]]``. Every chain taken goes back in the used ring with len 0 (the
device wrote nothing into it, 2.7.8).

Arguments: ``host, regions`` from ``GuestMemory.kernel_args()``; ``vq`` the
ring's 1-element VRING_STATE_DTYPE array; ``log`` the dirty-log bitmap
(uint8, empty when logging is off: TX only writes the used ring, logged when
VHOST_VRING_F_LOG is set). Returns ``(status, n)``: n frames are in the arena
(and in the used ring) even when status is an error; a chain that does not
fit in the arena's remaining room stays available for the next burst.

Two limits from the ring state bound one burst's work, whatever the guest
wrote: a chain longer than ``max_chain`` bytes (the device sets max(MTU,
65535) plus the header) is walked no further, returned with len 0 and
counted in ``oversized`` (a frame no wire could carry; Linux's vhost-net
drops it the same way); and once ``descs`` reaches ``desc_budget`` no new
chain is started (the service's weight, as vhost_exceeds_weight).

Each twin here is its kernel's own code run by the interpreter
(``cache.twin``); only the helpers that touch guest memory (in ``chain`` and
``copy_from_guest``) have twins of their own, over a memoryview.
"""
from __future__ import annotations

from numba import njit

from ..memory import translation
from . import atomics, chain, errors, layout
from . import log as log_kernels
from .atomics import borrow, borrow_py
from .cache import depends_on, twin
from .chain import (CHAIN_END, CUR_TOTAL, avail_head, avail_head_py, burst_end,
                    burst_end_py, burst_start, burst_start_py, chain_next, chain_next_py,
                    chain_start, chain_start_py, copy_bytes, fail, fail_py, over_budget,
                    over_budget_py, put_used_elem, put_used_elem_py)
from .errors import E_ARENA, E_CHAIN_SHORT, E_FRAME_TOO_BIG, RING_OK
from .layout import MAX_HDR_LEN

__all__ = ["vring_tx_burst", "vring_tx_burst_py"]

_ARENA_FULL = -2     # tx_copy_chain: the chain does not fit (not an error)
_OVERSIZED = -3      # tx_copy_chain: the chain is longer than max_chain (dropped)


@njit(cache=True, nogil=True, inline="always")
def copy_from_guest(arena, cursor, mem, buf, count):
    """arena[cursor:cursor + count] = guest memory at ``buf``."""
    copy_bytes(arena, cursor, mem[0], buf, count)


def copy_from_guest_py(arena, cursor, mv, buf, count):
    """Twin of :func:`copy_from_guest`."""
    arena[cursor:cursor + count] = mv[buf:buf + count]


@njit(cache=True, nogil=True, inline="always")
def tx_copy_chain(mem, regions, s, desc, head, arena, cursor, hdr_len):
    """Copy chain ``head``'s readable bytes, minus ``hdr_len`` header bytes,
    to ``arena[cursor:]``; returns ``(status, end)``.

    status is RING_OK, an error, _ARENA_FULL (then ``end`` is where the
    frame would have ended) or _OVERSIZED (the chain passed ``max_chain``
    bytes; ``end`` is its length so far).
    """
    cur = chain_start(desc, int(s["num"]), head)
    skip = hdr_len
    limit = int(s["max_chain"])
    while True:
        status, buf, gpa, length, cur = chain_next(mem, regions, s, cur, False)
        if status != RING_OK:
            break
        if limit > 0 and cur[CUR_TOTAL] > limit:    # walk no further: it is dropped
            return _OVERSIZED, cur[CUR_TOTAL]
        strip = min(skip, length)                   # the virtio-net header
        skip -= strip
        count = length - strip
        if cursor + count > arena.size:
            return _ARENA_FULL, cursor + count
        copy_from_guest(arena, cursor, mem, buf + strip, count)
        cursor += count
    if status != CHAIN_END:
        return status, cursor
    if skip > 0:
        return fail(s, E_CHAIN_SHORT, head, head, -1, cur[CUR_TOTAL], hdr_len), cursor
    return RING_OK, cursor


tx_copy_chain_py = twin(tx_copy_chain, chain_start=chain_start_py, chain_next=chain_next_py,
                        copy_from_guest=copy_from_guest_py, fail=fail_py)


@njit(cache=True, nogil=True)
def vring_tx_burst(host, regions, vq, log, arena, offsets, lengths, hdr_len, max_frames):
    """Take up to ``max_frames`` TX chains into the arena; ``(status, n)``."""
    s = vq[0]
    if s["status"] != RING_OK:                  # broken: touch nothing
        return int(s["status"]), 0
    if not 0 <= hdr_len <= MAX_HDR_LEN:
        return E_ARENA, 0
    status, mem, regions, desc, avail, used, ready = burst_start(host, regions, s)
    if status != RING_OK:
        return status, 0
    # Borrowed arrays: passing them to the helpers costs no reference counting.
    arena, log = borrow(arena), borrow(log)
    limit = min(ready, max_frames, offsets.size, lengths.size)
    last, used_idx, mask = int(s["last_avail_idx"]), int(s["used_idx"]), int(s["num"]) - 1
    n = taken = cursor = nbytes = 0
    while n < limit and taken < ready and not over_budget(s):
        status, head = avail_head(mem, s, avail, last + taken)
        if status != RING_OK:
            break
        status, end = tx_copy_chain(mem, regions, s, desc, head, arena, cursor, hdr_len)
        if status == _ARENA_FULL:               # stays available for the next burst,
            status = RING_OK if n else fail(    # unless not even an empty arena holds it
                s, E_FRAME_TOO_BIG, head, head, -1, end - cursor, arena.size)
            break
        if status == _OVERSIZED:                # taken and dropped (used, len 0)
            s["oversized"] += 1
            s["oversized_head"], s["oversized_len"] = head, end
            status = RING_OK
        elif status != RING_OK:
            break
        else:
            offsets[n], lengths[n] = cursor, end - cursor
            nbytes += end - cursor
            cursor = end
            n += 1
        put_used_elem(mem, used, (used_idx + taken) & mask, head, 0)   # the device wrote 0
        taken += 1
    return burst_end(mem, log, s, avail, used, taken, n, nbytes, status), n


depends_on(vring_tx_burst, translation, atomics, chain, errors, layout, log_kernels)
vring_tx_burst_py = twin(vring_tx_burst, burst_start=burst_start_py, borrow=borrow_py,
                         over_budget=over_budget_py, avail_head=avail_head_py,
                         tx_copy_chain=tx_copy_chain_py, fail=fail_py,
                         put_used_elem=put_used_elem_py, burst_end=burst_end_py)
