"""Guest RAM as a front-end creates it: memfds laid out like QEMU's machines.

A back-end only maps what it is sent; the built-in front-end must first
create guest RAM, as QEMU does with ``memory-backend-memfd``.
:func:`ram_layout` says where the pieces of one memfd go in guest-physical
space (QEMU's ``pc`` machine, or one flat region), and :func:`new_memfd`
makes the file. :meth:`GuestMemory.allocate
<vhostlab.memory.GuestMemory.allocate>` and :meth:`allocate_region
<vhostlab.memory.GuestMemory.allocate_region>` put the two together.
"""
from __future__ import annotations

import os

from .regions import PAGE_SIZE, InvalidRegionError

__all__ = ["DEFAULT_RAM_SIZE", "ram_layout", "new_memfd"]

DEFAULT_RAM_SIZE = 256 << 20

# QEMU's pc machine: RAM below 3 GiB in low memory, the rest from 4 GiB.
_LOW_RAM_END = 0xC0000000


def ram_layout(ram_size: int, layout: str = "pc") -> list[tuple[int, int, int]]:
    """``[(guest_phys_addr, memory_size, mmap_offset), ...]`` of ``ram_size``
    bytes of RAM in one file.

    ``"pc"`` is what QEMU's pc machine sends with -m 256M: three regions of
    ONE memfd, gpa 0x0 size 0xc0000 (mmap_offset 0), gpa 0xe0000 size 0x10000
    (mmap_offset 0xe0000), and gpa 0x100000 up to the end of low RAM
    (mmap_offset 0x100000); RAM above 3 GiB goes to a fourth region at 4 GiB,
    as with QEMU's gigabyte-aligned split. ``"flat"`` is one region at gpa 0.
    Raises InvalidRegionError, ValueError for an unknown layout.
    """
    if ram_size <= 0 or ram_size % PAGE_SIZE:
        raise InvalidRegionError(
            f"ram_size = {ram_size:#x}: must be a positive multiple of {PAGE_SIZE:#x}")
    if layout == "flat":
        return [(0, ram_size, 0)]
    if layout != "pc":
        raise ValueError(f"layout = {layout!r}: must be 'pc' or 'flat'")
    if ram_size <= 0x100000:
        raise InvalidRegionError(
            f"ram_size = {ram_size:#x}: the pc layout needs more than 1 MiB")
    low = min(ram_size, _LOW_RAM_END)
    pieces = [(0x0, 0xC0000, 0x0), (0xE0000, 0x10000, 0xE0000),
              (0x100000, low - 0x100000, 0x100000)]
    if ram_size > low:
        pieces.append((1 << 32, ram_size - low, low))
    return pieces


def new_memfd(size: int) -> int:
    """A new memfd of ``size`` bytes (close-on-exec), owned by the caller."""
    fd = os.memfd_create("vhostlab-guest-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd
