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
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .atomics import borrow, load_acquire
from .chain import (_U16, CHAIN_END, CUR_TOTAL, chain_next, chain_next_py, chain_start,
                    chain_start_py, copy_bytes, fail, fail_py, map_ring, map_ring_py,
                    publish_used, publish_used_py, put_used_elem_py)
from .errors import E_ARENA, E_AVAIL_IDX, E_CHAIN_SHORT, E_FRAME_TOO_BIG, E_HEAD, RING_OK
from .layout import MAX_HDR_LEN

__all__ = ["vring_tx_burst", "vring_tx_burst_py"]

_ARENA_FULL = -2


@njit(cache=True, nogil=True)
def vring_tx_burst(host, regions, vq, log, arena, offsets, lengths, hdr_len, max_frames):
    """Take up to ``max_frames`` TX chains into the arena; ``(status, n)``."""
    s = vq[0]
    if s["status"] != RING_OK:                  # broken: touch nothing
        return s["status"], 0
    if not 0 <= hdr_len <= MAX_HDR_LEN:
        return E_ARENA, 0
    status, desc, avail, used = map_ring(regions, s)
    if status != RING_OK:
        return status, 0
    h16, h32, h64 = (borrow(host.view(np.uint16)), borrow(host.view(np.uint32)),
                     borrow(host.view(np.uint64)))
    regions, host, arena, log = borrow(regions), borrow(host), borrow(arena), borrow(log)
    num = s["num"]
    mask = num - 1
    last, used_idx = s["last_avail_idx"], s["used_idx"]
    # Acquire: the ring entries and descriptors below are read after this.
    avail_idx = np.int64(load_acquire(h16, (avail + 2) >> 1))
    ready = (avail_idx - last) & 0xFFFF
    if ready > num:
        return fail(s, E_AVAIL_IDX, -1, last, -1, avail_idx, num), 0
    limit = min(ready, max_frames, offsets.size, lengths.size)
    n = cursor = nbytes = 0
    while n < limit:
        slot = (last + n) & mask
        head = np.int64(h16[((avail + 4) >> 1) + slot])
        if head >= num:
            status = fail(s, E_HEAD, -1, slot, -1, head, num)
            break
        cur = chain_start(desc, num, head)
        start, skip, count = cursor, hdr_len, 0
        while True:
            status, buf, gpa, length, cur = chain_next(h16, h32, h64, regions, s, cur, False)
            if status != RING_OK:
                break
            strip = min(skip, length)           # the virtio-net header
            skip -= strip
            count = length - strip
            if cursor + count > arena.size:
                status = _ARENA_FULL
                break
            copy_bytes(arena, cursor, host, buf + strip, count)
            cursor += count
        if status == _ARENA_FULL:
            if n == 0:                          # not even an empty arena holds it
                status = fail(s, E_FRAME_TOO_BIG, head, head, -1,
                              cursor - start + count, arena.size)
            else:                               # it waits for the next burst
                status = RING_OK
            cursor = start
            break
        if status != CHAIN_END:
            break
        if skip > 0:
            status = fail(s, E_CHAIN_SHORT, head, head, -1, cur[CUR_TOTAL], hdr_len)
            break
        status = RING_OK
        offsets[n], lengths[n] = start, cursor - start
        nbytes += cursor - start
        elem = ((used + 4) >> 2) + 2 * ((used_idx + n) & mask)
        h32[elem], h32[elem + 1] = head, 0     # used elem {id, len}
        n += 1
    s["frames"] += n
    s["bytes"] += nbytes
    published = publish_used(h16, log, s, avail, used, n)
    return (status if status != RING_OK else published), n


def vring_tx_burst_py(host, regions, vq, log, arena, offsets, lengths, hdr_len, max_frames):
    """Plain-Python twin of :func:`vring_tx_burst`."""
    s = vq[0]
    if s["status"] != RING_OK:
        return int(s["status"]), 0
    if not 0 <= hdr_len <= MAX_HDR_LEN:
        return E_ARENA, 0
    table = regions.tolist()
    status, desc, avail, used = map_ring_py(table, s)
    if status != RING_OK:
        return status, 0
    mv, out = memoryview(host), memoryview(arena)
    frame_offsets, frame_lengths = memoryview(offsets), memoryview(lengths)
    num = int(s["num"])
    mask = num - 1
    last, used_idx = int(s["last_avail_idx"]), int(s["used_idx"])
    avail_idx = _U16.unpack_from(mv, avail + 2)[0]           # acquire in the kernel
    ready = (avail_idx - last) & 0xFFFF
    if ready > num:
        return fail_py(s, E_AVAIL_IDX, -1, last, -1, avail_idx, num), 0
    limit = min(ready, max_frames, offsets.size, lengths.size)
    n = cursor = nbytes = 0
    while n < limit:
        slot = (last + n) & mask
        head = _U16.unpack_from(mv, avail + 4 + 2 * slot)[0]
        if head >= num:
            status = fail_py(s, E_HEAD, -1, slot, -1, head, num)
            break
        cur = chain_start_py(desc, num, head)
        start, skip, count = cursor, hdr_len, 0
        while True:
            status, buf, gpa, length, cur = chain_next_py(mv, table, s, cur, False)
            if status != RING_OK:
                break
            strip = min(skip, length)
            skip -= strip
            count = length - strip
            if cursor + count > arena.size:
                status = _ARENA_FULL
                break
            out[cursor:cursor + count] = mv[buf + strip:buf + length]
            cursor += count
        if status == _ARENA_FULL:
            if n == 0:
                status = fail_py(s, E_FRAME_TOO_BIG, head, head, -1,
                                 cursor - start + count, arena.size)
            else:
                status = RING_OK
            cursor = start
            break
        if status != CHAIN_END:
            break
        if skip > 0:
            status = fail_py(s, E_CHAIN_SHORT, head, head, -1, cur[CUR_TOTAL], hdr_len)
            break
        status = RING_OK
        frame_offsets[n], frame_lengths[n] = start, cursor - start
        nbytes += cursor - start
        put_used_elem_py(mv, used, (used_idx + n) & mask, head, 0)
        n += 1
    s["frames"] += n
    s["bytes"] += nbytes
    published = publish_used_py(mv, log, s, avail, used, n)
    return (status if status != RING_OK else published), n
