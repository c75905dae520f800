"""Translation: from a guest address to a place in this process's memory.

Every address the guest hands the back-end (a GPA in a descriptor) is turned
into an offset in the one array that spans the address space
(:mod:`vhostlab.memory.address_space`), after checking that the whole range
lies inside one region. The regions are one ``int64`` table, a row per
region: ``[guest_phys_addr, memory_size, host offset, userspace_addr]``
(columns ``REGION_GPA``, ``REGION_SIZE``, ``REGION_HOST``, ``REGION_UADDR``),
largest region first, so most addresses are found at the first row.

:func:`gpa_to_host` is the numba kernel the ring kernels call per descriptor;
:func:`gpa_to_host_py` is its plain-Python twin over the same table as lists.
The rest turns a failed lookup into a named error, and translates the
front-end's virtual addresses (SET_VRING_ADDR speaks in userspace_addr).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from numba import njit

from .regions import GuestMemoryRegion, UnmappedAddressError

__all__ = ["REGION_GPA", "REGION_SIZE", "REGION_HOST", "REGION_UADDR",
           "gpa_to_host", "gpa_to_host_py", "region_table", "host_offset",
           "region_of", "uva_to_gpa"]

REGION_GPA, REGION_SIZE, REGION_HOST, REGION_UADDR = range(4)


@njit(cache=True, nogil=True)
def gpa_to_host(regions, gpa, length):
    """Host offset of the GPA range [gpa, gpa + length), or -1.

    ``regions`` is the int64 region table. The whole range must lie inside one
    region: a range that starts in a region and runs past its end is refused
    even if the next region follows it directly (it may be mapped far away).
    """
    if gpa < 0 or length < 0:
        return -1
    for r in range(regions.shape[0]):
        offset = gpa - regions[r, REGION_GPA]
        size = regions[r, REGION_SIZE]
        if 0 <= offset < size:
            if length <= size - offset:
                return regions[r, REGION_HOST] + offset
            return -1
    return -1


def gpa_to_host_py(regions, gpa, length):
    """Plain-Python twin of :func:`gpa_to_host`; ``regions`` is the table as
    Python lists (``table.tolist()``)."""
    if gpa < 0 or length < 0:
        return -1
    for row in regions:
        offset = gpa - row[REGION_GPA]
        size = row[REGION_SIZE]
        if 0 <= offset < size:
            if length <= size - offset:
                return row[REGION_HOST] + offset
            return -1
    return -1


def region_table(rows: Iterable[tuple[GuestMemoryRegion, int]]) -> np.ndarray:
    """The read-only int64 table of ``(region, host offset)`` pairs, largest
    region first. userspace_addr is stored as its int64 bit pattern."""
    rows = sorted(rows, key=lambda row: -row[0].memory_size)
    table = np.zeros((len(rows), 4), np.int64)
    for i, (r, host) in enumerate(rows):
        uaddr = r.userspace_addr - (1 << 64) if r.userspace_addr >= 1 << 63 \
            else r.userspace_addr
        table[i] = (r.guest_phys_addr, r.memory_size, host, uaddr)
    table.flags.writeable = False
    return table


def region_of(regions: Sequence[GuestMemoryRegion], gpa: int) -> GuestMemoryRegion:
    """The region holding ``gpa``; UnmappedAddressError if none does."""
    for r in regions:
        if r.guest_phys_addr <= gpa < r.end:
            return r
    raise UnmappedAddressError(f"gpa {gpa:#x} is in no mapped region")


def host_offset(table_list: list, regions: Sequence[GuestMemoryRegion], gpa: int,
                length: int) -> int:
    """Host offset of [gpa, gpa + length) through the table (as lists), or
    UnmappedAddressError naming the region the range leaves. An empty range
    may sit at the very end of a region."""
    if length < 0:
        raise ValueError(f"length = {length}: must be >= 0")
    host = gpa_to_host_py(table_list, gpa, max(length, 1))
    if host < 0 and length == 0:
        host = gpa_to_host_py(table_list, gpa - 1, 1)   # empty range at the end
        host = host + 1 if host >= 0 else -1
    if host >= 0:
        return host
    r = region_of(regions, gpa)
    raise UnmappedAddressError(
        f"gpa {gpa:#x} + length {length:#x} = {gpa + length:#x} leaves the "
        f"region [{r.guest_phys_addr:#x}, {r.end:#x})")


def uva_to_gpa(regions: Sequence[GuestMemoryRegion], userspace_addr: int,
               length: int = 1) -> int:
    """Translate a front-end virtual address range (as in SET_VRING_ADDR) to a
    GPA; the whole range must lie inside one region."""
    for r in regions:
        offset = userspace_addr - r.userspace_addr
        if 0 <= offset < r.memory_size:
            if length > r.memory_size - offset:
                raise UnmappedAddressError(
                    f"userspace_addr {userspace_addr:#x} + {length:#x} leaves the "
                    f"region userspace_addr [{r.userspace_addr:#x}, "
                    f"{r.userspace_addr + r.memory_size:#x})")
            return r.guest_phys_addr + offset
    raise UnmappedAddressError(
        f"userspace_addr {userspace_addr:#x} is in no mapped region")
