"""Exercise log_base: seed step 1 (SET_LOG_BASE) and the sync that drains the log.

The learner writes two functions:

* ``set_log_base(fd, area)``: the back-end's SET_LOG_BASE. ``area`` holds
  ``mmap_size`` and ``mmap_offset`` as numpy u64, read from the real message
  bytes (as a C back-end reads its ``VhostUserLog``), so ``offset + size``
  wraps as it does in C: the check must not be a sum (DPDK's CVE-2020-10722).
  It checks both against the fd's real size (fstat) and maps the log.
* ``vhost_log_sync(log64)``: QEMU's side, vhost_dev_sync_region: take the
  dirty bits of each 64-bit word with an atomic exchange against 0 (the
  set-up's ``xchg64``) and return the dirty pages.

Graded by hostile SET_LOG_BASE messages over real memfds; by a log whose
"other writer" marks a word between a plain read and a plain write of it
(:class:`RacingLog`), and by a real writer thread marking bits with atomic
ORs while the learner's sync runs; and by the built-in live migration with
the learner's SET_LOG_BASE in the source back-end and the learner's sync in
the source front-end: no frame may be lost. When QEMU is installed, also by
a live migration between two real QEMUs with the learner's SET_LOG_BASE in
the source back-end (QEMU does its own syncs there): no frame may be lost,
no page may differ.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from numba import njit

from vhostlab.backend import handlers, rings
from vhostlab.backend.errors import RequestError
from vhostlab.dirtylog import DirtyLog
from vhostlab.exercises.checks import Case, Exercise, Mistake, Question, Raises, fixed
from vhostlab.exercises.migration_checks import (MIGRATION_WAIT_S, frames_outcome,
                                                 reference_must_migrate, summary_of, usable_qemu)
from vhostlab.protocol import HEADER_SIZE, LogArea, Message, ProtocolFeature, Request
from vhostlab.ring.atomics import atomic_or, atomic_xchg

__all__ = ["EXERCISE", "SETUP", "LogBaseArea", "RacingLog", "xchg64", "area_from_message",
           "log_base_message", "memfd_of", "migrate_with_log", "migrate_with_log_qemu",
           "learner_handlers", "usable_qemu"]

SETUP = '''\
import mmap
import os

import numpy as np

from vhostlab.exercises import bind
from vhostlab.exercises.ex_log_base import (area_from_message, log_base_message, memfd_of,
                                            migrate_with_log, xchg64)

ex = bind("log_base", globals())'''

SOLUTION_SET_LOG_BASE = '''\
def set_log_base(fd, area):
    """Map the dirty log SET_LOG_BASE sent; ValueError if its numbers do not fit the fd."""
    size, offset = area.mmap_size, area.mmap_offset
    if size == 0 or size % 8:
        raise ValueError(f"mmap_size={int(size):#x}: a log is a whole number of u64 words")
    if offset % 8:
        raise ValueError(f"mmap_offset={int(offset):#x}: not a multiple of 8")
    file_size = os.fstat(fd).st_size
    # offset + size may wrap around in u64 arithmetic: compare without adding
    if size > file_size or offset > file_size - size:
        raise ValueError(f"mmap_offset={int(offset):#x} + mmap_size={int(size):#x} "
                         f"passes the end of the fd ({file_size:#x} bytes)")
    size, offset = int(size), int(offset)
    start = offset % mmap.ALLOCATIONGRANULARITY      # mmap's offset must be page-aligned
    mapping = mmap.mmap(fd, start + size, mmap.MAP_SHARED,
                        mmap.PROT_READ | mmap.PROT_WRITE, offset=offset - start)
    return np.frombuffer(mapping, np.uint8, size, start)'''

SOLUTION_LOG_SYNC = '''\
def vhost_log_sync(log64):
    """Take and clear the dirty bits, word by word; the dirty page numbers."""
    pages = []
    for word in range(len(log64)):
        if log64[word] == 0:
            continue                               # a cheap look first, as QEMU does
        bits = int(xchg64(log64, word, 0))         # take the bits and clear, in one step
        for bit in range(64):
            if bits >> bit & 1:
                pages.append(word * 64 + bit)
    return pages'''

SOLUTION_MIGRATE = '''\
# Nothing new to write: q3 migrates a guest with your set_log_base in the
# source back-end and your vhost_log_sync in the source front-end.'''


# ---------------------------------------------------------------- building blocks
@dataclass(frozen=True)
class LogBaseArea:
    """SET_LOG_BASE's payload (struct VhostUserLog) as a C back-end reads it: two u64."""

    mmap_size: np.uint64
    mmap_offset: np.uint64


def area_from_message(data: bytes) -> LogBaseArea:
    """The VhostUserLog of SET_LOG_BASE message bytes, as numpy u64 (wrapping sums)."""
    size, offset = np.frombuffer(bytes(data), "<u8", 2, HEADER_SIZE)
    return LogBaseArea(np.uint64(size), np.uint64(offset))


def log_base_message(mmap_size: int, mmap_offset: int = 0) -> bytes:
    """SET_LOG_BASE's bytes for any u64 size and offset (hostile ones too): the
    protocol layer's header and payload, the numbers patched in afterwards."""
    good = Message.make(Request.SET_LOG_BASE, LogArea(8, 0)).to_bytes()
    return good[:HEADER_SIZE] + struct.pack("<QQ", mmap_size % 2**64, mmap_offset % 2**64)


@contextlib.contextmanager
def memfd_of(size: int) -> Iterator[int]:
    """A memfd of `size` bytes, each byte its offset's low 8 bits; closed afterwards."""
    fd = os.memfd_create("log-base", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, (np.arange(size) % 251).astype(np.uint8).tobytes(), 0)
        yield fd
    finally:
        os.close(fd)


@njit(nogil=True, cache=True)
def _xchg(log64, index, value):
    return atomic_xchg(log64, index, value)


class RacingLog:
    """A log's u64 words where another writer marks a word right after each first
    plain read of it: a read-then-clear loses that mark, an exchange does not.

    ``marks`` is every page ever set; pages taken are checked against it.
    """

    def __init__(self, words: np.ndarray) -> None:
        self.words = np.array(words, dtype=np.uint64)
        self.marks = set(_pages_of(self.words))
        self._raced: set[int] = set()

    def _race(self, index: int) -> None:
        if index in self._raced or not 0 <= index < self.words.size:
            return
        self._raced.add(index)
        bit = (index * 7 + 13) % 64          # a page the other writer dirties now
        self.words[index] |= np.uint64(1 << bit)
        self.marks.add(index * 64 + bit)

    def __len__(self) -> int:
        return int(self.words.size)

    def __getitem__(self, key):
        value = self.words[key]
        for i in np.arange(self.words.size)[key].ravel() if not isinstance(key, int) \
                else (key % max(1, self.words.size),):
            self._race(int(i))
        return value

    def __setitem__(self, key, value) -> None:
        self.words[key] = value

    def __array__(self, dtype=None, copy=None):
        out = self.words.copy()
        for i in range(self.words.size):
            self._race(i)
        return out if dtype is None else out.astype(dtype)

    def xchg(self, index: int, value) -> np.uint64:
        old = self.words[index]
        self.words[index] = np.uint64(value)
        return old

    def __repr__(self) -> str:
        return f"<RacingLog {self.words.size} words>"


def xchg64(log64, index, value=0) -> np.uint64:
    """Atomically: old = log64[index]; log64[index] = value; return old (a u64).

    One indivisible step on the machine (LLVM ``atomicrmw xchg``): no other
    writer's bit can fall between the read and the write.
    """
    if isinstance(log64, RacingLog):
        return log64.xchg(int(index), value)
    if not (isinstance(log64, np.ndarray) and log64.dtype == np.uint64 and log64.ndim == 1):
        raise TypeError("xchg64 works on the log's u64 words (a 1-D numpy uint64 array)")
    if not 0 <= int(index) < log64.size:
        raise IndexError(f"word {index} is outside the log ({log64.size} words)")
    return _xchg(log64, int(index), np.uint64(value))


def _pages_of(words: np.ndarray) -> list[int]:
    bits = np.unpackbits(np.asarray(words, np.uint64).view(np.uint8), bitorder="little")
    return [int(p) for p in np.flatnonzero(bits)]


# ---------------------------------------------------------------- Q1: set_log_base
FILE = 4 * 4096


def _map_case(file_size: int, size: int, offset: int):
    @contextlib.contextmanager
    def setup():
        with memfd_of(file_size) as fd:
            yield fd, area_from_message(log_base_message(size, offset)), size, offset
    return setup


def _run_map(targets, args):
    fd, area, size, offset = args
    if targets == (None,):                   # the right outcome: the log, mapped
        return ("mapped", size, True, True)
    mapped = targets[0](fd, area)
    return _inspect_mapping(mapped, fd, size, offset)


def _inspect_mapping(mapped, fd: int, size: int, offset: int) -> tuple:
    """What a mapping does: its length, whether it shows the fd's bytes at the offset,
    and whether a write through it reaches the fd (MAP_SHARED)."""
    if mapped is None:
        return None
    try:
        view = np.frombuffer(mapped, np.uint8) if not isinstance(mapped, np.ndarray) \
            else mapped.reshape(-1).view(np.uint8)
    except (TypeError, ValueError):
        return ("not an array of bytes", type(mapped).__name__)
    if view.size != size:
        return ("length", int(view.size))
    shows = bytes(view[:64]) == os.pread(fd, min(64, size), offset)
    try:
        view[-1] ^= 0xFF
    except ValueError:
        return ("read-only", shows)
    reaches = os.pread(fd, 1, offset + size - 1)[0] == int(view[-1])
    view[-1] ^= 0xFF
    return ("mapped", size, shows, reaches)


_NOT_WRAP = ("offset + size wrapped around in u64 arithmetic (area's numbers are numpy "
             "u64, as in C): compare without adding.")

Q1 = Question(
    name="q1", title="set_log_base: check the numbers against the fd, then map",
    targets=("set_log_base",), run=_run_map, reference=(None,),
    cases=(
        Case("a 16 KiB memfd, mmap_size 16 KiB at offset 0", _map_case(FILE, FILE, 0)),
        Case("a 16 KiB memfd, 64 bytes at offset 0x1008 (not page-aligned)",
             _map_case(FILE, 64, 0x1008),
             advice="mmap's own offset must be a multiple of mmap.ALLOCATIONGRANULARITY: "
                    "map from the page below and start your view further in."),
        Case("a 16 KiB memfd, the last 8 bytes", _map_case(FILE, 8, FILE - 8)),
        Case("mmap_size 0", _map_case(FILE, 0, 0),
             expect=Raises(ValueError, why="A log of 0 bytes is no log.")),
        Case("mmap_size 12 (not whole u64 words)", _map_case(FILE, 12, 0),
             expect=Raises(ValueError, why="The log is read and cleared 64 bits at a time.")),
        Case("mmap_offset 4 (not a multiple of 8)", _map_case(FILE, 64, 4),
             expect=Raises(ValueError, why="The u64 words must be aligned.")),
        Case("mmap_size 8 bytes larger than the fd", _map_case(FILE, FILE + 8, 0),
             expect=Raises(ValueError, why="os.fstat(fd).st_size is the fd's real size.")),
        Case("mmap_offset at the fd's end, mmap_size 8", _map_case(FILE, 8, FILE),
             expect=Raises(ValueError, why="The log must lie inside the fd.")),
        Case("mmap_offset 2**64 - 4096 and mmap_size 8192 (the sum wraps to 4096)",
             _map_case(FILE, 8192, 2**64 - 4096),
             expect=Raises(ValueError, why=_NOT_WRAP)),
        Case("mmap_size 2**64 - 8 at offset 16 (the sum wraps to 8)",
             _map_case(FILE, 2**64 - 8, 16), expect=Raises(ValueError, why=_NOT_WRAP)),
    ),
    mistakes=(
        Mistake(lambda got, want, args: isinstance(got, tuple) and got[0] == "length",
                "the mapping you returned is not mmap_size bytes long: return exactly the "
                "log, from mmap_offset, mmap_size bytes."),
        Mistake(lambda got, want, args: isinstance(got, tuple) and got[0] == "mapped"
                and not got[2],
                "your mapping does not show the fd's bytes at mmap_offset: the log starts "
                "there, not at the start of what you mapped."),
        Mistake(lambda got, want, args: isinstance(got, tuple) and got[0] == "read-only",
                "the back-end writes into the log: map it read and write."),
        Mistake(lambda got, want, args: isinstance(got, tuple) and got[0] == "mapped"
                and not got[3],
                "a write through your mapping does not reach the fd: QEMU must see the "
                "back-end's marks, so the mapping is MAP_SHARED (a copy is not enough)."),
    ),
    hints=(
        "Refuse first, map afterwards: size a non-zero multiple of 8, offset a multiple "
        "of 8, and the whole [offset, offset + size) inside the fd (os.fstat(fd).st_size).",
        "area's numbers are numpy u64, as a C back-end reads them: offset + size can wrap "
        "past 2**64 to a small number. Write the bound as two comparisons that cannot "
        "overflow, one of them with a subtraction.",
        "mmap.mmap wants an offset that is a multiple of mmap.ALLOCATIONGRANULARITY: map "
        "from the granule below mmap_offset, then return a numpy view (np.frombuffer "
        "takes a count and an offset) of the mmap_size bytes that are the log.",
    ),
    solution=SOLUTION_SET_LOG_BASE, own_work=(),
)


# ---------------------------------------------------------------- Q2: vhost_log_sync
def _words(*pages: int, n: int = 8) -> np.ndarray:
    w = np.zeros(n, np.uint64)
    for p in pages:
        w[p // 64] |= np.uint64(1 << (p % 64))
    return w


def _sync_case(*pages: int, n: int = 8):
    @contextlib.contextmanager
    def setup():
        yield (_words(*pages, n=n),)
    return setup


def _run_sync(targets, args):
    (words,) = args
    if targets == (None,):
        return (sorted(_pages_of(words)), True)
    got = targets[0](words)
    if got is None:
        return None
    return (sorted(int(p) for p in got), not words.any())


def _racing_case():
    @contextlib.contextmanager
    def setup():
        yield (RacingLog(_words(0, 5, 64, 200, 511, n=8)),)
    return setup


def _run_racing(targets, args):
    (log,) = args
    if targets == (None,):
        return ("no mark lost", ())
    got = targets[0](log)
    if got is None:
        return None
    taken = {int(p) for p in got}
    left = set(_pages_of(log.words))
    lost = sorted(log.marks - taken - left)
    invented = sorted(taken - log.marks)
    if invented:
        return ("invented", tuple(invented))
    return ("no mark lost", tuple(lost)) if not lost else ("lost", tuple(lost))


@njit(nogil=True, cache=True)
def _writer(log8, order, spin):
    for k in range(order.size):
        p = order[k]
        atomic_or(log8, p >> 3, np.uint8(1 << (p & 7)))
        x = 0
        for _ in range(spin):
            x += 1
    return order.size


def _run_threads(targets, args):
    """A real writer thread marks every page once (atomic OR, no GIL) while your
    sync runs again and again; every mark must come out exactly once."""
    if targets == (None,):
        return ("no mark lost", 0)
    words = np.zeros(64, np.uint64)                  # 4096 pages
    order = np.random.default_rng(14).permutation(words.size * 64).astype(np.int64)
    _writer(words.view(np.uint8), order[:8], 1)      # compile before the race
    words[:] = 0
    done = threading.Event()
    thread = threading.Thread(target=lambda: (_writer(words.view(np.uint8), order, 2000),
                                              done.set()), daemon=True)
    taken: list[int] = []
    thread.start()
    while not done.is_set():
        got = targets[0](words)
        if got is None:
            thread.join()
            return None
        taken.extend(int(p) for p in got)
    thread.join()
    taken.extend(int(p) for p in targets[0](words))
    missing = words.size * 64 - len(set(taken))
    twice = len(taken) - len(set(taken))
    return ("no mark lost", 0) if missing == 0 and twice == 0 else ("lost", missing, twice)


Q2 = Question(
    name="q2", title="vhost_log_sync: take the dirty bits by exchange, return the pages",
    targets=("vhost_log_sync",), reference=(None,), run=_run_sync,
    cases=(
        Case("a clean log of 8 words", _sync_case()),
        Case("pages 0, 63, 64, 130 and 511 dirty", _sync_case(0, 63, 64, 130, 511),
             advice="Word w, bit b is page w * 64 + b; bit 63 is the top bit of a u64."),
        Case("every page of word 3 dirty", _sync_case(*range(192, 256))),
    ),
    mistakes=(
        Mistake(lambda got, want, args: got[0] == want[0] and not got[1],
                "the pages are right but the log still holds them: a sync clears what it "
                "takes, or the next round copies them again."),
        Mistake(lambda got, want, args: sorted(got[0]) == sorted(
            (p // 64) * 64 + 63 - p % 64 for p in want[0]),
                "the bits come out mirrored in each word: bit b of word w is page "
                "w * 64 + b, counting b from the least significant bit."),
    ),
    hints=(
        "log64[w] is a u64 holding pages w * 64 to w * 64 + 63; bit b (from the least "
        "significant) is page w * 64 + b.",
        "Another process (the back-end) sets bits while you clear them. Reading a word and "
        "then writing 0 into it loses any bit set in between; xchg64 does both in one step.",
        "Convert what xchg64 gives back with int() before you shift it bit by bit.",
    ),
    solution=SOLUTION_LOG_SYNC, own_work=("xchg64",),
)

_RACE_MISTAKES = (
    Mistake(lambda got, want, args: got[0] == "lost",
            "a mark set by the other writer while your sync ran is gone: it is neither in "
            "what you returned nor left in the log. Take each word's bits and clear them "
            "in one indivisible step (xchg64), never a read followed by a write."),
    Mistake(lambda got, want, args: got[0] == "invented",
            "you returned pages nobody marked."),
)

Q2_RACE = Question(
    name="q2_race", title="vhost_log_sync loses no mark set during the sync",
    targets=("vhost_log_sync",), reference=(None,), run=_run_racing,
    cases=(Case("a log whose other writer marks each word just after you first read it",
                _racing_case()),),
    mistakes=_RACE_MISTAKES, hints=Q2.hints, solution=SOLUTION_LOG_SYNC,
    own_work=("xchg64",))

Q2_THREADS = Question(
    name="q2_threads", title="vhost_log_sync against a real concurrent writer",
    targets=("vhost_log_sync",), reference=(None,), run=_run_threads, seconds=60.0,
    cases=(Case("a writer thread marking all 4096 pages with atomic ORs during your syncs",
                lambda: fixed()),),
    mistakes=_RACE_MISTAKES, hints=Q2.hints, solution=SOLUTION_LOG_SYNC,
    own_work=("xchg64",))


# ---------------------------------------------------------------- Q3: a live migration
class _LearnerLog(DirtyLog):
    """A DirtyLog over the learner's mapping (closing drops it; the mapping goes
    when nothing refers to it any more)."""

    def __init__(self, view: np.ndarray) -> None:
        super().__init__(view, 0, int(view.size), None)   # the view stands in for the mmap

    def close(self) -> None:
        if not self.closed:
            self._mm = _Unmapped()
            super().close()


class _Unmapped:
    """What closing a learner's log unmaps: nothing (the mapping is theirs)."""

    def close(self) -> None:
        pass


def learner_handlers(set_log_base: Callable) -> dict:
    """Back-end handlers (``handlers.HANDLERS`` signature) where SET_LOG_BASE runs
    the learner's code after the back-end's own edge checks (feature gate,
    payload, one fd). A learner function that raises makes the request fail."""

    def set_log_base_handler(dev, msg, fds):
        handlers._gate(dev, msg, ProtocolFeature.LOG_SHMFD)
        handlers._payload(msg, LogArea)
        handlers._fd_count(msg, fds, 1)
        area = area_from_message(msg.to_bytes())
        try:
            mapped = set_log_base(fds.peek(0), area)
            view = np.frombuffer(mapped, np.uint8) if not isinstance(mapped, np.ndarray) \
                else mapped.reshape(-1).view(np.uint8)
        except Exception as exc:  # the learner's bug becomes a refused request
            raise RequestError("SET_LOG_BASE", "learner code", type(exc).__name__,
                               "no exception", str(exc)) from None
        if view.size != msg.payload.mmap_size or not view.flags.writeable:
            raise RequestError("SET_LOG_BASE", "mapping", view.size, msg.payload.mmap_size,
                               "set_log_base must return the writable log")
        new = _LearnerLog(view)
        for vring in dev.vrings:
            if vring.addr is not None and vring.addr.log_enabled:
                rings.check_used_log(msg, vring.addr, vring.num, new.pages, "mmap_size")
        old, dev.log = dev.log, new
        if old is not None:
            old.close()
        return None

    return {Request.SET_LOG_BASE: set_log_base_handler}


def migrate_with_log(set_log_base: Callable, vhost_log_sync: Callable, *, rounds: int = 3,
                     frames_per_round: int = 16) -> dict:
    """The built-in live migration with your SET_LOG_BASE in the source back-end and
    your vhost_log_sync in the source front-end; its summary.

    Both functions are first tried once, so a stub's NotImplementedError
    reaches the caller instead of breaking a back-end.
    """
    from vhostlab.frontend.migration import BuiltinMigration
    with memfd_of(4096) as fd:
        set_log_base(fd, area_from_message(log_base_message(4096, 0)))
    vhost_log_sync(np.zeros(4, np.uint64))
    migration = BuiltinMigration(rounds=rounds, frames_per_round=frames_per_round,
                                 backend_handlers=learner_handlers(set_log_base),
                                 log_sync=vhost_log_sync, wait_timeout=MIGRATION_WAIT_S)
    return summary_of(migration.run)


QEMU_MIGRATION = dict(busy_syncs=3, timeout=60.0)


def migrate_with_log_qemu(set_log_base: Callable, qemu: str | None = None, **config) -> dict:
    """A live migration between two real QEMUs with your SET_LOG_BASE in the source
    back-end; its summary (``vhostlab.qemu.MigrationResult.summary()``)."""
    from vhostlab.qemu.migration import MigrationConfig, QemuMigration
    options = {**QEMU_MIGRATION, **config}
    cfg = MigrationConfig(qemu=qemu, source_handlers=learner_handlers(set_log_base), **options)
    return summary_of(lambda: QemuMigration(cfg).run().summary())


def _exec(code: str) -> Callable:
    ns = {"np": np, "os": os, "mmap": mmap, "xchg64": xchg64}
    exec(code, ns)
    return next(v for k, v in ns.items() if k not in ("np", "os", "mmap", "xchg64")
                and not k.startswith("__"))


_REF_MAP, _REF_SYNC = _exec(SOLUTION_SET_LOG_BASE), _exec(SOLUTION_LOG_SYNC)


def _run_migration(targets, args):
    if args == ("qemu",):
        qemu = usable_qemu()
        if qemu is None:        # graded on the built-in front-end alone (the case before)
            return {"integrity": "ok", "error": None, "pages_mismatched": 0,
                    "frontend": "no QEMU here: not run"}
        targets[1](np.zeros(4, np.uint64))      # a stub's NotImplementedError surfaces here
        summary, front = migrate_with_log_qemu(targets[0], qemu), "real QEMU"
    else:
        summary, front = migrate_with_log(*targets), "built-in"
    if tuple(targets) == (_REF_MAP, _REF_SYNC):
        reference_must_migrate(summary, front)
    mig = summary.get("migration", {})
    if summary.get("error") is None and mig.get("error"):
        summary = {**summary, "error": mig.get("error")}
    return {**frames_outcome(summary), "pages_mismatched": mig.get("pages_mismatched")}


Q3 = Question(
    name="q3", title="a live migration with your log loses no frame",
    targets=("set_log_base", "vhost_log_sync"), reference=(_REF_MAP, _REF_SYNC),
    run=_run_migration, seconds=180.0,
    compare=lambda got, want: got.get("integrity") == "ok",
    correct_message="the guest moved to the destination and every frame the back-end "
                    "wrote during the rounds arrived intact, through your log.",
    cases=(Case("a built-in live migration (3 rounds, frames both ways after each copy)",
                lambda: fixed()),
           Case("a live migration between two real QEMUs, your SET_LOG_BASE in the source "
                "back-end (run only where QEMU is installed)", lambda: fixed("qemu"))),
    mistakes=(
        Mistake(lambda got, want, args: got.get("error") is not None,
                "the migration itself failed: a back-end refused your SET_LOG_BASE answer "
                "or your sync raised. Make q1 and q2 correct first."),
        Mistake(lambda got, want, args: (got.get("pages_mismatched") or 0) > 0,
                "pages differ at the destination: pages the back-end wrote were not found "
                "dirty by your sync (or were marked in a log QEMU does not read)."),
    ),
    hints=("q3 has no code of its own: make q1 and q2 correct.",),
    solution=SOLUTION_MIGRATE, own_work=("xchg64",),
)

EXERCISE = Exercise(name="log_base", title="SET_LOG_BASE and the sync that drains the log",
                    questions=(Q1, Q2, Q2_RACE, Q2_THREADS, Q3), setup=SETUP)
