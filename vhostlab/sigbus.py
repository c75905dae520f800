"""Surviving a front-end that shrinks the file behind guest memory or the dirty log.

Theory of operation
-------------------
The back-end maps the fds SET_MEM_TABLE, ADD_MEM_REG and SET_LOG_BASE send
with MAP_SHARED and checks, when it maps them, that each file is long
enough (fstat). The front-end keeps its own fd, though, and may
``ftruncate`` the file afterwards: every later access to a page past the
new end raises SIGBUS, and SIGBUS kills the process by default, whichever
thread touched the page (a numba kernel, numpy, the Python twins).

A memfd can forbid that: ``F_SEAL_SHRINK`` (fcntl ``F_ADD_SEALS``) makes
``ftruncate`` to a smaller size fail for everyone. QEMU's
``memory-backend-memfd`` (seal=on, its default) and the memfd QEMU makes
for the dirty log carry F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL; DPDK's
virtio-user sends memfds made without MFD_ALLOW_SEALING (only F_SEAL_SEAL),
and file-backed RAM (``memory-backend-file`` on /dev/shm or hugetlbfs)
cannot be sealed at all. Refusing unsealed fds would refuse DPDK and every
file-backed guest, so the back-end guards them instead:

:func:`guard` registers an address range (a guest-memory reservation, a
log mapping). One process-wide SIGBUS handler, a numba ``cfunc`` that never
enters Python (it runs in whatever thread faulted, with or without the
GIL), looks the faulting address up in a table of guarded ranges. Inside
one, it maps a private zero page over the faulting page (MAP_FIXED; for a
hugetlbfs mapping the huge page around it) and counts the fault; the access
then completes, reading zeros or writing into a page nobody else sees.
Outside every range it restores the default action, and the access faults
again and kills the process as before: a real bug is never hidden.

The owner of a range polls :attr:`Guard.faults`: the back-end reports a
named error ("guest memory shrank under region gpa ...") and breaks its
rings, or drops the log. Boundaries: what a guest wrote to a page after it
was replaced is lost (the front-end threw that memory away itself); a
hugetlbfs page is replaced whole (2 MiB or 1 GiB of zeros), and where even
that mapping fails, the handler falls back to the default action and the
process dies as it would have without the guard.
"""
from __future__ import annotations

import ctypes
import mmap
import signal
import threading

import numpy as np
from numba import cfunc, types
from numba.extending import intrinsic

__all__ = ["Guard", "guard", "guarded_ranges", "F_SEAL_SEAL", "F_SEAL_SHRINK",
           "F_SEAL_GROW", "F_SEAL_WRITE", "F_GET_SEALS", "file_seals"]

# fcntl(2), linux/fcntl.h
F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8

MAX_GUARDS = 256
# The table the handler reads: one row per guarded range, [start, end, faults, last].
_START, _END, _FAULTS, _LAST = range(4)
_ROW = 4 * 8

_SA_SIGINFO, _SA_RESTART = 0x4, 0x10000000
_PROT_RW, _MAP_PRIVATE_ANON_FIXED = 0x3, 0x02 | 0x20 | 0x10
_SIG_DFL = 0
_PAGE_SIZES = (mmap.PAGESIZE, 2 << 20, 1 << 30)   # small page, then hugetlbfs sizes

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fcntl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
# The two libc calls the handler makes, as C function pointers numba calls directly.
_mmap = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_size_t, ctypes.c_int,
                         ctypes.c_int, ctypes.c_int, ctypes.c_long)(
    ctypes.cast(_libc.mmap, ctypes.c_void_p).value)
_signal = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int, ctypes.c_int64)(
    ctypes.cast(_libc.signal, ctypes.c_void_p).value)


class _SigAction(ctypes.Structure):
    """struct sigaction as glibc declares it on Linux (x86-64 and arm64)."""

    _fields_ = [("sa_sigaction", ctypes.c_void_p), ("sa_mask", ctypes.c_uint64 * 16),
                ("sa_flags", ctypes.c_int), ("sa_restorer", ctypes.c_void_p)]


_libc.sigaction.argtypes = [ctypes.c_int, ctypes.POINTER(_SigAction), ctypes.POINTER(_SigAction)]


def file_seals(fd: int) -> int | None:
    """The fd's memfd seals (F_GET_SEALS), or None for a file that cannot carry any."""
    seals = _libc.fcntl(fd, F_GET_SEALS, 0)
    return None if seals < 0 else seals


@intrinsic
def _peek(typingctx, addr):
    """The int64 at address ``addr`` (relaxed atomic load)."""
    sig = types.int64(types.int64)

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], context.get_value_type(types.int64).as_pointer())
        return builder.load_atomic(ptr, "monotonic", 8)
    return sig, codegen


@intrinsic
def _poke(typingctx, addr, value):
    """Store the int64 ``value`` at address ``addr`` (relaxed atomic store)."""
    sig = types.void(types.int64, types.int64)

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], context.get_value_type(types.int64).as_pointer())
        builder.store_atomic(args[1], ptr, "monotonic", 8)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _address(typingctx, ptr):
    sig = types.int64(types.voidptr)

    def codegen(context, builder, sig, args):
        return builder.ptrtoint(args[0], context.get_value_type(types.int64))
    return sig, codegen


def _make_handler(table: int):
    """The SIGBUS handler over the table at address ``table`` (compiled once per process)."""
    page_sizes = _PAGE_SIZES

    @cfunc(types.void(types.int32, types.voidptr, types.voidptr))
    def handler(signo, info, context):
        fault = _peek(_address(info) + 16)          # siginfo_t.si_addr
        for row in range(MAX_GUARDS):
            at = table + row * _ROW
            start, end = _peek(at), _peek(at + 8)
            if start <= fault < end:
                for size in page_sizes:
                    page = fault - fault % size
                    if page < start or page + size > end:
                        break
                    if _mmap(page, size, _PROT_RW, _MAP_PRIVATE_ANON_FIXED, -1, 0) == page:
                        _poke(at + 16, _peek(at + 16) + 1)
                        _poke(at + 24, fault)
                        return
                break
        _signal(signo, _SIG_DFL)                    # not ours: fault again, and die
    return handler


class _Table:
    def __init__(self) -> None:
        self.rows = np.zeros((MAX_GUARDS, 4), np.int64)
        self.lock = threading.Lock()
        self.handler = None
        self.installed_for = None


_TABLE = _Table()


def _install() -> None:
    """Install the handler (once; again if someone replaced it, e.g. faulthandler)."""
    t = _TABLE
    if t.handler is None:
        t.handler = _make_handler(t.rows.ctypes.data)
    current = _SigAction()
    _libc.sigaction(signal.SIGBUS, None, ctypes.byref(current))
    if current.sa_sigaction == t.handler.address:
        return
    action = _SigAction()
    action.sa_sigaction = t.handler.address
    action.sa_flags = _SA_SIGINFO | _SA_RESTART
    if _libc.sigaction(signal.SIGBUS, ctypes.byref(action), None) != 0:
        raise OSError(ctypes.get_errno(), "sigaction(SIGBUS) failed")


class Guard:
    """One guarded address range; :attr:`faults` counts the pages replaced in it."""

    def __init__(self, row: int, start: int, end: int) -> None:
        self.row, self.start, self.end = row, start, end

    @property
    def faults(self) -> int:
        return 0 if self.row < 0 else int(_TABLE.rows[self.row, _FAULTS])

    @property
    def last_fault(self) -> int:
        """The address of the last access that faulted (0: none)."""
        return 0 if self.row < 0 else int(_TABLE.rows[self.row, _LAST])

    @property
    def active(self) -> bool:
        return self.row >= 0

    def release(self) -> None:
        """Stop guarding (before the range is unmapped). Idempotent."""
        if self.row < 0:
            return
        with _TABLE.lock:
            _TABLE.rows[self.row] = 0
        self.row = -1


def guard(start: int, length: int) -> Guard:
    """Guard ``[start, start + length)`` against SIGBUS (see the module docstring).

    With every row in use the range is not guarded (``Guard.active`` False):
    a SIGBUS there then kills the process as without a guard.
    """
    # A mapping covers whole pages, whatever length it was asked for.
    length = -(-length // mmap.PAGESIZE) * mmap.PAGESIZE
    t = _TABLE
    with t.lock:
        _install()
        free = np.flatnonzero(t.rows[:, _END] == 0)
        if free.size == 0:
            return Guard(-1, start, start + length)
        row = int(free[0])
        t.rows[row, _FAULTS] = t.rows[row, _LAST] = 0
        t.rows[row, _START] = start
        t.rows[row, _END] = start + length          # last: the row is live from here
    return Guard(row, start, start + length)


def guarded_ranges() -> list[tuple[int, int]]:
    """The ranges guarded now (for tests and leak checks)."""
    with _TABLE.lock:
        return [(int(s), int(e)) for s, e in _TABLE.rows[:, :2] if e]
