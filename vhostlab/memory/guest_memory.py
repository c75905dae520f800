""":class:`GuestMemory`: the regions of a memory table, mapped, with
bounds-checked access. It puts together the region checks
(:mod:`~vhostlab.memory.regions`), the reservation they are mapped into
(:mod:`~vhostlab.memory.address_space`), the translation table
(:mod:`~vhostlab.memory.translation`) and, for a front-end, new RAM
(:mod:`~vhostlab.memory.ram`).
"""
from __future__ import annotations

import os
from typing import Iterable, NamedTuple

import numpy as np

from .. import sigbus
from ..protocol.constants import LIBVHOST_USER_MAX_RAM_SLOTS
from .address_space import AddressSpace, MappedArea, round_up
from .ram import DEFAULT_RAM_SIZE, new_memfd, ram_layout
from .regions import (GuestMemoryError, GuestMemoryRegion, RegionFileError,
                      RegionLimitError, RegionNotFoundError, check_file, check_overlap,
                      check_region)
from .translation import host_offset, region_of, region_table, uva_to_gpa

__all__ = ["GuestMemory", "DEFAULT_RESERVE"]

DEFAULT_RESERVE = 64 << 30


class _Mapping(NamedTuple):
    region: GuestMemoryRegion
    slot: int          # offset of the mapping in the reservation (aligned)
    host: int          # offset of the region's first byte in the reservation
    owned_fd: int      # memfd this object created and owns (may back several
                       # regions, as in the pc layout), or -1
    seals: int | None = None   # the fd's memfd seals when mapped (None: not a memfd)


class GuestMemory(MappedArea):
    """Guest RAM as a set of mapped regions, with bounds-checked access.

    Back-end side: ``GuestMemory.from_table([(region, fd), ...])`` for
    SET_MEM_TABLE, then :meth:`add_region` / :meth:`remove_region` for
    ADD_MEM_REG / REM_MEM_REG. Front-end side: :meth:`allocate`.
    ``max_regions`` bounds the table (libvhost-user's limit by default, what
    the back-end offers with GET_MAX_MEM_SLOTS); ``reserve`` is the address
    space set aside for all regions (no memory is committed for it).
    """

    def __init__(self, *, max_regions: int = LIBVHOST_USER_MAX_RAM_SLOTS,
                 reserve: int = DEFAULT_RESERVE) -> None:
        self._closed = True           # until fully built: close() does nothing
        if max_regions < 1:
            raise ValueError(f"max_regions = {max_regions}: must be >= 1")
        self.max_regions = max_regions
        self._maps: list[_Mapping] = []
        self._table = np.zeros((0, 4), np.int64)
        self._table_list: list[list[int]] = []
        self._space = AddressSpace(reserve)
        self._closed = False

    # ----------------------------------------------------------- construction
    @classmethod
    def from_table(cls, table: Iterable[tuple[GuestMemoryRegion, int]],
                   **kwargs) -> "GuestMemory":
        """Map a whole memory table (SET_MEM_TABLE): ``[(region, fd), ...]``.

        The fds stay the caller's. On any error nothing stays mapped.
        """
        memory = cls(**kwargs)
        try:
            for region, fd in table:
                memory.add_region(region, fd)
        except BaseException:
            memory.close()
            raise
        return memory

    @classmethod
    def allocate(cls, ram_size: int = DEFAULT_RAM_SIZE, *, layout: str = "pc",
                 **kwargs) -> "GuestMemory":
        """Create guest RAM in one memfd, laid out like QEMU's machines
        (:func:`~vhostlab.memory.ram.ram_layout`: ``"pc"`` or ``"flat"``).
        ``userspace_addr`` of each region is where this process mapped it, as
        in QEMU. The memfd is owned (see :meth:`memory_table`).
        """
        pieces = ram_layout(ram_size, layout)
        memory = cls(**kwargs)
        try:
            fd = new_memfd(ram_size)
        except BaseException:
            memory.close()
            raise
        try:
            for gpa, size, offset in pieces:
                memory._add(GuestMemoryRegion(gpa, size, 0, offset), fd, owned=True)
        except BaseException:
            memory._close_unowned(fd)
            memory.close()
            raise
        return memory

    def allocate_region(self, guest_phys_addr: int, memory_size: int) -> GuestMemoryRegion:
        """Add a region backed by a new memfd this object owns (a front-end's
        ADD_MEM_REG); returns it with its userspace_addr filled in."""
        fd = new_memfd(memory_size)
        try:
            return self._add(GuestMemoryRegion(guest_phys_addr, memory_size, 0, 0),
                             fd, owned=True)
        except BaseException:
            self._close_unowned(fd)
            raise

    def _close_unowned(self, fd: int) -> None:
        """Close a new memfd no mapping took ownership of."""
        if not any(m.owned_fd == fd for m in self._maps):
            os.close(fd)

    # ------------------------------------------------------ regions in and out
    def add_region(self, region: GuestMemoryRegion, fd: int) -> None:
        """Map one region (ADD_MEM_REG, or one entry of SET_MEM_TABLE).

        Raises InvalidRegionError, RegionOverlapError, RegionLimitError or
        RegionFileError. The fd stays the caller's.
        """
        self._add(region, fd, owned=False)

    def _add(self, region, fd: int, *, owned: bool) -> GuestMemoryRegion:
        """Map ``region`` from ``fd``. ``owned``: the fd is this object's, and
        the region's userspace_addr becomes where it is mapped here."""
        self._check_open()
        region = check_region(region)
        gpa, size, _, offset = region
        if len(self._maps) >= self.max_regions:
            raise RegionLimitError(f"region gpa {gpa:#x}: already {len(self._maps)} "
                                   f"regions, the limit is {self.max_regions}")
        align = check_file(region, fd)
        seals = sigbus.file_seals(fd)
        if not owned and not (seals or 0) & sigbus.F_SEAL_SHRINK:
            # The front-end may shrink this file under us: guard against SIGBUS.
            self._space.guard_sigbus()
        map_off = offset - offset % align
        slot_len = round_up(offset - map_off + size, align)
        slot = self._space.find_slot(slot_len, align, f"region gpa {gpa:#x}")
        host = slot + (offset - map_off)
        if owned:
            region = region._replace(userspace_addr=self._space.base + host)
        check_overlap(region, self.regions)
        try:
            self._space.map(slot, slot_len, fd, map_off)
        except OSError as exc:
            raise RegionFileError(f"region gpa {gpa:#x}: mmap of fd {fd} at offset "
                                  f"{map_off:#x} failed: {exc.strerror}") from None
        self._maps.append(_Mapping(region, slot, host, fd if owned else -1, seals))
        self._rebuild_table()
        return region

    def remove_region(self, region: GuestMemoryRegion) -> None:
        """Unmap the region matching guest_phys_addr, memory_size and
        userspace_addr (REM_MEM_REG; mmap_offset is not compared).

        If numpy views of guest memory are alive, its pages stay mapped (out of
        the table: no translation reaches them) until :meth:`close`.
        """
        self._check_open()
        region = GuestMemoryRegion(*region)
        key = region[:3]
        for i, m in enumerate(self._maps):
            if m.region[:3] == key:
                break
        else:
            raise RegionNotFoundError(
                f"no mapped region has guest_phys_addr {region.guest_phys_addr:#x}, "
                f"memory_size {region.memory_size:#x} and userspace_addr "
                f"{region.userspace_addr:#x}")
        del self._maps[i]
        self._rebuild_table()
        self._space.release(m.slot)
        if m.owned_fd >= 0:
            self._close_unowned(m.owned_fd)

    def _rebuild_table(self) -> None:
        # A new array each time: a kernel already running keeps the old one.
        self._table = region_table((m.region, m.host) for m in self._maps)
        self._table_list = self._table.tolist()

    # ---------------------------------------------------------------- queries
    @property
    def regions(self) -> tuple[GuestMemoryRegion, ...]:
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
        guard = self._space.guard
        return 0 if guard is None else guard.faults

    def shrunk_region(self) -> str:
        """Name the region the last SIGBUS hit, for the error message."""
        guard = self._space.guard
        if guard is None or not guard.faults:
            return "no region"
        host = guard.last_fault - self._space.base
        for m in self._maps:
            if m.host <= host < m.host + m.region.memory_size:
                r = m.region
                return (f"region gpa {r.guest_phys_addr:#x} (gpa "
                        f"{r.guest_phys_addr + host - m.host:#x} faulted)")
        return f"host offset {host:#x}"

    def memory_table(self) -> list[tuple[GuestMemoryRegion, int]]:
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

    def region_of(self, gpa: int) -> GuestMemoryRegion:
        """The region holding ``gpa``; UnmappedAddressError if none does."""
        return region_of(self.regions, gpa)

    def gpa_to_uva(self, gpa: int) -> int:
        """The front-end's virtual address (userspace_addr space) of a GPA."""
        r = self.region_of(gpa)
        return r.userspace_addr + (gpa - r.guest_phys_addr)

    def uva_to_gpa(self, userspace_addr: int, length: int = 1) -> int:
        """Translate a front-end virtual address range (as in SET_VRING_ADDR)
        to a GPA; the whole range must lie inside one region."""
        self._check_open()
        return uva_to_gpa(self.regions, userspace_addr, length)

    # ------------------------------------------------------------- access
    def _host_offset(self, gpa: int, length: int) -> int:
        self._check_open()
        return host_offset(self._table_list, self.regions, gpa, length)

    def read(self, gpa: int, n: int) -> bytes:
        """Copy ``n`` bytes of guest memory at ``gpa``."""
        host = self._host_offset(gpa, n)
        return self._space.host[host:host + n].tobytes()

    def write(self, gpa: int, data) -> None:
        """Write ``data`` (bytes-like) into guest memory at ``gpa``."""
        src = np.frombuffer(memoryview(data).cast("B"), np.uint8)
        host = self._host_offset(gpa, len(src))
        self._space.host[host:host + len(src)] = src

    def view(self, gpa: int, n: int) -> np.ndarray:
        """A writable ``uint8`` numpy view of ``n`` bytes of guest memory.

        The view keeps the memory mapped (see :mod:`~vhostlab.memory.address_space`).
        """
        host = self._host_offset(gpa, n)
        return self._space.host[host:host + n]

    def kernel_args(self) -> tuple[np.ndarray, np.ndarray]:
        """``(host, table)`` for numba kernels: the uint8 array spanning the whole
        reservation and the int64 region table. Never print or scan ``host``:
        outside the regions it is guard pages, and touching them faults."""
        self._check_open()
        return self._space.host, self._table

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
        self._space.close()
        for fd in owned:
            os.close(fd)

    def __repr__(self) -> str:
        if self._closed:
            return "<GuestMemory closed>"
        regions = ", ".join(f"[{r.guest_phys_addr:#x}, {r.end:#x})" for r in self.regions)
        return f"<GuestMemory {len(self._maps)} regions: {regions}>"
