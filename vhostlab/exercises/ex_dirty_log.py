"""Exercise dirty_log: log the pages a write dirties, and the used-ring update.

Every case uses a real dirty log the way live migration does: the front-end
allocates it in a memfd (``DirtyLog.allocate``, QEMU's vhost_log_alloc), the
back-end maps the same fd (``DirtyLog.from_fd``, what SET_LOG_BASE hands it)
and the learner's function marks the back-end's mapping. What counts is what
the front-end then finds with ``sync()`` (QEMU's vhost_dev_sync_region).
The right answers come from the ring layer's own logging code
(``vhost_log_write_py``, ``log_used_py``) run on a fresh log.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from vhostlab.dirtylog import DirtyLog
from vhostlab.exercises.checks import Case, Exercise, Mistake, Question, Raises
from vhostlab.ring.chain import log_used_py
from vhostlab.ring.errors import RING_OK
from vhostlab.ring.layout import VRING_STATE_DTYPE
from vhostlab.ring.log import VHOST_LOG_PAGE, vhost_log_write_py

__all__ = ["EXERCISE", "SETUP", "migration_log", "LOG_BYTES"]

LOG_BYTES = 128          # covers 1024 pages: 4 MiB of guest memory

SETUP = '''\
import numpy as np

from vhostlab.dirtylog import VHOST_LOG_PAGE, DirtyLog
from vhostlab.exercises import bind
from vhostlab.exercises.ex_dirty_log import migration_log

ex = bind("dirty_log", globals())'''

SOLUTION_LOG_WRITE = '''\
def log_write(log, gpa, length):
    """Mark the pages of [gpa, gpa + length) in the bitmap `log`."""
    if length <= 0:
        return
    first = gpa // VHOST_LOG_PAGE
    last = (gpa + length - 1) // VHOST_LOG_PAGE
    if last // 8 >= len(log):
        raise ValueError(f"page {last} is past the log ({len(log) * 8} pages)")
    for page in range(first, last + 1):
        log[page // 8] |= 1 << (page % 8)'''

SOLUTION_LOG_USED = '''\
def log_used(log, log_guest_addr, num, first, n):
    """Log n used elements written from used index `first`, then used->idx."""
    for i in range(first, first + n):
        slot = i % num
        log_write(log, log_guest_addr + 4 + 8 * slot, 8)    # used->ring[slot]
    log_write(log, log_guest_addr + 2, 2)                   # used->idx'''


@contextlib.contextmanager
def migration_log(size: int = LOG_BYTES) -> Iterator[tuple[DirtyLog, DirtyLog]]:
    """``(frontend, backend)``: one log in a memfd, mapped twice.

    The front-end allocated it (QEMU's vhost_log_alloc); the back-end mapped
    the same fd as SET_LOG_BASE would have it do. Marks made through
    ``backend.bitmap`` show up in ``frontend.sync()``.
    """
    front = DirtyLog.allocate(size)
    back = None
    try:
        back = DirtyLog.from_fd(front.fd, front.size, 0)
        yield front, back
    finally:
        if back is not None:
            back.close()
        front.close()


def _pages(front: DirtyLog) -> list[int]:
    return sorted(int(p) for p in front.sync())


# ---------------------------------------------------------------- Q1: log_write
def _write_case(gpa: int, length: int, premarked: tuple[int, ...] = ()):
    @contextlib.contextmanager
    def setup():
        with migration_log() as (front, back):
            for page in premarked:
                front.mark_page(page)      # someone marked these before us
            yield back.bitmap, gpa, length, front
    return setup


def _run_write(targets, args):
    log, gpa, length, front = args
    targets[0](log, gpa, length)
    return _pages(front)


def _ref_write(log, gpa, length):
    if vhost_log_write_py(log, gpa, length) != RING_OK:
        raise ValueError("past the log")


def _one_too_many(got, want, args) -> bool:
    _, gpa, length, _ = args
    return list(got) == sorted(set(want) | {(gpa + length) // VHOST_LOG_PAGE})


def _bits_reversed(got, want, args) -> bool:
    return set(got) == {p // 8 * 8 + 7 - p % 8 for p in want} and set(got) != set(want)


def _written_pages(args) -> set[int]:
    _, gpa, length, _ = args
    if length <= 0:
        return set()
    return set(range(gpa // VHOST_LOG_PAGE, (gpa + length - 1) // VHOST_LOG_PAGE + 1))


def _lost_premarked(got, want, args) -> bool:
    missing = set(want) - set(got)
    return bool(missing) and not missing & _written_pages(args)


def _missed_own(got, want, args) -> bool:
    return bool((set(want) - set(got)) & _written_pages(args))


Q1 = Question(
    name="q1", title="log_write: mark every page a write touches",
    targets=("log_write",), reference=_ref_write, run=_run_write,
    cases=(
        Case("a 1-byte write at GPA 0", _write_case(0, 1)),
        Case("64 bytes at 0x5123", _write_case(0x5123, 64),
             advice="page = gpa // VHOST_LOG_PAGE; set bit page % 8 of byte page // 8."),
        Case("a 1514-byte frame at 0x7f00 (it crosses into the next page)",
             _write_case(0x7F00, 1514),
             advice="Mark every page from the first byte's to the last byte's."),
        Case("exactly one page, 0x1000 bytes at 0x3000", _write_case(0x3000, 0x1000)),
        Case("three pages from 0x10000", _write_case(0x10000, 0x3000)),
        Case("a write to page 10 while pages 9 and 14 are already marked",
             _write_case(0xA000, 100, premarked=(9, 14))),
        Case("a zero-length write", _write_case(0x2000, 0),
             advice="A write of 0 bytes dirties nothing."),
        Case("the last byte the log covers (page 1023)", _write_case(1024 * VHOST_LOG_PAGE - 1, 1)),
        Case("a write at 0x400000, one page past the log", _write_case(1024 * VHOST_LOG_PAGE, 1),
             expect=Raises(ValueError, why="Writing past the log would corrupt the "
                                           "front-end's memory; refuse it.")),
        Case("0x1000 bytes starting half a page before the log's end",
             _write_case(1024 * VHOST_LOG_PAGE - 0x800, 0x1000),
             expect=Raises(ValueError, why="Check the last page before you mark anything.")),
    ),
    mistakes=(
        Mistake(_one_too_many, "you marked one page too many: the last byte written is "
                               "gpa + length - 1."),
        Mistake(_bits_reversed, "the bits are numbered from the least significant: page p "
                                "is 1 << (p % 8) in byte p // 8."),
        Mistake(_lost_premarked, "pages that were marked before your call are gone: OR the "
                                 "bit in with |=, never assign a whole byte; the log is "
                                 "shared with QEMU."),
        Mistake(_missed_own, "some pages this write touched are not marked: mark every page "
                             "from gpa // 4096 to (gpa + length - 1) // 4096, OR-ing each bit "
                             "in (|=) so the ones before it stay."),
    ),
    hints=(
        "A page is 4096 bytes (VHOST_LOG_PAGE): the write dirties pages gpa // 4096 up to "
        "(gpa + length - 1) // 4096.",
        "Page p is bit p % 8 of byte p // 8. Set it with a bitwise OR into that byte, so "
        "that the bits other writers set stay set.",
        "Before marking, check that the last page's byte, last // 8, is inside the log "
        "(len(log)); a zero-length write marks nothing.",
    ),
    solution=SOLUTION_LOG_WRITE,
    own_work=(),
)


# ---------------------------------------------------------------- Q2: log_used
def _used_case(base: int, num: int, first: int, n: int):
    @contextlib.contextmanager
    def setup():
        with migration_log() as (front, back):
            yield back.bitmap, base, num, first, n, front
    return setup


def _run_used(targets, args):
    log, base, num, first, n, front = args
    targets[0](log, base, num, first, n)
    return _pages(front)


def _ref_used(log, base, num, first, n):
    s = np.zeros(1, VRING_STATE_DTYPE)[0]
    s["num"], s["log_guest_addr"] = num, base
    if log_used_py(log, s, first, n) != RING_OK:
        raise ValueError("past the log")


def _page(gpa: int) -> int:
    return gpa // VHOST_LOG_PAGE


def _forgot_idx(got, want, args) -> bool:
    return set(want) - set(got) == {_page(args[1] + 2)}


def _no_modulo(got, want, args) -> bool:
    _, base, num, _, _, _ = args
    return max(got, default=0) > _page(base + 4 + 8 * num - 1)


# A used ring of 256 entries ending exactly at a page boundary: one page holds
# it all, so an index that is not wrapped with % num spills into the next page.
_ONE_PAGE_RING = 0x203000 - (4 + 8 * 256)
# A used ring whose idx field and first element sit on two different pages.
_SPLIT_RING = 0x203000 - 4

Q2 = Question(
    name="q2", title="log_used: the used-ring writes, at log_guest_addr",
    targets=("log_used",), reference=_ref_used, run=_run_used,
    cases=(
        Case("one used element at slot 0, used ring at 0x202000", _used_case(0x202000, 256, 0, 1)),
        Case("one element at slot 0 of a used ring at 0x202ffc (idx and ring[0] on two pages)",
             _used_case(_SPLIT_RING, 256, 0, 1),
             advice="Log ring[slot] at offset 4 + 8 * slot and idx at offset 2."),
        Case("8 elements from slot 100 of the ring at 0x202ffc", _used_case(_SPLIT_RING, 256, 100, 8)),
        Case("4 elements from used index 254 in a 256-entry ring (they wrap to slots 0, 1)",
             _used_case(_ONE_PAGE_RING, 256, 254, 4),
             advice="The slot is the index modulo num."),
        Case("4 elements from the free-running used index 65534 (slots 254, 255, 0, 1)",
             _used_case(_ONE_PAGE_RING, 256, 65534, 4),
             advice="Indices run freely to 65535 and wrap; the slot is index % num."),
        Case("a used ring whose log_guest_addr lies past the log",
             _used_case(1024 * VHOST_LOG_PAGE, 256, 0, 1),
             expect=Raises(ValueError, why="Use your log_write: it refuses pages past the log.")),
    ),
    mistakes=(
        Mistake(_forgot_idx, "the element is logged but used->idx is not: the back-end "
                             "writes idx (2 bytes at offset 2) after the elements, log it too."),
        Mistake(_no_modulo, "you logged past the end of the used ring: the slot of used "
                            "index i is i % num."),
    ),
    hints=(
        "The used ring is: flags (u16, offset 0), idx (u16, offset 2), then ring[num] "
        "elements of 8 bytes {u32 id; u32 len} from offset 4.",
        "Element i goes to slot i % num, at log_guest_addr + 4 + 8 * slot.",
        "Call your log_write for each element (8 bytes) and for idx (2 bytes at offset 2).",
    ),
    solution=SOLUTION_LOG_USED,
    own_work=(),
)

EXERCISE = Exercise(name="dirty_log", title="Log the pages a write dirties",
                    questions=(Q1, Q2), setup=SETUP)
