"""Guest RX: the device writes frames into buffers the guest posted.

``vring_rx_burst`` (numba) and ``vring_rx_burst_py`` (its plain-Python twin,
same signature, same results) copy frames ``0 .. nframes-1`` of a frame arena
(``arena[offsets[k]:offsets[k] + lengths[k]]``) into device-writable chains,
each behind a virtio-net header of ``hdr_len`` bytes (0, 10, or 12): all
zeros (no checksum offload, GSO_NONE) except num_buffers (offset 10, when the
header has it), the number of chains the frame took.

Without MRG_RXBUF a frame takes one chain; a frame larger than its chain is
dropped (counted in ``dropped``) and the chain stays available, as Linux's
vhost-net does (what was already written into it stays there, and is
logged). With MRG_RXBUF (``mrg_rxbuf`` non-zero, 5.1.6.4) a frame spans as
many chains as it needs; each goes in the used ring with the bytes written
into it, and they are published together, once the whole frame is in.

While logging is on (``log`` non-empty) every guest page written is marked
in the dirty log, and with VHOST_VRING_F_LOG the used-ring writes too.
Returns ``(status, n)``: frames ``0 .. n-1`` are done (delivered or dropped);
the burst stops early when the ring runs out of buffers, or when ``descs``
reaches ``desc_budget`` (the service's weight). A chain is walked only until
the frame is in: descriptors after that are neither read nor checked.

Each twin here is its kernel's own code run by the interpreter
(``cache.twin``); only the helpers that touch guest memory (in ``chain`` and
the ``put_byte``/``copy_*`` pairs) have twins of their own, over a memoryview.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..memory import translation
from . import atomics, chain, errors, layout
from . import log as log_kernels
from .atomics import borrow, borrow_py, keep_alive
from .cache import depends_on, twin
from .chain import (CHAIN_END, CUR_INDEX, CUR_TABLE_GPA, avail_head, avail_head_py,
                    burst_end, burst_end_py, burst_start, burst_start_py, chain_next,
                    chain_next_py, chain_start, chain_start_py, copy_bytes, fail, fail_py,
                    over_budget, over_budget_py, put_used_elem, put_used_elem_py)
from .errors import E_ARENA, E_LOG_RANGE, RING_OK
from .layout import MAX_HDR_LEN
from .log import vhost_log_write_count, vhost_log_write_count_py

__all__ = ["vring_rx_burst", "vring_rx_burst_py"]

_NUM_BUFFERS = 10    # offset of num_buffers in the 12-byte header


@njit(cache=True, nogil=True, inline="always")
def put_byte(mem, offset, value):
    """Guest memory byte at ``offset`` = value."""
    mem[0][offset] = value


def put_byte_py(mv, offset, value):
    """Twin of :func:`put_byte`."""
    mv[offset] = value


@njit(cache=True, nogil=True, inline="always")
def copy_to_guest(mem, buf, arena, src, count):
    """Guest memory at ``buf`` = arena[src:src + count]."""
    copy_bytes(mem[0], buf, arena, src, count)


def copy_to_guest_py(mv, buf, arena, src, count):
    """Twin of :func:`copy_to_guest`."""
    mv[buf:buf + count] = arena[src:src + count]


@njit(cache=True, nogil=True, inline="always")
def _write_stream(mem, buf, count, pos, hdr_len, arena, src, nb):
    """Write bytes ``pos .. pos+count`` of header-then-frame at ``buf``.

    Header bytes are zero except num_buffers = 1; ``nb`` records where its two
    bytes went, so a frame spanning chains can patch it afterwards.
    """
    k = 0
    while k < count and pos + k < hdr_len:
        q = pos + k
        put_byte(mem, buf + k, 1 if q == _NUM_BUFFERS else 0)
        if q == _NUM_BUFFERS or q == _NUM_BUFFERS + 1:
            nb[q - _NUM_BUFFERS] = buf + k
        k += 1
    copy_to_guest(mem, buf + k, arena, src + pos + k - hdr_len, count - k)


_write_stream_py = twin(_write_stream, put_byte=put_byte_py, copy_to_guest=copy_to_guest_py)


@njit(cache=True, nogil=True, inline="always")
def rx_fill_chain(mem, arena, regions, log, s, desc, head, src, total, pos, hdr_len, nb):
    """Write bytes ``pos..total`` of header-then-frame into chain ``head`` as
    far as it goes, walking (and checking) the chain until the frame is in
    (what lies beyond is not read: a guest's long chain costs no more than
    the frame needs); logs what it writes. Returns ``(status, pos, written)``."""
    cur = chain_start(desc, int(s["num"]), head)
    written = 0
    while True:
        status, buf, gpa, length, cur = chain_next(mem, regions, s, cur, True)
        if status != RING_OK:
            break
        count = min(length, total - pos)
        if count > 0:
            _write_stream(mem, buf, count, pos, hdr_len, arena, src, nb)
            pos += count
            written += count
            if log.size > 0:
                logged, marked = vhost_log_write_count(log, gpa, count)
                if logged != RING_OK:
                    return fail(s, E_LOG_RANGE, head, cur[CUR_INDEX], cur[CUR_TABLE_GPA],
                                gpa, log.size), pos, written
                s["logged"] += marked
        if pos >= total:
            break
    return (RING_OK if status == CHAIN_END else status), pos, written


rx_fill_chain_py = twin(rx_fill_chain, chain_start=chain_start_py, chain_next=chain_next_py,
                        _write_stream=_write_stream_py, fail=fail_py,
                        vhost_log_write_count=vhost_log_write_count_py)


@njit(cache=True, nogil=True, inline="always")
def rx_write_frame(mem, arena, regions, log, s, desc, avail, position, left, src, size,
                   hdr_len, mrg_rxbuf, pending, nb):
    """Write one frame into the chains at avail ``position`` on (``left`` of
    them are available): one chain, or with MRG_RXBUF as many as it takes.

    Returns ``(status, chains, whole)``; ``pending[:chains]`` holds each
    chain's (head, bytes written), ``whole`` says the entire frame went in.
    """
    total, pos, chains = hdr_len + size, 0, 0
    while pos < total or chains == 0:
        if chains >= left:
            break                                   # out of buffers
        status, head = avail_head(mem, s, avail, position + chains)
        if status != RING_OK:
            return status, chains, False
        status, pos, written = rx_fill_chain(mem, arena, regions, log, s, desc, head, src,
                                             total, pos, hdr_len, nb)
        if status != RING_OK:
            return status, chains, False
        pending[chains, 0], pending[chains, 1] = head, written
        chains += 1
        if not mrg_rxbuf:
            break
    return RING_OK, chains, chains > 0 and pos >= total


rx_write_frame_py = twin(rx_write_frame, avail_head=avail_head_py,
                         rx_fill_chain=rx_fill_chain_py)


@njit(cache=True, nogil=True, inline="always")
def rx_commit_frame(mem, used, first, mask, pending, chains, nb, hdr_len):
    """The frame is in: num_buffers = chains (MRG_RXBUF), and its chains'
    used elements from used slot ``first`` on (published with the burst)."""
    if chains > 1 and hdr_len >= _NUM_BUFFERS + 2:
        put_byte(mem, nb[0], chains & 0xFF)
        put_byte(mem, nb[1], chains >> 8)
    for c in range(chains):
        put_used_elem(mem, used, (first + c) & mask, pending[c, 0], pending[c, 1])


rx_commit_frame_py = twin(rx_commit_frame, put_byte=put_byte_py,
                          put_used_elem=put_used_elem_py)


@njit(cache=True, nogil=True)
def vring_rx_burst(host, regions, vq, log, arena, offsets, lengths, nframes, hdr_len,
                   mrg_rxbuf):
    """Write ``nframes`` arena frames into RX chains; ``(status, n)``."""
    s = vq[0]
    if s["status"] != RING_OK:
        return int(s["status"]), 0
    if nframes > offsets.size or nframes > lengths.size or not 0 <= hdr_len <= MAX_HDR_LEN:
        return E_ARENA, 0
    status, mem, regions, desc, avail, used, ready = burst_start(host, regions, s)
    if status != RING_OK:
        return status, 0
    # Borrowed arrays: passing them to the helpers costs no reference counting.
    arena, log = borrow(arena), borrow(log)
    last, used_idx, mask = int(s["last_avail_idx"]), int(s["used_idx"]), int(s["num"]) - 1
    # A frame's chains go in the used ring only once all of it is written:
    # pending holds each one's (head, bytes), nb where num_buffers' bytes went.
    pending_owner, nb_owner = np.empty((int(s["num"]), 2), np.int64), np.empty(2, np.int64)
    pending, nb = borrow(pending_owner), borrow(nb_owner)
    taken = f = delivered = nbytes = dropped = 0
    while f < nframes and not over_budget(s):
        src, size = int(offsets[f]), int(lengths[f])
        if src < 0 or size < 0 or src + size > arena.size:
            status = E_ARENA                    # the caller's bug: ring not broken
            break
        status, chains, whole = rx_write_frame(
            mem, arena, regions, log, s, desc, avail, last + taken, ready - taken, src, size,
            hdr_len, mrg_rxbuf, pending, nb)
        if status != RING_OK:
            break
        if not whole:
            if not mrg_rxbuf and chains == 1:   # too big for its chain: dropped,
                dropped += 1                    # the chain stays available
                f += 1
                continue
            break                               # wait for more buffers
        rx_commit_frame(mem, used, used_idx + taken, mask, pending, chains, nb, hdr_len)
        taken += chains
        nbytes += size
        delivered += 1
        f += 1
    keep_alive(pending_owner)              # the borrowed views were used up to here
    keep_alive(nb_owner)
    s["dropped"] += dropped
    return burst_end(mem, log, s, avail, used, taken, delivered, nbytes, status), f


depends_on(vring_rx_burst, translation, atomics, chain, errors, layout, log_kernels)
vring_rx_burst_py = twin(vring_rx_burst, burst_start=burst_start_py, borrow=borrow_py,
                         keep_alive=None, over_budget=over_budget_py,
                         rx_write_frame=rx_write_frame_py, rx_commit_frame=rx_commit_frame_py,
                         burst_end=burst_end_py)
