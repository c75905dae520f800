"""Guest RX: the device writes frames into buffers the guest posted.

``vring_rx_burst`` (numba) and ``vring_rx_burst_py`` (its plain-Python twin,
same signature, same results) copy frames ``0 .. nframes-1`` of a frame arena
(``arena[offsets[k]:offsets[k] + lengths[k]]``) into device-writable chains,
each behind a virtio-net header of ``hdr_len`` bytes (0, 10, or 12): all
zeros (no checksum offload, GSO_NONE) except num_buffers (offset 10, when the
header has it), the number of chains the frame took.

Without MRG_RXBUF a frame takes one chain; a frame larger than its chain is
dropped (counted in ``dropped``) and the chain stays available, as Linux's
vhost-net does (what was already written into it stays there, and is logged). With MRG_RXBUF (``mrg_rxbuf`` non-zero, 5.1.6.4) a frame
spans as many chains as it needs; each goes in the used ring with the bytes
written into it, and they are published together.

While logging is on (``log`` non-empty) every guest page written is marked
in the dirty log, and with VHOST_VRING_F_LOG the used-ring writes too.
Returns ``(status, n)``: frames ``0 .. n-1`` are done (delivered or dropped);
the burst stops early when the ring runs out of buffers.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .atomics import borrow, load_acquire
from .chain import (_U16, CHAIN_END, CUR_INDEX, CUR_TABLE_GPA, chain_next, chain_next_py,
                    chain_start, chain_start_py, copy_bytes, fail, fail_py, map_ring,
                    map_ring_py, publish_used, publish_used_py, put_used_elem_py)
from .errors import E_ARENA, E_AVAIL_IDX, E_HEAD, E_LOG_RANGE, RING_OK
from .layout import MAX_HDR_LEN
from .log import vhost_log_write, vhost_log_write_py

__all__ = ["vring_rx_burst", "vring_rx_burst_py"]

_NUM_BUFFERS = 10    # offset of num_buffers in the 12-byte header


@njit(cache=True, nogil=True)
def _write_stream(host, buf, count, pos, hdr_len, arena, src, nb):
    """Write bytes ``pos .. pos+count`` of header-then-frame at ``buf``.

    Header bytes are zero except num_buffers = 1; ``nb`` records where its two
    bytes went, so a frame spanning chains can patch it afterwards.
    """
    k = 0
    while k < count and pos + k < hdr_len:
        q = pos + k
        host[buf + k] = 1 if q == _NUM_BUFFERS else 0
        if q == _NUM_BUFFERS or q == _NUM_BUFFERS + 1:
            nb[q - _NUM_BUFFERS] = buf + k
        k += 1
    copy_bytes(host, buf + k, arena, src + pos + k - hdr_len, count - k)


def _write_stream_py(mv, buf, count, pos, hdr_len, arena, src, nb):
    """Twin of :func:`_write_stream` (``arena`` a memoryview)."""
    k = 0
    while k < count and pos + k < hdr_len:
        q = pos + k
        mv[buf + k] = 1 if q == _NUM_BUFFERS else 0
        if q == _NUM_BUFFERS or q == _NUM_BUFFERS + 1:
            nb[q - _NUM_BUFFERS] = buf + k
        k += 1
    start = src + pos + k - hdr_len
    mv[buf + k:buf + count] = arena[start:start + count - k]


@njit(cache=True, nogil=True)
def vring_rx_burst(host, regions, vq, log, arena, offsets, lengths, nframes, hdr_len,
                   mrg_rxbuf):
    """Write ``nframes`` arena frames into RX chains; ``(status, n)``."""
    s = vq[0]
    if s["status"] != RING_OK:
        return s["status"], 0
    if nframes > offsets.size or nframes > lengths.size or not 0 <= hdr_len <= MAX_HDR_LEN:
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
    avail_idx = np.int64(load_acquire(h16, (avail + 2) >> 1))   # acquire
    ready = (avail_idx - last) & 0xFFFF
    if ready > num:
        return fail(s, E_AVAIL_IDX, -1, last, -1, avail_idx, num), 0
    nb = np.empty(2, np.int64)
    # (head, bytes written) of the current frame's chains: they go in the used
    # ring only once the whole frame is in (nothing is written for a frame
    # that is dropped or waits for buffers).
    pending = np.empty((num, 2), np.int64)
    taken = f = delivered = nbytes = dropped = 0
    while f < nframes:
        src, size = offsets[f], lengths[f]
        if src < 0 or size < 0 or src + size > arena.size:
            status = E_ARENA                    # the caller's bug: ring not broken
            break
        total, pos, chains = hdr_len + size, 0, 0
        while pos < total or chains == 0:
            if taken + chains >= ready:
                break                           # out of buffers
            slot = (last + taken + chains) & mask
            head = np.int64(h16[((avail + 4) >> 1) + slot])
            if head >= num:
                status = fail(s, E_HEAD, -1, slot, -1, head, num)
                break
            cur = chain_start(desc, num, head)
            written = 0
            while True:     # walk the whole chain, writing while bytes remain
                status, buf, gpa, length, cur = chain_next(h16, h32, h64, regions, s, cur, True)
                if status != RING_OK:
                    break
                count = min(length, total - pos)
                if count > 0:
                    _write_stream(host, buf, count, pos, hdr_len, arena, src, nb)
                    pos += count
                    written += count
                    if log.size > 0 and vhost_log_write(log, gpa, count) != RING_OK:
                        status = fail(s, E_LOG_RANGE, head, cur[CUR_INDEX], cur[CUR_TABLE_GPA],
                                      gpa, log.size)
                        break
            if status != CHAIN_END:
                break
            status = RING_OK
            pending[chains, 0], pending[chains, 1] = head, written
            chains += 1
            if not mrg_rxbuf:
                break
        if status != RING_OK:
            break
        if pos < total or chains == 0:
            if not mrg_rxbuf and chains == 1:   # too big for its chain: drop it
                dropped += 1
                f += 1
                continue
            break                               # wait for more buffers
        if chains > 1 and hdr_len >= _NUM_BUFFERS + 2:
            host[nb[0]], host[nb[1]] = chains & 0xFF, chains >> 8
        for c in range(chains):
            elem = ((used + 4) >> 2) + 2 * ((used_idx + taken + c) & mask)
            h32[elem], h32[elem + 1] = pending[c, 0], pending[c, 1]
        taken += chains
        nbytes += size
        delivered += 1
        f += 1
    s["frames"] += delivered
    s["bytes"] += nbytes
    s["dropped"] += dropped
    published = publish_used(h16, log, s, avail, used, taken)
    return (status if status != RING_OK else published), f


def vring_rx_burst_py(host, regions, vq, log, arena, offsets, lengths, nframes, hdr_len,
                      mrg_rxbuf):
    """Plain-Python twin of :func:`vring_rx_burst`."""
    s = vq[0]
    if s["status"] != RING_OK:
        return int(s["status"]), 0
    if nframes > offsets.size or nframes > lengths.size or not 0 <= hdr_len <= MAX_HDR_LEN:
        return E_ARENA, 0
    table = regions.tolist()
    status, desc, avail, used = map_ring_py(table, s)
    if status != RING_OK:
        return status, 0
    mv, frames = memoryview(host), memoryview(arena)
    num = int(s["num"])
    mask = num - 1
    last, used_idx = int(s["last_avail_idx"]), int(s["used_idx"])
    avail_idx = _U16.unpack_from(mv, avail + 2)[0]           # acquire in the kernel
    ready = (avail_idx - last) & 0xFFFF
    if ready > num:
        return fail_py(s, E_AVAIL_IDX, -1, last, -1, avail_idx, num), 0
    nb = [0, 0]
    taken = f = delivered = nbytes = dropped = 0
    while f < nframes:
        src, size = int(offsets[f]), int(lengths[f])
        if src < 0 or size < 0 or src + size > arena.size:
            status = E_ARENA
            break
        total, pos, chains, pending = hdr_len + size, 0, 0, []
        while pos < total or chains == 0:
            if taken + chains >= ready:
                break
            slot = (last + taken + chains) & mask
            head = _U16.unpack_from(mv, avail + 4 + 2 * slot)[0]
            if head >= num:
                status = fail_py(s, E_HEAD, -1, slot, -1, head, num)
                break
            cur = chain_start_py(desc, num, head)
            written = 0
            while True:
                status, buf, gpa, length, cur = chain_next_py(mv, table, s, cur, True)
                if status != RING_OK:
                    break
                count = min(length, total - pos)
                if count > 0:
                    _write_stream_py(mv, buf, count, pos, hdr_len, frames, src, nb)
                    pos += count
                    written += count
                    if log.size > 0 and vhost_log_write_py(log, gpa, count) != RING_OK:
                        status = fail_py(s, E_LOG_RANGE, head, cur[CUR_INDEX],
                                         cur[CUR_TABLE_GPA], gpa, log.size)
                        break
            if status != CHAIN_END:
                break
            status = RING_OK
            pending.append((head, written))
            chains += 1
            if not mrg_rxbuf:
                break
        if status != RING_OK:
            break
        if pos < total or chains == 0:
            if not mrg_rxbuf and chains == 1:
                dropped += 1
                f += 1
                continue
            break
        if chains > 1 and hdr_len >= _NUM_BUFFERS + 2:
            mv[nb[0]], mv[nb[1]] = chains & 0xFF, chains >> 8
        for c, (chain_head, written) in enumerate(pending):
            put_used_elem_py(mv, used, (used_idx + taken + c) & mask, chain_head, written)
        taken += chains
        nbytes += size
        delivered += 1
        f += 1
    s["frames"] += delivered
    s["bytes"] += nbytes
    s["dropped"] += dropped
    published = publish_used_py(mv, log, s, avail, used, taken)
    return (status if status != RING_OK else published), f
