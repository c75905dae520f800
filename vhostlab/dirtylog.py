"""The dirty-page log that live migration reads (SET_LOG_BASE).

Theory of operation
-------------------
While QEMU migrates a running guest it copies RAM in rounds and, each round,
re-copies the pages written since the last one. QEMU sees its own writes and
the guest's, but not the back-end's: a vhost-user back-end writes guest memory
directly (received frames, used rings). So for migration QEMU hands the
back-end a log (vhost_log_global_start -> SET_LOG_BASE with an fd, size and
offset; then SET_FEATURES with VHOST_F_LOG_ALL; then SET_VRING_ADDR with
VHOST_VRING_F_LOG), and the back-end sets one bit per 4 KiB page it writes:
page = GPA // 4096 is bit ``page % 8`` of byte ``page // 8``.

QEMU reads and clears the log at each round (vhost_log_sync ->
vhost_dev_sync_region): for each 64-bit chunk that is not zero it takes the
bits with an atomic exchange against 0 and marks those pages dirty in its own
bitmap. Because QEMU clears while the back-end sets, setting is an atomic OR
(``vhostlab.ring.log.vhost_log_write``) and clearing an atomic exchange.

:class:`DirtyLog` is both sides: ``DirtyLog.from_fd`` maps what SET_LOG_BASE
sent (back-end); ``DirtyLog.allocate`` makes a log in a memfd sized like
QEMU's vhost_get_log_size (front-end), and :meth:`DirtyLog.sync` drains it
like vhost_dev_sync_region. ``mark_range``, ``popcount`` and ``snapshot`` are
there for the labs. A write past the log's end is refused with
:class:`LogRangeError`; nothing is ever written outside the mapping.
"""
from __future__ import annotations

from .errors import VhostlabError

import mmap
import os
import stat
from dataclasses import dataclass

import numpy as np
from numba import njit

from . import sigbus
from .memory import MappedArea, views_alive
from .protocol.constants import VHOST_LOG_PAGE
from .ring import atomics
from .ring.atomics import atomic_xchg, atomic_xchg_py
from .ring.cache import depends_on
from .ring.errors import RING_OK
from .ring.log import vhost_log_write

__all__ = [
    "VHOST_LOG_PAGE", "VHOST_LOG_BITS", "VHOST_LOG_CHUNK", "MAX_LOG_SIZE",
    "DirtyLog", "vhost_get_log_size", "vhost_dev_sync_region",
    "vhost_dev_sync_region_py", "DirtyLogError", "LogRangeError", "LogSizeError",
    "DirtyRound", "GuestBand", "MismatchedPage",
]

VHOST_LOG_BITS = 64                            # bits per vhost_log_chunk_t
VHOST_LOG_CHUNK = VHOST_LOG_PAGE * VHOST_LOG_BITS
# The largest log accepted: 256 MiB of bitmap covers 8 TiB of guest memory.
MAX_LOG_SIZE = 1 << 28


class DirtyLogError(VhostlabError):
    """Base class of dirty-log errors."""


class LogRangeError(DirtyLogError):
    """A page to mark lies past the end of the log."""


class LogSizeError(DirtyLogError):
    """SET_LOG_BASE's size or offset is unusable for the fd it came with."""


def vhost_get_log_size(regions) -> int:
    """The log size QEMU allocates, in 64-bit chunks (vhost_get_log_size):
    enough bits for every page up to the last byte of the highest region.
    ``regions``: MemoryRegion-like objects (guest_phys_addr, memory_size)."""
    size = 0
    for r in regions:
        if r.memory_size:
            last = r.guest_phys_addr + r.memory_size - 1
            size = max(size, last // VHOST_LOG_CHUNK + 1)
    return size


@njit(cache=True, nogil=True)
def vhost_dev_sync_region(log64, first_chunk, last_chunk, pages):
    """Take the dirty bits of chunks first..last (inclusive), clearing them.

    Writes the dirty page numbers to ``pages`` (room for 64 per chunk) and
    returns how many. Like QEMU's vhost_dev_sync_region: a plain read skips
    clean chunks cheaply, an atomic exchange takes the others, so a bit the
    back-end sets meanwhile is either taken now or left for the next sync.
    """
    n = 0
    for chunk in range(first_chunk, last_chunk + 1):
        if log64[chunk] == 0:
            continue
        bits = atomic_xchg(log64, chunk, np.uint64(0))
        for bit in range(VHOST_LOG_BITS):
            if (bits >> np.uint64(bit)) & np.uint64(1):
                pages[n] = chunk * VHOST_LOG_BITS + bit
                n += 1
    return n


depends_on(vhost_dev_sync_region, atomics)

def vhost_dev_sync_region_py(log64, first_chunk, last_chunk, pages):
    """Plain-Python twin of :func:`vhost_dev_sync_region`."""
    n = 0
    for chunk in range(first_chunk, last_chunk + 1):
        if log64[chunk] == 0:
            continue
        bits = int(atomic_xchg_py(log64, chunk, 0))
        for bit in range(VHOST_LOG_BITS):
            if (bits >> bit) & 1:
                pages[n] = chunk * VHOST_LOG_BITS + bit
                n += 1
    return n


class DirtyLog(MappedArea):
    """A mapped dirty-page log: ``bitmap`` (uint8, ``size`` bytes).

    Build one with :meth:`from_fd` (back-end) or :meth:`allocate`
    (front-end); ``fd`` is the memfd an allocated log owns, else None.
    """

    def __init__(self, mm: mmap.mmap, start: int, size: int, fd: int | None,
                 guarded: bool = False) -> None:
        self._mm = mm
        self.bitmap = np.frombuffer(mm, np.uint8, size, start)
        self.size = size
        self.fd = fd
        # A log whose file the front-end may shrink (no F_SEAL_SHRINK) is
        # guarded against SIGBUS; `shrunk` then says it happened.
        self._guard = sigbus.guard(self.bitmap.ctypes.data - start, len(mm)) if guarded \
            else None

    @property
    def shrunk(self) -> bool:
        """True once an access faulted because the front-end shrank the log's file."""
        return self._guard is not None and self._guard.faults > 0

    @classmethod
    def from_fd(cls, fd: int, mmap_size: int, mmap_offset: int = 0) -> "DirtyLog":
        """Map the log SET_LOG_BASE sent: ``mmap_size`` bytes at ``mmap_offset``.

        Checked: 0 < size <= MAX_LOG_SIZE, both multiples of 8 (the log is
        made of u64 chunks), offset + size within the file (fstat). The fd
        stays the caller's. Raises LogSizeError.
        """
        if not 0 < mmap_size <= MAX_LOG_SIZE or mmap_size % 8:
            raise LogSizeError(f"SET_LOG_BASE mmap_size = {mmap_size:#x}: must be a "
                               f"multiple of 8 from 8 to {MAX_LOG_SIZE:#x}")
        if not 0 <= mmap_offset < 1 << 64 or mmap_offset % 8:
            raise LogSizeError(f"SET_LOG_BASE mmap_offset = {mmap_offset:#x}: must be a "
                               "u64 multiple of 8")
        try:
            st = os.fstat(fd)
        except (OSError, TypeError, ValueError) as exc:
            raise LogSizeError(f"SET_LOG_BASE fd {fd!r}: fstat failed: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
        if not stat.S_ISREG(st.st_mode):
            raise LogSizeError(f"SET_LOG_BASE fd {fd}: not a regular file or memfd")
        # Python ints do not overflow: offset + size is compared exactly
        # (DPDK's CVE-2020-10722 was this sum wrapping around).
        if mmap_offset + mmap_size > st.st_size:
            raise LogSizeError(
                f"SET_LOG_BASE mmap_offset {mmap_offset:#x} + mmap_size {mmap_size:#x} "
                f"= {mmap_offset + mmap_size:#x} exceeds the file size {st.st_size:#x}")
        base = mmap_offset - mmap_offset % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(fd, mmap_offset - base + mmap_size, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
        except (OSError, ValueError) as exc:
            raise LogSizeError(f"SET_LOG_BASE: mmap failed: {exc}") from None
        seals = sigbus.file_seals(fd) or 0
        return cls(mm, mmap_offset - base, mmap_size, None,
                   guarded=not seals & sigbus.F_SEAL_SHRINK)

    @classmethod
    def allocate(cls, memory_or_size) -> "DirtyLog":
        """A zeroed log in a new memfd (front-end side, QEMU's vhost_log_alloc).

        ``memory_or_size``: a GuestMemory (or anything with ``regions``), sized
        with vhost_get_log_size, or a size in bytes (rounded up to 8). Send
        ``fd``, ``size`` and offset 0 with SET_LOG_BASE.
        """
        if isinstance(memory_or_size, (int, np.integer)):
            size = (int(memory_or_size) + 7) // 8 * 8
        else:
            size = 8 * vhost_get_log_size(memory_or_size.regions)
        if not 0 < size <= MAX_LOG_SIZE:
            raise LogSizeError(f"log size {size:#x}: must be from 8 to {MAX_LOG_SIZE:#x}")
        fd = os.memfd_create("vhost-log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(mm, 0, size, fd)

    # ------------------------------------------------------------- marking
    @property
    def pages(self) -> int:
        """How many pages the log covers."""
        return self.size * 8

    def mark_page(self, page: int) -> None:
        """Mark one page dirty (atomic OR)."""
        self.mark_range(page * VHOST_LOG_PAGE, 1)

    def mark_range(self, gpa: int, length: int) -> None:
        """Mark every page of [gpa, gpa + length) dirty (atomic OR), or raise
        LogRangeError without marking anything if the range leaves the log."""
        self._check_open()
        if not (0 <= gpa < 1 << 63 and 0 <= length < 1 << 63) or \
                vhost_log_write(self.bitmap, int(gpa), int(length)) != RING_OK:
            last = (gpa + max(length, 1) - 1) // VHOST_LOG_PAGE
            raise LogRangeError(
                f"mark_range gpa {gpa:#x} length {length:#x}: page {last} lies past the "
                f"log ({self.size} bytes cover pages 0..{self.pages - 1})")

    # ------------------------------------------------------------- reading
    def sync(self, first_gpa: int = 0, last_gpa: int | None = None,
             impl: str = "numba") -> np.ndarray:
        """Take and clear the dirty pages between two GPAs (inclusive), like
        QEMU's vhost_dev_sync_region; returns their page numbers (int64)."""
        self._check_open()
        last_gpa = self.pages * VHOST_LOG_PAGE - 1 if last_gpa is None else last_gpa
        first = max(0, first_gpa) // VHOST_LOG_CHUNK
        last = min(last_gpa // VHOST_LOG_CHUNK, self.size // 8 - 1)
        if last < first:
            return np.zeros(0, np.int64)
        pages = np.empty((last - first + 1) * VHOST_LOG_BITS, np.int64)
        kernel = vhost_dev_sync_region if impl == "numba" else vhost_dev_sync_region_py
        n = kernel(self.bitmap.view(np.uint64), first, last, pages)
        return pages[:n].copy()

    def dirty_pages(self) -> np.ndarray:
        """The dirty page numbers, without clearing them."""
        return np.flatnonzero(np.unpackbits(self.bitmap, bitorder="little"))

    def popcount(self) -> int:
        """How many pages are marked."""
        return int(np.unpackbits(self.bitmap).sum())

    def snapshot(self) -> np.ndarray:
        """A copy of the bitmap (for plotting rounds in the labs)."""
        return self.bitmap.copy()

    def clear(self) -> None:
        """Clear every bit (not atomic: only when no one is marking)."""
        self.bitmap[:] = 0

    # ------------------------------------------------------------ teardown
    @property
    def closed(self) -> bool:
        return self._mm is None

    def _check_open(self) -> None:
        if self._mm is None:
            raise DirtyLogError("the dirty log is closed")

    def close(self) -> None:
        """Unmap (now, or when the last outside view of the bitmap goes) and
        close an owned memfd. Idempotent."""
        if self._mm is None:
            return
        views = views_alive(self.bitmap)
        self.bitmap = np.zeros(0, np.uint8)
        if self._guard is not None:
            self._guard.release()
        if not views:
            self._mm.close()
        self._mm = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __repr__(self) -> str:
        if self.closed:
            return "<DirtyLog closed>"
        return f"<DirtyLog {self.size} bytes, {self.pages} pages, {self.popcount()} dirty>"



# ------------------------------------------------------------------ round snapshots
@dataclass(frozen=True)
class GuestBand:
    """A named stretch of guest RAM (``n_pages`` pages from ``first_page``),
    so a picture of the log can say what a dirty page held."""

    name: str
    first_page: int
    n_pages: int


@dataclass(frozen=True)
class MismatchedPage:
    """A page whose bytes differ at the destination, and the frames that lived in it."""

    page: int
    frames: tuple[str, ...]


def _pages(values) -> np.ndarray:
    out = np.unique(np.asarray(values, dtype=np.int64).ravel())
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class DirtyRound:
    """What one sync of the dirty bitmap found, as a migration's front-end saw it.

    ``log_pages``: the pages the back-end had marked in the vhost log, which
    this sync took and cleared (``vhost_log_sync``, or ``vhost_log_put``'s
    final sync when ``final_sync``); ``guest_pages``: the pages the guest
    wrote since the previous sync (QEMU's own dirty bitmap); ``sync_time``:
    seconds since migrate when the sync ran; ``pages``: pages of guest RAM
    the log covers; ``bands``: what lives where; ``mismatched``: pages that
    differ at the destination after the switch-over (a broken run), with the
    frames in them. Page numbers are sorted, unique, read-only int64 arrays.
    Round 0 is a look at the log outside any sync (nothing was cleared).
    """

    round: int
    sync_time: float
    pages: int
    log_pages: np.ndarray
    guest_pages: np.ndarray
    bands: tuple[GuestBand, ...]
    final_sync: bool = False
    mismatched: tuple[MismatchedPage, ...] = ()
    note: str = ""

    @classmethod
    def make(cls, round: int, sync_time: float, pages: int, log_pages, guest_pages,
             bands, final_sync: bool = False, mismatched=(), note: str = "") -> "DirtyRound":
        """Build one from page numbers in any order (arrays, lists, sets)."""
        return cls(round, float(sync_time), int(pages), _pages(list(log_pages)),
                   _pages(list(guest_pages)), tuple(b if isinstance(b, GuestBand) else GuestBand(*b) for b in bands),
                   final_sync, tuple(MismatchedPage(int(m[0]), tuple(m[1]))
                                     for m in mismatched), note)

    @staticmethod
    def bitmap_pages(bitmap) -> np.ndarray:
        """Page numbers set in a vhost log bitmap (bit ``p % 8`` of byte ``p // 8``)."""
        raw = np.frombuffer(bytes(bitmap), np.uint8)
        return np.flatnonzero(np.unpackbits(raw, bitorder="little"))

    @property
    def both_pages(self) -> np.ndarray:
        """Pages in the vhost log and in the guest's own bitmap."""
        return np.intersect1d(self.log_pages, self.guest_pages)

    @property
    def mismatched_pages(self) -> np.ndarray:
        return np.array([m.page for m in self.mismatched], dtype=np.int64)

    def words(self) -> np.ndarray:
        """The 64-page log words (vhost_log_chunk_t) this sync took bits from."""
        return np.unique(self.log_pages // VHOST_LOG_BITS)
