"""Guest RX on a packed ring: the device writes frames into buffers the guest posted.

``vring_packed_rx_burst`` (numba) and ``vring_packed_rx_burst_py`` (its
plain-Python twin) have the signature and the results of the split ring's
:func:`.rx.vring_rx_burst`: frames ``0 .. nframes-1`` of an arena go behind a
``hdr_len``-byte virtio-net header (zeros but num_buffers) into
device-writable chains, one chain a frame, or with MRG_RXBUF as many as the
frame needs; a frame too big for its chain without MRG_RXBUF is dropped and
the chain stays available; every page written is logged while logging is on.

What the packed ring changes: a chain is available when its first
descriptor's flags say so for the device's wrap counter; a chain goes back as
one used descriptor (id, bytes written, flags) at the device's used position,
the chains of one frame once the whole frame is in; and once the frame is in,
the chain's remaining *ring* descriptors are still stepped over (flags and
id only, their buffers neither read nor checked): the device must know where
the chain ends to return it.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..memory import translation
from . import atomics, chain, errors, layout, packed_chain, packed_layout
from . import log as log_kernels
from . import rx as rx_kernels
from .atomics import borrow, borrow_py, keep_alive
from .cache import depends_on, twin
from .chain import CHAIN_END, fail, fail_py, over_budget, over_budget_py
from .errors import E_ARENA, E_LOG_RANGE, RING_OK
from .layout import MAX_HDR_LEN
from .log import vhost_log_write_count, vhost_log_write_count_py
from .packed_chain import (P_COUNT, P_HEAD, P_ID, P_INDEX, P_POS, P_TABLE_GPA, P_WRAP,
                           packed_burst_end, packed_burst_end_py, packed_burst_start,
                           packed_burst_start_py, packed_chain_next, packed_chain_next_py,
                           packed_chain_skip, packed_chain_skip_py, packed_chain_start,
                           packed_chain_start_py, packed_desc_avail, packed_desc_avail_py,
                           packed_put_used, packed_put_used_py)
from .rx import _NUM_BUFFERS, _write_stream, _write_stream_py, put_byte, put_byte_py

__all__ = ["vring_packed_rx_burst", "vring_packed_rx_burst_py"]


@njit(cache=True, nogil=True, inline="always")
def packed_rx_fill_chain(mem, arena, regions, log, s, cur, src, total, pos, hdr_len, nb):
    """Write bytes ``pos..total`` of header-then-frame into the chain at
    ``cur`` as far as it goes, logging what it writes; once the frame is in,
    step over the chain's remaining ring descriptors. Returns
    ``(status, pos, written, cursor)``."""
    written = 0
    while True:
        status, buf, gpa, length, cur = packed_chain_next(mem, regions, s, cur, True)
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
                    return fail(s, E_LOG_RANGE, cur[P_HEAD], cur[P_INDEX], cur[P_TABLE_GPA],
                                gpa, log.size), pos, written, cur
                s["logged"] += marked
        if pos >= total:
            status, cur = packed_chain_skip(mem, s, cur)
            break
    return (RING_OK if status == CHAIN_END else status), pos, written, cur


packed_rx_fill_chain_py = twin(packed_rx_fill_chain, packed_chain_next=packed_chain_next_py,
                               _write_stream=_write_stream_py, fail=fail_py,
                               vhost_log_write_count=vhost_log_write_count_py,
                               packed_chain_skip=packed_chain_skip_py)


@njit(cache=True, nogil=True, inline="always")
def packed_rx_write_frame(mem, arena, regions, log, s, desc, pos, wrap, src, size, hdr_len,
                          mrg_rxbuf, pending, nb):
    """Write one frame into the chains from ring slot ``pos`` (lap ``wrap``) on:
    one chain, or with MRG_RXBUF as many as it takes.

    Returns ``(status, chains, whole, pos, wrap)``: ``pending[:chains]`` holds
    each chain's (id, bytes written, ring descriptors), ``whole`` says the
    entire frame went in, ``pos``/``wrap`` where the next chain would start.
    """
    num = int(s["num"])
    total, done, chains = hdr_len + size, 0, 0
    while done < total or chains == 0:
        if chains >= num or not packed_desc_avail(mem, desc, pos, wrap):
            break                                   # out of buffers
        cur = packed_chain_start(desc, num, pos, wrap)
        status, done, written, cur = packed_rx_fill_chain(mem, arena, regions, log, s, cur,
                                                          src, total, done, hdr_len, nb)
        if status != RING_OK:
            return status, chains, False, pos, wrap
        pending[chains, 0], pending[chains, 1] = cur[P_ID], written
        pending[chains, 2] = cur[P_COUNT]
        pos, wrap = cur[P_POS], cur[P_WRAP]
        chains += 1
        if not mrg_rxbuf:
            break
    return RING_OK, chains, chains > 0 and done >= total, pos, wrap


packed_rx_write_frame_py = twin(packed_rx_write_frame, packed_desc_avail=packed_desc_avail_py,
                                packed_chain_start=packed_chain_start_py,
                                packed_rx_fill_chain=packed_rx_fill_chain_py)


@njit(cache=True, nogil=True, inline="always")
def packed_rx_commit_frame(mem, log, s, desc, pending, chains, nb, hdr_len):
    """The frame is in: num_buffers = chains (MRG_RXBUF), and its chains' used
    descriptors. Returns RING_OK or E_LOG_RANGE."""
    if chains > 1 and hdr_len >= _NUM_BUFFERS + 2:
        put_byte(mem, nb[0], chains & 0xFF)
        put_byte(mem, nb[1], chains >> 8)
    for c in range(chains):
        status = packed_put_used(mem, log, s, desc, pending[c, 0], pending[c, 1],
                                 pending[c, 2])
        if status != RING_OK:
            return status
    return RING_OK


packed_rx_commit_frame_py = twin(packed_rx_commit_frame, put_byte=put_byte_py,
                                 packed_put_used=packed_put_used_py)


@njit(cache=True, nogil=True)
def vring_packed_rx_burst(host, regions, vq, log, arena, offsets, lengths, nframes, hdr_len,
                          mrg_rxbuf):
    """Write ``nframes`` arena frames into RX chains; ``(status, n)``."""
    s = vq[0]
    if s["status"] != RING_OK:
        return int(s["status"]), 0
    if nframes > offsets.size or nframes > lengths.size or not 0 <= hdr_len <= MAX_HDR_LEN:
        return E_ARENA, 0
    status, mem, regions, desc, driver, device = packed_burst_start(host, regions, s)
    if status != RING_OK:
        return status, 0
    arena, log = borrow(arena), borrow(log)
    num = int(s["num"])
    pos, wrap = int(s["last_avail_idx"]), int(s["avail_wrap_counter"])
    # pending: each chain of the frame being written (id, bytes, ring descriptors)
    pending_owner, nb_owner = np.empty((num, 3), np.int64), np.empty(2, np.int64)
    pending, nb = borrow(pending_owner), borrow(nb_owner)
    taken = f = delivered = nbytes = dropped = 0
    while f < nframes and not over_budget(s):
        src, size = int(offsets[f]), int(lengths[f])
        if src < 0 or size < 0 or src + size > arena.size:
            status = E_ARENA                    # the caller's bug: ring not broken
            break
        status, chains, whole, npos, nwrap = packed_rx_write_frame(
            mem, arena, regions, log, s, desc, pos, wrap, src, size, hdr_len, mrg_rxbuf,
            pending, nb)
        if status != RING_OK:
            break
        if not whole:
            if not mrg_rxbuf and chains == 1:   # too big for its chain: dropped,
                dropped += 1                    # the chain stays available
                f += 1
                continue
            break                               # wait for more buffers
        status = packed_rx_commit_frame(mem, log, s, desc, pending, chains, nb, hdr_len)
        pos, wrap = npos, nwrap
        taken += chains
        nbytes += size
        delivered += 1
        f += 1
        if status != RING_OK:
            break
    keep_alive(pending_owner)              # the borrowed views were used up to here
    keep_alive(nb_owner)
    s["dropped"] += dropped
    s["last_avail_idx"], s["avail_wrap_counter"] = pos, wrap
    return packed_burst_end(mem, log, s, desc, driver, device, taken, delivered, nbytes,
                            status), f


depends_on(vring_packed_rx_burst, translation, atomics, chain, errors, layout, log_kernels,
           packed_chain, packed_layout, rx_kernels)
vring_packed_rx_burst_py = twin(
    vring_packed_rx_burst, packed_burst_start=packed_burst_start_py, borrow=borrow_py,
    keep_alive=None, over_budget=over_budget_py, packed_rx_write_frame=packed_rx_write_frame_py,
    packed_rx_commit_frame=packed_rx_commit_frame_py, packed_burst_end=packed_burst_end_py)
