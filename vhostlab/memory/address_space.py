"""The address space guest memory is mapped into: one reservation, slots in
it, guard pages around them, and mappings that outlive no numpy view.

:class:`AddressSpace` reserves one long stretch of address space with no
access rights (PROT_NONE; nothing is committed for it) and maps each file
into its own slot, with at least one inaccessible guard page before and after
every slot. One numpy ``uint8`` array, :attr:`AddressSpace.host`, spans the
whole reservation, so a kernel reaches any region through one array and an
offset; should an offset ever be wrong, the access lands on a guard page and
faults instead of silently touching a neighbour.

Lifetime: numpy views of :attr:`host` keep the reservation mapped. A slot
released while a view is alive stays mapped (and unused) until the last view
is dropped, so no view can dangle. :class:`MappedArea` gives every object
that owns such a mapping (guest memory, the dirty log) the same context
manager and finaliser.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np

from .. import sigbus
from .regions import PAGE_SIZE, RegionLimitError

__all__ = ["AddressSpace", "MappedArea", "views_alive", "round_up"]

# --- raw mmap through libc (Python's mmap module cannot map at a fixed address)
# Linux values (x86-64 and arm64).
_PROT_NONE, _PROT_RW = 0, mmap.PROT_READ | mmap.PROT_WRITE
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = (
    0x01, 0x02, 0x10, 0x20, 0x4000)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                       ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap_fixed(addr: int, length: int, prot: int, flags: int, fd: int,
                offset: int) -> None:
    got = _libc.mmap(addr, length, prot, flags | _MAP_FIXED, fd, offset)
    if got == _MAP_FAILED or got != addr:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap at {addr:#x}: {os.strerror(err)}")


def round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def views_alive(array: np.ndarray | None) -> bool:
    """Whether numpy views of ``array`` are alive outside its owner.

    Every view has ``array`` as its base; the owner's attribute and
    getrefcount's own argument are the two other references."""
    return array is not None and sys.getrefcount(array) > 3


class MappedArea:
    """An object that owns a mapping: ``with`` closes it, and so does the
    garbage collector. Subclasses define ``close`` (idempotent)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class AddressSpace:
    """A PROT_NONE reservation of ``size`` bytes with files mapped into slots.

    ``host`` is the uint8 array spanning it and ``base`` its address. Raises
    RegionLimitError if the reservation cannot be made.
    """

    def __init__(self, size: int) -> None:
        size = round_up(max(size, 4 * PAGE_SIZE), PAGE_SIZE)
        # Python's mmap marks a PROT_NONE mapping read-only for numpy, so map
        # read-write with MAP_NORESERVE (nothing committed) and then take all
        # access away with mprotect: untouched, this costs no memory.
        try:
            self._mm = mmap.mmap(-1, size, flags=_MAP_PRIVATE | _MAP_ANONYMOUS
                                 | _MAP_NORESERVE, prot=_PROT_RW)
        except OSError as exc:
            raise RegionLimitError(
                f"cannot reserve {size:#x} bytes of address space for guest "
                f"memory ({exc.strerror}); pass a smaller reserve=") from None
        self.host: np.ndarray | None = np.frombuffer(self._mm, np.uint8)
        self.base = self.host.ctypes.data
        if _libc.mprotect(self.base, size, _PROT_NONE) != 0:
            err = ctypes.get_errno()
            self.host = None
            self._mm.close()
            raise OSError(err, f"mprotect: {os.strerror(err)}")
        self.size = size
        self._slots: dict[int, int] = {}      # slot offset -> length, mapped
        self._retired: list[tuple[int, int]] = []   # released, still seen by views
        self.guard: sigbus.Guard | None = None

    def guard_sigbus(self) -> None:
        """Guard the whole reservation against SIGBUS (a file that may shrink)."""
        if self.guard is None:
            self.guard = sigbus.guard(self.base, self.size)

    def find_slot(self, length: int, align: int, what: str) -> int:
        """The offset of a free slot of ``length`` bytes aligned to ``align``:
        first fit, one guard (``align`` bytes, at least a page) before and
        after every slot. ``what`` names the region in the RegionLimitError."""
        used = sorted(list(self._slots.items()) + self._retired)
        candidate = align
        for start, used_len in used:
            if candidate + length + align <= start:
                return candidate
            candidate = max(candidate, round_up(start + used_len + align, align))
        if candidate + length + align <= self.size:
            return candidate
        raise RegionLimitError(
            f"{what}: {length:#x} bytes do not fit in the "
            f"{self.size:#x} bytes of reserved address space")

    def map(self, slot: int, length: int, fd: int, offset: int) -> None:
        """Map ``length`` bytes of ``fd`` from ``offset`` (MAP_SHARED) at the
        slot :meth:`find_slot` gave. Raises OSError."""
        _mmap_fixed(self.base + slot, length, _PROT_RW, _MAP_SHARED, fd, offset)
        self._slots[slot] = length

    def release(self, slot: int) -> None:
        """Unmap a slot (back to PROT_NONE), or, while views of :attr:`host`
        are alive, keep it mapped and unused until :meth:`close`."""
        length = self._slots.pop(slot)
        if self.views_alive():
            self._retired.append((slot, length))
        else:
            _mmap_fixed(self.base + slot, length, _PROT_NONE,
                        _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)

    def views_alive(self) -> bool:
        return views_alive(self.host)

    def close(self) -> None:
        """Drop the reservation: now, or when the last view is freed (the view
        holds the mmap object, which unmaps when it goes)."""
        if self._mm is None:
            return
        views = self.views_alive()
        self.host = None
        self._slots = {}
        if self.guard is not None:
            self.guard.release()
        if not views:
            self._mm.close()
        self._mm = None
