"""A region of guest memory: its four numbers, its errors, and the checks
made before it is mapped.

QEMU sends each region of guest RAM as ``struct vhost_user_memory_region``
(SET_MEM_TABLE, ADD_MEM_REG) with a file descriptor::

    guest_phys_addr  where the region starts in guest-physical space (GPA)
    memory_size      its length in bytes
    userspace_addr   where the front-end itself mapped it (QEMU's virtual
                     address; SET_VRING_ADDR speaks in these)
    mmap_offset      where the region starts in the file behind the fd

The wire struct is :class:`vhostlab.protocol.MemoryRegion` (a payload, which
refuses values that do not fit in a u64). :class:`GuestMemoryRegion` holds the
same four numbers as :class:`~vhostlab.memory.GuestMemory` maps them, and the
checks here refuse, with a named error, every region that cannot be mapped
safely: zero size, misaligned, ending past what a kernel can address, a file
too short for it, or overlapping a region already mapped.
"""
from __future__ import annotations

import mmap
import os
import stat
from typing import Iterable, NamedTuple

import numpy as np

from ..errors import VhostlabError

__all__ = [
    "PAGE_SIZE", "TARGET_PAGE_SIZE", "MAX_GUEST_ADDR", "GuestMemoryRegion",
    "GuestMemoryError", "UnmappedAddressError", "InvalidRegionError",
    "RegionOverlapError", "RegionLimitError", "RegionFileError", "RegionNotFoundError",
    "check_region", "check_file", "check_overlap",
]

# The host's page (Linux PAGE_SIZE, QEMU's qemu_real_host_page_size()): the
# unit of mmap, so of region alignment and of the guard pages.
PAGE_SIZE = mmap.PAGESIZE
# QEMU's TARGET_PAGE_SIZE on x86-64 and arm64 (TARGET_PAGE_BITS 12): the unit
# in which QEMU migrates RAM, keeps its own dirty bitmap and counts pages in
# query-migrate. The vhost log's page, VHOST_LOG_PAGE, is the same 4 KiB but a
# different constant (vhostlab.protocol.constants).
TARGET_PAGE_SIZE = 4096
# Kernels keep addresses in int64, so a region must end below 2**63.
MAX_GUEST_ADDR = 1 << 63

_U64 = 1 << 64


class GuestMemoryError(VhostlabError):
    """Base class of every guest-memory error."""


class UnmappedAddressError(GuestMemoryError):
    """An address range lies outside every region, or leaves its region."""


class InvalidRegionError(GuestMemoryError):
    """A region's own numbers are unusable (zero size, misaligned, too high)."""


class RegionOverlapError(GuestMemoryError):
    """A new region overlaps one already mapped (in GPA or userspace_addr)."""


class RegionLimitError(GuestMemoryError):
    """Too many regions, or no room left in the reserved address space."""


class RegionFileError(GuestMemoryError):
    """The region's fd cannot back it: fstat fails, wrong file type, file too
    short for mmap_offset + memory_size, or mmap itself fails."""


class RegionNotFoundError(GuestMemoryError):
    """REM_MEM_REG named a region that is not mapped."""


class GuestMemoryRegion(NamedTuple):
    """One region of guest memory as :class:`~vhostlab.memory.GuestMemory`
    holds it: the four numbers of ``struct vhost_user_memory_region``."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def __repr__(self) -> str:
        return (f"GuestMemoryRegion(guest_phys_addr={self.guest_phys_addr:#x}, "
                f"memory_size={self.memory_size:#x}, "
                f"userspace_addr={self.userspace_addr:#x}, "
                f"mmap_offset={self.mmap_offset:#x})")

    @property
    def end(self) -> int:
        """The first GPA after the region."""
        return self.guest_phys_addr + self.memory_size


def check_region(region) -> GuestMemoryRegion:
    """The region with plain-int fields, or InvalidRegionError: every field a
    u64, memory_size > 0, guest_phys_addr and mmap_offset page-aligned, the
    GPA range below MAX_GUEST_ADDR, the userspace_addr range below 2**64."""
    region = GuestMemoryRegion(*region)
    for field, value in zip(GuestMemoryRegion._fields, region):
        if not isinstance(value, (int, np.integer)) or not 0 <= value < _U64:
            raise InvalidRegionError(f"region {field} = {value!r}: must be a u64")
    region = GuestMemoryRegion(*(int(v) for v in region))
    gpa, size, uaddr, offset = region
    if size == 0:
        raise InvalidRegionError(f"region gpa {gpa:#x}: memory_size = 0")
    if gpa % PAGE_SIZE or offset % PAGE_SIZE:
        raise InvalidRegionError(
            f"region gpa {gpa:#x}: guest_phys_addr and mmap_offset "
            f"({offset:#x}) must be multiples of {PAGE_SIZE:#x}")
    if gpa + size > MAX_GUEST_ADDR:
        raise InvalidRegionError(
            f"region gpa {gpa:#x}: guest_phys_addr + memory_size = "
            f"{gpa + size:#x} exceeds {MAX_GUEST_ADDR:#x}")
    if uaddr + size > _U64:
        raise InvalidRegionError(
            f"region gpa {gpa:#x}: userspace_addr {uaddr:#x} + memory_size "
            f"{size:#x} wraps around 2**64")
    return region


def check_file(region: GuestMemoryRegion, fd: int) -> int:
    """fstat the fd: a regular file (or memfd) long enough for the region.
    Returns the mapping alignment (st_blksize: hugetlbfs files need huge-page
    offsets). Raises RegionFileError."""
    gpa, size, _, offset = region
    try:
        st = os.fstat(fd)
    except (OSError, TypeError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise RegionFileError(f"region gpa {gpa:#x}: fd {fd!r}: fstat failed: "
                              f"{reason}") from None
    if not stat.S_ISREG(st.st_mode):
        raise RegionFileError(f"region gpa {gpa:#x}: fd {fd} is not a regular "
                              f"file or memfd (mode {st.st_mode:#o})")
    if offset + size > st.st_size:
        raise RegionFileError(
            f"region gpa {gpa:#x}: mmap_offset {offset:#x} + memory_size "
            f"{size:#x} = {offset + size:#x} exceeds the file size "
            f"{st.st_size:#x} (fstat)")
    blk = st.st_blksize
    if blk > PAGE_SIZE and blk & (blk - 1) == 0 and blk <= 1 << 30:
        return blk
    return PAGE_SIZE


def check_overlap(region: GuestMemoryRegion, mapped: Iterable[GuestMemoryRegion]) -> None:
    """RegionOverlapError if ``region`` overlaps one of ``mapped`` in GPA or in
    userspace_addr (either would make two translations of one address)."""
    size = region.memory_size
    for other in mapped:
        for field in ("guest_phys_addr", "userspace_addr"):
            start, other_start = getattr(region, field), getattr(other, field)
            if start < other_start + other.memory_size and other_start < start + size:
                name = "gpa" if field == "guest_phys_addr" else field
                raise RegionOverlapError(
                    f"region {name} [{start:#x}, {start + size:#x}) overlaps the "
                    f"mapped region {name} [{other_start:#x}, "
                    f"{other_start + other.memory_size:#x}) (gpa {other.guest_phys_addr:#x})")
