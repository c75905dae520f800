"""Guest memory: the regions of a vhost-user memory table, mapped into this process.

Theory of operation
-------------------
QEMU tells a back-end where guest RAM lives with SET_MEM_TABLE (or one region
at a time with ADD_MEM_REG / REM_MEM_REG). Each region comes with a file
descriptor and four numbers (``struct vhost_user_memory_region``)::

    guest_phys_addr  where the region starts in guest-physical space (GPA)
    memory_size      its length in bytes
    userspace_addr   where the front-end itself mapped it (QEMU's virtual
                     address; SET_VRING_ADDR speaks in these)
    mmap_offset      where the region starts in the file behind the fd

The back-end maps each fd with MAP_SHARED, so it sees the very pages the guest
sees, and from then on turns each address the guest hands it (a GPA in a
descriptor) into a place in its own memory, after checking that the whole
range lies inside one region.

How this module lays it out: a :class:`GuestMemory` reserves one long stretch
of address space with no access rights (PROT_NONE) and maps every region into
its own slot of it, with inaccessible guard pages around each slot. One numpy
``uint8`` array then spans all guest memory, and a region is one row of an
``int64`` table ``[guest_phys_addr, memory_size, host offset, userspace_addr]``
(columns ``REGION_GPA``, ``REGION_SIZE``, ``REGION_HOST``, ``REGION_UADDR``).
A numba kernel takes that array and that table and translates with
:func:`gpa_to_host` (a plain-Python twin, :func:`gpa_to_host_py`, does the
same). Should a translation ever be wrong, the access lands on a guard page
and faults instead of silently touching a neighbour; the checks make sure it
never happens.

The other side, for the built-in front-end: :meth:`GuestMemory.allocate`
creates guest RAM in one memfd laid out like QEMU's ``pc`` machine (three
regions below 1 MiB and above, from ONE fd), and :meth:`allocate_region` adds
more (what a front-end sends with ADD_MEM_REG).

File descriptors: :meth:`add_region` maps the fd it is given and does not keep
it; the caller still owns it and may close it as soon as the call returns (the
mapping holds its own reference to the file). Memory made by
:meth:`allocate` / :meth:`allocate_region` owns its memfds (the front-end sends
them with SET_MEM_TABLE or ADD_MEM_REG) and closes them in :meth:`close`.

Lifetime: numpy views returned by :meth:`view` keep guest memory mapped.
:meth:`close` and :meth:`remove_region` unmap at once when no view is alive;
otherwise the pages stay mapped (and out of the table) until the last view is
dropped, so no view can ever dangle.

Errors are :class:`GuestMemoryError` subclasses whose messages name the field,
the value and the limit.
"""
from __future__ import annotations

from .errors import VhostlabError

import ctypes
import mmap
import os
import stat
import sys
from typing import Iterable, NamedTuple

import numpy as np
from numba import njit

from . import sigbus

__all__ = [
    "PAGE_SIZE", "VHOST_USER_MAX_RAM_SLOTS", "VHOST_MEMORY_BASELINE_NREGIONS",
    "MAX_GUEST_ADDR", "DEFAULT_RESERVE",
    "REGION_GPA", "REGION_SIZE", "REGION_HOST", "REGION_UADDR",
    "MemoryRegion", "GuestMemory", "gpa_to_host", "gpa_to_host_py",
    "GuestMemoryError", "UnmappedAddressError", "InvalidRegionError",
    "RegionOverlapError", "RegionLimitError", "RegionFileError",
    "RegionNotFoundError",
]

PAGE_SIZE = mmap.PAGESIZE
# QEMU hw/virtio/vhost-user.c: the most regions a back-end may ask for with
# GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS), and the fixed SET_MEM_TABLE limit.
VHOST_USER_MAX_RAM_SLOTS = 32
VHOST_MEMORY_BASELINE_NREGIONS = 8
# Kernels keep addresses in int64, so a region must end below 2**63.
MAX_GUEST_ADDR = 1 << 63
DEFAULT_RESERVE = 64 << 30
DEFAULT_RAM_SIZE = 256 << 20

REGION_GPA, REGION_SIZE, REGION_HOST, REGION_UADDR = range(4)

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


class MemoryRegion(NamedTuple):
    """One region of a memory table (``struct vhost_user_memory_region``)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def __repr__(self) -> str:
        return (f"MemoryRegion(guest_phys_addr={self.guest_phys_addr:#x}, "
                f"memory_size={self.memory_size:#x}, "
                f"userspace_addr={self.userspace_addr:#x}, "
                f"mmap_offset={self.mmap_offset:#x})")


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


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


class _Mapping(NamedTuple):
    region: MemoryRegion
    slot: int          # offset of the mapping in the reservation (aligned)
    slot_len: int      # length of the mapping
    host: int          # offset of the region's first byte in the reservation
    owned_fd: int      # memfd this object created and owns (may back several
                       # regions, as in the pc layout), or -1
    seals: int | None = None   # the fd's memfd seals when mapped (None: not a memfd)


def _check_u64(region: MemoryRegion) -> None:
    for field, value in zip(MemoryRegion._fields, region):
        if not isinstance(value, (int, np.integer)) or not 0 <= value < _U64:
            raise InvalidRegionError(f"region {field} = {value!r}: must be a u64")


class GuestMemory:
    """Guest RAM as a set of mapped regions, with bounds-checked access.

    Back-end side: ``GuestMemory.from_table([(region, fd), ...])`` for
    SET_MEM_TABLE, then :meth:`add_region` / :meth:`remove_region` for
    ADD_MEM_REG / REM_MEM_REG. Front-end side: :meth:`allocate`.
    ``max_regions`` bounds the table (VHOST_USER_MAX_RAM_SLOTS by default);
    ``reserve`` is the address space set aside for all regions (no memory is
    committed for it).
    """

    def __init__(self, *, max_regions: int = VHOST_USER_MAX_RAM_SLOTS,
                 reserve: int = DEFAULT_RESERVE) -> None:
        self._closed = True           # until fully built: close() does nothing
        if max_regions < 1:
            raise ValueError(f"max_regions = {max_regions}: must be >= 1")
        self.max_regions = max_regions
        self._maps: list[_Mapping] = []
        self._retired: list[tuple[int, int]] = []   # slots still seen by views
        self._table = np.zeros((0, 4), np.int64)
        self._table_list: list[list[int]] = []
        reserve = _round_up(max(reserve, 4 * PAGE_SIZE), PAGE_SIZE)
        # Python's mmap marks a PROT_NONE mapping read-only for numpy, so map
        # read-write with MAP_NORESERVE (nothing committed) and then take all
        # access away with mprotect: untouched, this costs no memory.
        try:
            self._mm = mmap.mmap(-1, reserve, flags=_MAP_PRIVATE | _MAP_ANONYMOUS
                                 | _MAP_NORESERVE, prot=_PROT_RW)
        except OSError as exc:
            raise RegionLimitError(
                f"cannot reserve {reserve:#x} bytes of address space for guest "
                f"memory ({exc.strerror}); pass a smaller reserve=") from None
        self._host = np.frombuffer(self._mm, np.uint8)
        self._base = self._host.ctypes.data
        if _libc.mprotect(self._base, reserve, _PROT_NONE) != 0:
            err = ctypes.get_errno()
            self._host = None
            self._mm.close()
            raise OSError(err, f"mprotect: {os.strerror(err)}")
        self._reserve = reserve
        self._guard: sigbus.Guard | None = None
        self._closed = False

    # ----------------------------------------------------------- construction
    @classmethod
    def from_table(cls, table: Iterable[tuple[MemoryRegion, int]],
                   **kwargs) -> "GuestMemory":
        """Map a whole memory table (SET_MEM_TABLE): ``[(region, fd), ...]``.

        The fds stay the caller's. On any error nothing stays mapped.
        """
        memory = cls(**kwargs)
        try:
            for region, fd in table:
                memory.add_region(MemoryRegion(*region), fd)
        except BaseException:
            memory.close()
            raise
        return memory

    @classmethod
    def allocate(cls, ram_size: int = DEFAULT_RAM_SIZE, *, layout: str = "pc",
                 **kwargs) -> "GuestMemory":
        """Create guest RAM in one memfd, laid out like QEMU's machines.

        ``layout="pc"`` gives what QEMU's pc machine sends with -m 256M: three
        regions from ONE memfd, gpa 0x0 size 0xc0000 (mmap_offset 0), gpa
        0xe0000 size 0x10000 (mmap_offset 0xe0000), and gpa 0x100000 up to the
        end of low RAM (mmap_offset 0x100000); RAM above 3 GiB goes to a fourth
        region at 4 GiB, as with QEMU's gigabyte-aligned split. ``"flat"`` is
        a single region at gpa 0. ``userspace_addr`` of each region is where
        this process mapped it, as in QEMU. The memfd is owned (see
        :meth:`memory_table`).
        """
        if ram_size <= 0 or ram_size % PAGE_SIZE:
            raise InvalidRegionError(
                f"ram_size = {ram_size:#x}: must be a positive multiple of {PAGE_SIZE:#x}")
        if layout == "flat":
            pieces = [(0, ram_size, 0)]
        elif layout == "pc":
            if ram_size <= 0x100000:
                raise InvalidRegionError(
                    f"ram_size = {ram_size:#x}: the pc layout needs more than 1 MiB")
            low = min(ram_size, 0xC0000000)
            pieces = [(0x0, 0xC0000, 0x0), (0xE0000, 0x10000, 0xE0000),
                      (0x100000, low - 0x100000, 0x100000)]
            if ram_size > low:
                pieces.append((1 << 32, ram_size - low, low))
        else:
            raise ValueError(f"layout = {layout!r}: must be 'pc' or 'flat'")
        memory = cls(**kwargs)
        fd = os.memfd_create("vhostlab-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, ram_size)
            for gpa, size, offset in pieces:
                memory._add(MemoryRegion(gpa, size, 0, offset), fd,
                            owned=True, own_uaddr=True)
        except BaseException:
            if not any(m.owned_fd == fd for m in memory._maps):
                os.close(fd)
            memory.close()
            raise
        return memory

    def allocate_region(self, guest_phys_addr: int, memory_size: int) -> MemoryRegion:
        """Add a region backed by a new memfd this object owns (a front-end's
        ADD_MEM_REG); returns it with its userspace_addr filled in."""
        fd = os.memfd_create("vhostlab-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, memory_size)
            return self._add(MemoryRegion(guest_phys_addr, memory_size, 0, 0),
                             fd, owned=True, own_uaddr=True)
        except BaseException:
            if not any(m.owned_fd == fd for m in self._maps):
                os.close(fd)
            raise

    # ------------------------------------------------------ regions in and out
    def add_region(self, region: MemoryRegion, fd: int) -> None:
        """Map one region (ADD_MEM_REG, or one entry of SET_MEM_TABLE).

        Raises InvalidRegionError, RegionOverlapError, RegionLimitError or
        RegionFileError. The fd stays the caller's.
        """
        self._add(MemoryRegion(*region), fd, owned=False, own_uaddr=False)

    def _add(self, region: MemoryRegion, fd: int, *, owned: bool,
             own_uaddr: bool) -> MemoryRegion:
        self._check_open()
        _check_u64(region)
        region = MemoryRegion(*(int(v) for v in region))
        gpa, size, uaddr, offset = region
        self._check_values(region)
        if len(self._maps) >= self.max_regions:
            raise RegionLimitError(f"region gpa {gpa:#x}: already {len(self._maps)} "
                                   f"regions, the limit is {self.max_regions}")
        align = self._check_file(region, fd)
        seals = sigbus.file_seals(fd)
        if not owned and not (seals or 0) & sigbus.F_SEAL_SHRINK and self._guard is None:
            # The front-end may shrink this file under us: guard against SIGBUS.
            self._guard = sigbus.guard(self._base, self._reserve)
        map_off = offset - offset % align
        slot_len = _round_up(offset - map_off + size, align)
        slot = self._find_slot(slot_len, align, gpa)
        host = slot + (offset - map_off)
        if own_uaddr:
            region = region._replace(userspace_addr=self._base + host)
        self._check_overlap(region)
        try:
            _mmap_fixed(self._base + slot, slot_len, _PROT_RW, _MAP_SHARED, fd, map_off)
        except OSError as exc:
            raise RegionFileError(f"region gpa {gpa:#x}: mmap of fd {fd} at offset "
                                  f"{map_off:#x} failed: {exc.strerror}") from None
        self._maps.append(_Mapping(region, slot, slot_len, host, fd if owned else -1, seals))
        self._rebuild_table()
        return region

    @staticmethod
    def _check_values(region: MemoryRegion) -> None:
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

    @staticmethod
    def _check_file(region: MemoryRegion, fd: int) -> int:
        """fstat the fd: a regular file long enough. Returns the mapping
        alignment (st_blksize: hugetlbfs files need huge-page offsets)."""
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

    def _check_overlap(self, region: MemoryRegion) -> None:
        gpa, size, uaddr, _ = region
        for m in self._maps:
            other = m.region
            if gpa < other.guest_phys_addr + other.memory_size and \
                    other.guest_phys_addr < gpa + size:
                raise RegionOverlapError(
                    f"region gpa [{gpa:#x}, {gpa + size:#x}) overlaps the mapped "
                    f"region gpa [{other.guest_phys_addr:#x}, "
                    f"{other.guest_phys_addr + other.memory_size:#x})")
            if uaddr < other.userspace_addr + other.memory_size and \
                    other.userspace_addr < uaddr + size:
                raise RegionOverlapError(
                    f"region gpa {gpa:#x}: userspace_addr [{uaddr:#x}, "
                    f"{uaddr + size:#x}) overlaps that of region gpa "
                    f"{other.guest_phys_addr:#x}")

    def _find_slot(self, length: int, align: int, gpa: int) -> int:
        """First fit in the reservation, one guard (``align`` bytes, at least a
        page) before and after every slot."""
        used = sorted([(m.slot, m.slot + m.slot_len) for m in self._maps]
                      + self._retired)
        candidate = align
        for start, end in used:
            if candidate + length + align <= start:
                return candidate
            candidate = max(candidate, _round_up(end + align, align))
        if candidate + length + align <= self._reserve:
            return candidate
        raise RegionLimitError(
            f"region gpa {gpa:#x}: {length:#x} bytes do not fit in the "
            f"{self._reserve:#x} bytes of reserved address space")

    def remove_region(self, region: MemoryRegion) -> None:
        """Unmap the region matching guest_phys_addr, memory_size and
        userspace_addr (REM_MEM_REG; mmap_offset is not compared).

        If numpy views of guest memory are alive, its pages stay mapped (out of
        the table: no translation reaches them) until :meth:`close`.
        """
        self._check_open()
        region = MemoryRegion(*region)
        for i, m in enumerate(self._maps):
            r = m.region
            if (r.guest_phys_addr, r.memory_size, r.userspace_addr) == \
                    (region.guest_phys_addr, region.memory_size, region.userspace_addr):
                break
        else:
            raise RegionNotFoundError(
                f"no mapped region has guest_phys_addr {region.guest_phys_addr:#x}, "
                f"memory_size {region.memory_size:#x} and userspace_addr "
                f"{region.userspace_addr:#x}")
        del self._maps[i]
        self._rebuild_table()
        if self._views_alive():
            self._retired.append((m.slot, m.slot + m.slot_len))
        else:
            _mmap_fixed(self._base + m.slot, m.slot_len, _PROT_NONE,
                        _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if m.owned_fd >= 0 and not any(x.owned_fd == m.owned_fd for x in self._maps):
            os.close(m.owned_fd)

    def _rebuild_table(self) -> None:
        # Largest region first: most guest addresses are found at the first try.
        rows = sorted(self._maps, key=lambda m: -m.region.memory_size)
        table = np.zeros((len(rows), 4), np.int64)
        for i, m in enumerate(rows):
            r = m.region
            uaddr = r.userspace_addr - _U64 if r.userspace_addr >= 1 << 63 else r.userspace_addr
            table[i] = (r.guest_phys_addr, r.memory_size, m.host, uaddr)
        table.flags.writeable = False
        # A new array each time: a kernel already running keeps the old one.
        self._table = table
        self._table_list = table.tolist()

    def _views_alive(self) -> bool:
        # Every numpy view of guest memory has self._host as its base; the
        # attribute and getrefcount's own argument are the two other references.
        return sys.getrefcount(self._host) > 2

    # ---------------------------------------------------------------- queries
    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The mapped regions, in the order they were added."""
        return tuple(m.region for m in self._maps)

    @property
    def closed(self) -> bool:
        return self._closed

    def seals(self) -> list[int | None]:
        """Each region's memfd seals when it was mapped (None: not a memfd),
        in the order of :attr:`regions`; see :mod:`vhostlab.sigbus`."""
        return [m.seals for m in self._maps]

    @property
    def sigbus_faults(self) -> int:
        """Pages that faulted because the file behind a region shrank (see
        :mod:`vhostlab.sigbus`); 0 while every file keeps its size."""
        return 0 if self._guard is None else self._guard.faults

    def shrunk_region(self) -> str:
        """Name the region the last SIGBUS hit, for the error message."""
        if self._guard is None or not self._guard.faults:
            return "no region"
        host = self._guard.last_fault - self._base
        for m in self._maps:
            if m.host <= host < m.host + m.region.memory_size:
                r = m.region
                return (f"region gpa {r.guest_phys_addr:#x} (gpa "
                        f"{r.guest_phys_addr + host - m.host:#x} faulted)")
        return f"host offset {host:#x}"

    def memory_table(self) -> list[tuple[MemoryRegion, int]]:
        """``[(region, fd), ...]`` to send with SET_MEM_TABLE (front-end side).

        The fds stay owned by this object. Only for memory made by
        :meth:`allocate` / :meth:`allocate_region`.
        """
        table = []
        for m in self._maps:
            if m.owned_fd < 0:
                raise GuestMemoryError(
                    f"region gpa {m.region.guest_phys_addr:#x} was added with a "
                    "borrowed fd; this object holds no fd for it")
            table.append((m.region, m.owned_fd))
        return table

    def region_of(self, gpa: int) -> MemoryRegion:
        """The region holding ``gpa``; UnmappedAddressError if none does."""
        for m in self._maps:
            r = m.region
            if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.memory_size:
                return r
        raise UnmappedAddressError(f"gpa {gpa:#x} is in no mapped region")

    def gpa_to_uva(self, gpa: int) -> int:
        """The front-end's virtual address (userspace_addr space) of a GPA."""
        r = self.region_of(gpa)
        return r.userspace_addr + (gpa - r.guest_phys_addr)

    def uva_to_gpa(self, userspace_addr: int, length: int = 1) -> int:
        """Translate a front-end virtual address range (as in SET_VRING_ADDR)
        to a GPA; the whole range must lie inside one region."""
        self._check_open()
        for m in self._maps:
            r = m.region
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

    # ------------------------------------------------------------- access
    def _host_offset(self, gpa: int, length: int) -> int:
        self._check_open()
        if length < 0:
            raise ValueError(f"length = {length}: must be >= 0")
        host = gpa_to_host_py(self._table_list, gpa, max(length, 1))
        if host < 0 and length == 0:
            host = gpa_to_host_py(self._table_list, gpa - 1, 1)   # empty range at the end
            host = host + 1 if host >= 0 else -1
        if host >= 0:
            return host
        for m in self._maps:
            r = m.region
            if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.memory_size:
                raise UnmappedAddressError(
                    f"gpa {gpa:#x} + length {length:#x} = {gpa + length:#x} leaves the "
                    f"region [{r.guest_phys_addr:#x}, {r.guest_phys_addr + r.memory_size:#x})")
        raise UnmappedAddressError(f"gpa {gpa:#x} is in no mapped region")

    def read(self, gpa: int, n: int) -> bytes:
        """Copy ``n`` bytes of guest memory at ``gpa``."""
        host = self._host_offset(gpa, n)
        return self._host[host:host + n].tobytes()

    def write(self, gpa: int, data) -> None:
        """Write ``data`` (bytes-like) into guest memory at ``gpa``."""
        src = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        host = self._host_offset(gpa, len(src))
        self._host[host:host + len(src)] = src

    def view(self, gpa: int, n: int) -> np.ndarray:
        """A writable ``uint8`` numpy view of ``n`` bytes of guest memory.

        The view keeps the memory mapped (see the module docstring).
        """
        host = self._host_offset(gpa, n)
        return self._host[host:host + n]

    def kernel_args(self) -> tuple[np.ndarray, np.ndarray]:
        """``(host, table)`` for numba kernels: the uint8 array spanning the whole
        reservation and the int64 region table. Never print or scan ``host``:
        outside the regions it is guard pages, and touching them faults."""
        self._check_open()
        return self._host, self._table

    # ----------------------------------------------------------- teardown
    def _check_open(self) -> None:
        if self._closed:
            raise GuestMemoryError("guest memory is closed")

    def close(self) -> None:
        """Unmap every region and close owned memfds. Idempotent."""
        if self._closed:
            return
        self._closed = True
        owned = {m.owned_fd for m in self._maps if m.owned_fd >= 0}
        self._maps = []
        self._table = np.zeros((0, 4), np.int64)
        self._table_list = []
        views = self._views_alive()
        self._host = None
        if self._guard is not None:
            self._guard.release()
        if not views:
            self._mm.close()
        # else: the last view holds the mmap object; it unmaps when freed.
        self._mm = None
        for fd in owned:
            os.close(fd)

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        if self._closed:
            return "<GuestMemory closed>"
        regions = ", ".join(f"[{r.guest_phys_addr:#x}, {r.guest_phys_addr + r.memory_size:#x})"
                            for r in self.regions)
        return f"<GuestMemory {len(self._maps)} regions: {regions}>"
