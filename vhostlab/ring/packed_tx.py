"""Guest TX on a packed ring: the device takes the frames the guest transmits.

``vring_packed_tx_burst`` (numba) and ``vring_packed_tx_burst_py`` (its
plain-Python twin) have the signature and the results of the split ring's
:func:`.tx.vring_tx_burst`: up to ``max_frames`` chains, each chain's readable
bytes minus ``hdr_len`` header bytes copied into the frame arena, every chain
taken returned with len 0, ``(status, n)`` back. The differences are the
ring's: a chain is available when its first descriptor's AVAIL/USED flags say
so for the device's wrap counter (there is no avail index), and each chain
goes back as one used descriptor (:func:`.packed_chain.packed_put_used`). A
burst takes at most one lap of the ring (``num`` chains).

As in the split ring: a chain that does not fit in the arena's remaining
room stays available for the next burst; a chain longer than ``max_chain``
bytes is taken, dropped and counted in ``oversized`` (its remaining ring
descriptors are stepped over to find where it ends); no new chain is started
once ``descs`` reaches ``desc_budget``.
"""
from __future__ import annotations

from numba import njit

from ..memory import translation
from . import atomics, chain, errors, layout, packed_chain, packed_layout
from . import log as log_kernels
from . import tx as tx_kernels
from .atomics import borrow, borrow_py
from .cache import depends_on, twin
from .chain import CHAIN_END, fail, fail_py, over_budget, over_budget_py
from .errors import E_ARENA, E_CHAIN_SHORT, E_FRAME_TOO_BIG, RING_OK
from .layout import MAX_HDR_LEN
from .packed_chain import (P_COUNT, P_HEAD, P_ID, P_POS, P_TOTAL, P_WRAP, packed_burst_end,
                           packed_burst_end_py, packed_burst_start, packed_burst_start_py,
                           packed_chain_next, packed_chain_next_py, packed_chain_skip,
                           packed_chain_skip_py, packed_chain_start, packed_chain_start_py,
                           packed_desc_avail, packed_desc_avail_py, packed_put_used,
                           packed_put_used_py)
from .tx import copy_from_guest, copy_from_guest_py

__all__ = ["vring_packed_tx_burst", "vring_packed_tx_burst_py"]

_ARENA_FULL = -2     # packed_tx_copy_chain: the chain does not fit (not an error)
_OVERSIZED = -3      # packed_tx_copy_chain: longer than max_chain (dropped)


@njit(cache=True, nogil=True, inline="always")
def packed_tx_copy_chain(mem, regions, s, cur, arena, cursor, hdr_len):
    """Copy the chain at ``cur``'s readable bytes, minus ``hdr_len`` header
    bytes, to ``arena[cursor:]``; returns ``(status, end, cursor)``.

    status is RING_OK, an error, _ARENA_FULL (``end``: where the frame would
    have ended) or _OVERSIZED (``end``: its length so far; the cursor has
    stepped to the chain's end).
    """
    skip = hdr_len
    limit = int(s["max_chain"])
    while True:
        status, buf, gpa, length, cur = packed_chain_next(mem, regions, s, cur, False)
        if status != RING_OK:
            break
        if limit > 0 and cur[P_TOTAL] > limit:      # dropped: only find its end
            total = cur[P_TOTAL]
            status, cur = packed_chain_skip(mem, s, cur)
            return (_OVERSIZED if status == CHAIN_END else status), total, cur
        strip = min(skip, length)                   # the virtio-net header
        skip -= strip
        count = length - strip
        if cursor + count > arena.size:
            return _ARENA_FULL, cursor + count, cur
        copy_from_guest(arena, cursor, mem, buf + strip, count)
        cursor += count
    if status != CHAIN_END:
        return status, cursor, cur
    if skip > 0:
        head = cur[P_HEAD]
        return fail(s, E_CHAIN_SHORT, head, head, -1, cur[P_TOTAL], hdr_len), cursor, cur
    return RING_OK, cursor, cur


packed_tx_copy_chain_py = twin(packed_tx_copy_chain, packed_chain_next=packed_chain_next_py,
                               packed_chain_skip=packed_chain_skip_py,
                               copy_from_guest=copy_from_guest_py, fail=fail_py)


@njit(cache=True, nogil=True)
def vring_packed_tx_burst(host, regions, vq, log, arena, offsets, lengths, hdr_len,
                          max_frames):
    """Take up to ``max_frames`` TX chains into the arena; ``(status, n)``."""
    s = vq[0]
    if s["status"] != RING_OK:                  # broken: touch nothing
        return int(s["status"]), 0
    if not 0 <= hdr_len <= MAX_HDR_LEN:
        return E_ARENA, 0
    status, mem, regions, desc, driver, device = packed_burst_start(host, regions, s)
    if status != RING_OK:
        return status, 0
    arena, log = borrow(arena), borrow(log)
    num = int(s["num"])
    limit = min(max_frames, offsets.size, lengths.size)
    pos, wrap = int(s["last_avail_idx"]), int(s["avail_wrap_counter"])
    n = taken = cursor = nbytes = 0
    while n < limit and taken < num and not over_budget(s) \
            and packed_desc_avail(mem, desc, pos, wrap):
        cur = packed_chain_start(desc, num, pos, wrap)
        status, end, cur = packed_tx_copy_chain(mem, regions, s, cur, arena, cursor, hdr_len)
        if status == _ARENA_FULL:               # stays available for the next burst,
            status = RING_OK if n else fail(    # unless not even an empty arena holds it
                s, E_FRAME_TOO_BIG, pos, pos, -1, end - cursor, arena.size)
            break
        if status == _OVERSIZED:                # taken and dropped (used, len 0)
            s["oversized"] += 1
            s["oversized_head"], s["oversized_len"] = pos, end
            status = RING_OK
        elif status != RING_OK:
            break
        else:
            offsets[n], lengths[n] = cursor, end - cursor
            nbytes += end - cursor
            cursor = end
            n += 1
        status = packed_put_used(mem, log, s, desc, cur[P_ID], 0, cur[P_COUNT])
        pos, wrap = cur[P_POS], cur[P_WRAP]
        taken += 1
        if status != RING_OK:
            break
    s["last_avail_idx"], s["avail_wrap_counter"] = pos, wrap
    return packed_burst_end(mem, log, s, desc, driver, device, taken, n, nbytes, status), n


depends_on(vring_packed_tx_burst, translation, atomics, chain, errors, layout, log_kernels,
           packed_chain, packed_layout, tx_kernels)
vring_packed_tx_burst_py = twin(
    vring_packed_tx_burst, packed_burst_start=packed_burst_start_py, borrow=borrow_py,
    over_budget=over_budget_py, packed_desc_avail=packed_desc_avail_py,
    packed_chain_start=packed_chain_start_py, packed_tx_copy_chain=packed_tx_copy_chain_py,
    fail=fail_py, packed_put_used=packed_put_used_py, packed_burst_end=packed_burst_end_py)
