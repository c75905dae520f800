"""Marking the dirty-page log: the kernel the rings call while logging is on.

The log (SET_LOG_BASE) is a bitmap with one bit per 4 KiB page of guest
memory: page = GPA // 4096 is bit ``page % 8`` of byte ``page // 8``
(vhost-user.rst, "Migration"; QEMU's vhost_log_chunk_t words read the same
bits on a little-endian host). The back-end sets the bit of every page it
writes while VHOST_F_LOG_ALL is on; QEMU clears bits concurrently with an
atomic exchange (vhost_dev_sync_region), so setting must be an atomic OR
(libvhost-user's vu_log_page, DPDK's vhost_log_page).

This sits with the rings, not in ``dirtylog``, because the ring kernels call
it; ``dirtylog.DirtyLog`` (the mapping, the front-end's sync) uses it too.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..protocol.constants import VHOST_LOG_PAGE
from . import atomics, errors
from .atomics import atomic_or, atomic_or_py
from .cache import depends_on
from .errors import E_LOG_RANGE, RING_OK

__all__ = ["VHOST_LOG_PAGE", "vhost_log_write", "vhost_log_write_py", "vhost_log_write_count",
           "vhost_log_write_count_py"]


@njit(cache=True, nogil=True, inline="always")
def vhost_log_write_count(log, gpa, length):
    """Mark the pages of [gpa, gpa + length) dirty in the bitmap ``log``;
    returns ``(status, marked)``: how many of their bits were clear before.

    The atomic OR returns the byte it replaced, so the count is exact even
    while QEMU clears bits concurrently, and costs nothing beyond the marks:
    no scan of the log. Returns (E_LOG_RANGE, 0) without marking anything
    when the range runs past the log (or gpa is negative); ``length <= 0``
    marks nothing.
    """
    if length <= 0:
        return RING_OK, 0
    # Compare without computing gpa + length: near 2**63 that sum would wrap.
    covered = log.size * 8 * VHOST_LOG_PAGE         # bytes of guest memory the log covers
    if gpa < 0 or gpa >= covered or length > covered - gpa:
        return E_LOG_RANGE, 0
    marked = 0
    for page in range(gpa // VHOST_LOG_PAGE, (gpa + length - 1) // VHOST_LOG_PAGE + 1):
        bit = np.uint8(1 << (page % 8))
        if atomic_or(log, page // 8, bit) & bit == 0:
            marked += 1
    return RING_OK, marked


@njit(cache=True, nogil=True)
def vhost_log_write(log, gpa, length):
    """Mark the pages of [gpa, gpa + length) dirty in the bitmap ``log``.

    Returns RING_OK, or E_LOG_RANGE without marking anything when the range
    runs past the log (or gpa is negative). ``length <= 0`` marks nothing.
    """
    return vhost_log_write_count(log, gpa, length)[0]


depends_on(vhost_log_write_count, atomics, errors)
depends_on(vhost_log_write, atomics, errors)


def vhost_log_write_count_py(log, gpa, length):
    """Plain-Python twin of :func:`vhost_log_write_count`."""
    if length <= 0:
        return RING_OK, 0
    covered = log.size * 8 * VHOST_LOG_PAGE
    if gpa < 0 or gpa >= covered or length > covered - gpa:
        return E_LOG_RANGE, 0
    marked = 0
    for page in range(gpa // VHOST_LOG_PAGE, (gpa + length - 1) // VHOST_LOG_PAGE + 1):
        bit = 1 << (page % 8)
        if not int(atomic_or_py(log, page // 8, bit)) & bit:
            marked += 1
    return RING_OK, marked


def vhost_log_write_py(log, gpa, length):
    """Plain-Python twin of :func:`vhost_log_write`."""
    return vhost_log_write_count_py(log, gpa, length)[0]
