"""QEMU's pre-copy rounds, and what the views of a real-QEMU migration need beside them.

Rounds. QEMU copies RAM in rounds; each ends in a dirty-bitmap sync
(migration_bitmap_sync), which bumps ``dirty-sync-count`` in query-migrate
and also reads and clears the vhost log (vhost_log_sync). Nobody is told
when a sync happens: the orchestrator reads query-migrate and the vhost log
every tick, and :class:`RoundTracker` turns that sequence of readings into
:class:`PrecopyRound` s. It is sans-IO (no QEMU, no threads, no sockets):
feed it recorded query-migrate answers in a test and it makes the same
rounds. Its rules:

- A round begins at the first reading that sees its sync; its counters run
  from there to the reading that sees the next sync (round 1 from migrate,
  where QEMU's counters start at 0).
- Several syncs between two readings make one round (``syncs`` lists them).
- The vhost log's readings are ORed until the sync count moves, as QEMU
  clears the log at each sync (marks made just before a sync and after the
  last reading are missed).
- The last round's sync is never seen before its pages are out: QEMU stops
  the guest (STOP) and holds its main lock until then. So when the
  migration completes, the last round counts from the reading before and
  the round before it loses its ``remaining_after``.

The views. QEMU keeps its own dirty bitmap and tells nobody which pages are
in it, but every write the kit's guest makes goes through qtest (QEMU tracks
those itself, as it tracks vCPU writes), so :class:`GuestWrites` learns the
same pages by watching the qtest connection. The bands say where the guest
driver put its rings, buffers and working set (its allocator's table), and
:func:`mismatched_pages` compares the two RAMs through the back-ends'
mappings after the switch-over, before the destination guest runs.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, fields, replace

import numpy as np

from vhostlab.dirtylog import GuestBand
from vhostlab.frontend.frames import frame_name as _frame_name
from vhostlab.memory import TARGET_PAGE_SIZE

__all__ = ["PrecopyRound", "MigrateReading", "RoundTracker", "FINAL_STATES",
           "GuestWrites", "qemu_bands", "mismatched_pages", "frame_name"]

_NAMES = {"queue 0 ring": "RX ring", "queue 1 ring": "TX ring",
          "queue 0 buffers": "RX buffers", "queue 1 buffers": "TX buffers",
          "dirtier working set": "guest working set"}


#: query-migrate's ``status`` once the migration is over.
FINAL_STATES = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class PrecopyRound:
    """One pre-copy round: a dirty-bitmap sync and what QEMU sent after it.

    Read just after the sync: ``dirty_sync_count``, ``time`` (s since
    migrate), ``transferred``, ``remaining`` (bytes still dirty), the pages
    the source back-end marked in the vhost log since the previous sync
    (``log_bitmap``: bit ``p % 8`` of byte ``p // 8``; ``pages_logged``) and
    what the guest did meanwhile. QEMU counts the guest's dirty pages and the
    log's together: there is no "dirtied by the guest" number.

    Over the round (query-migrate deltas, from the reading that saw its sync
    to the one that saw the next; round 1 from migrate; the last round, whose
    sync no reading sees before its pages are out, from the reading before):
    ``pages_sent`` (normal + duplicate), ``zero_pages``, ``bytes_sent``;
    ``remaining_after`` (bytes dirty at the next sync; 0 after the last round,
    None if unknown); ``downtime_bytes`` (sent with the guest stopped) and
    ``status`` when it ended. ``syncs``: the syncs it stands for (several when
    they fell between two readings); ``note`` explains those and the last.
    """

    round: int
    dirty_sync_count: int
    time: float                   # s since migrate
    status: str
    transferred: int
    remaining: int
    dirty_pages_rate: int
    log_bitmap: bytes
    pages_logged: int
    guest_bytes_written: int = 0
    rx_frames: int = 0
    tx_frames: int = 0
    syncs: tuple[int, ...] = ()
    pages_sent: int = 0
    zero_pages: int = 0
    bytes_sent: int = 0
    remaining_after: int | None = None
    downtime_bytes: int | None = None
    note: str = ""

    def summary(self) -> dict:
        """JSON-ready, without the bitmap."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "log_bitmap"}
        return {**out, "syncs": list(self.syncs)}

    def logged_pages(self) -> np.ndarray:
        """Page numbers set in :attr:`log_bitmap`."""
        bits = np.unpackbits(np.frombuffer(self.log_bitmap, np.uint8), bitorder="little")
        return np.flatnonzero(bits)


@dataclass(frozen=True)
class MigrateReading:
    """query-migrate's RAM counters at one reading (``pages``: normal + duplicate)."""

    status: str = "none"
    dirty_sync_count: int = 0
    transferred: int = 0
    pages: int = 0
    zero_pages: int = 0
    remaining: int = 0

    @classmethod
    def of(cls, q: dict) -> "MigrateReading":
        """The counters of one query-migrate answer (fields missing: 0)."""
        ram = {k: int(v) for k, v in q.get("ram", {}).items() if isinstance(v, (int, float))}
        return cls(q.get("status", "none"), ram.get("dirty-sync-count", 0),
                   ram.get("transferred", 0), ram.get("normal", 0) + ram.get("duplicate", 0),
                   ram.get("duplicate", 0), ram.get("remaining", 0))


class RoundTracker:
    """Pre-copy rounds from a sequence of query-migrate answers and vhost-log readings.

    Feed it, in the order things were read: :meth:`log_read` with each
    reading of the source back-end's log bitmap, :meth:`guest_did` with what
    the guest did, and :meth:`query_migrate` with each answer and its time
    (s since migrate). :attr:`rounds` is the rounds so far. No I/O: the
    caller reads QEMU and keeps any lock.
    """

    def __init__(self) -> None:
        self._rounds: list[PrecopyRound] = []
        self._log: np.ndarray | None = None                 # the log, ORed since the last sync
        self._activity = [0, 0, 0]                          # guest bytes, rx frames, tx frames
        self._reading, self._reading_at = MigrateReading(), 0.0   # the last answer
        self._starts: list[MigrateReading] = []             # each round's first reading
        self._before_last = self._reading                   # the one before the last round
        self.ended = False

    @property
    def rounds(self) -> tuple[PrecopyRound, ...]:
        return tuple(self._rounds)

    def log_read(self, bitmap: bytes) -> None:
        """A reading of the vhost log (bit ``p % 8`` of byte ``p // 8`` is page ``p``)."""
        bits = np.frombuffer(bitmap, np.uint8)
        same = self._log is not None and self._log.size == bits.size
        self._log = self._log | bits if same else bits.copy()

    def guest_did(self, bytes_written: int = 0, rx_frames: int = 0, tx_frames: int = 0) -> None:
        """What the guest did since the last call; it goes to the next round to open."""
        for i, n in enumerate((bytes_written, rx_frames, tx_frames)):
            self._activity[i] += n

    def query_migrate(self, q: dict, at: float) -> PrecopyRound | None:
        """One query-migrate answer, read ``at`` s after migrate. Returns the round it
        opened (QEMU synced since the last answer), else None."""
        now = MigrateReading.of(q)
        seen = self._rounds[-1].dirty_sync_count if self._rounds else 0
        opened = None
        if now.dirty_sync_count > seen:
            opened = self._open_round(q, now, seen, at)
        elif self._rounds and "ram" in q:
            self._count(-1, now)
        elif self._rounds:         # failed, cancelled: QEMU leaves out the RAM counters
            self._replace(-1, status=now.status)
        if now.status in FINAL_STATES and self._rounds and not self.ended:
            self._end_rounds(q, now)
        self._reading, self._reading_at = now, at
        return opened

    def _open_round(self, q: dict, now: MigrateReading, seen: int, at: float) -> PrecopyRound:
        """QEMU synced since the last reading: the round before ends, a new one begins, here."""
        if self._rounds:
            self._count(-1, now, status=self._rounds[-1].status)
            self._replace(-1, remaining_after=now.remaining)
        syncs = tuple(range(seen + 1, now.dirty_sync_count + 1))
        note = ""
        if len(syncs) > 1:
            since = at - self._reading_at
            note = (f"dirty syncs {syncs[0]} to {syncs[-1]} came between two readings of "
                    f"query-migrate {since * 1e3:.0f} ms apart: one round for them")
        bitmap = self._log if self._log is not None else np.zeros(0, np.uint8)
        guest_bytes, rx, tx = self._activity
        snap = PrecopyRound(
            round=len(self._rounds) + 1, dirty_sync_count=now.dirty_sync_count,
            time=round(at, 4), status=now.status,
            transferred=now.transferred, remaining=now.remaining,
            dirty_pages_rate=int(q.get("ram", {}).get("dirty-pages-rate", 0)),
            log_bitmap=bitmap.tobytes(), pages_logged=int(np.bitwise_count(bitmap).sum()),
            guest_bytes_written=guest_bytes, rx_frames=rx, tx_frames=tx, syncs=syncs, note=note)
        self._log = None
        self._activity = [0, 0, 0]
        # Round 1 counts from migrate (QEMU's counters start at 0 there).
        self._starts.append(now if self._rounds else MigrateReading())
        self._before_last = self._reading
        self._rounds.append(snap)
        self._count(-1, now)
        return self._rounds[-1]

    def _replace(self, i: int, **changes) -> None:
        self._rounds[i] = replace(self._rounds[i], **changes)

    def _count(self, i: int, end: MigrateReading, status: str | None = None) -> None:
        """Round ``i``'s counters, from its first reading to ``end``."""
        start = self._starts[i]
        self._replace(i, status=status or end.status, pages_sent=end.pages - start.pages,
                      zero_pages=end.zero_pages - start.zero_pages,
                      bytes_sent=end.transferred - start.transferred)

    def _end_rounds(self, q: dict, now: MigrateReading) -> None:
        """The migration ended; if it completed, its last round went with the guest stopped
        (QEMU holds its main lock from the STOP until the last pages are out)."""
        self.ended = True
        if now.status != "completed":
            return
        before = ""
        if len(self._rounds) > 1:
            self._starts[-1] = self._before_last
            self._count(-2, self._before_last, status=self._rounds[-2].status)
            self._replace(-2, remaining_after=None)
            before = f" (left after round {len(self._rounds) - 1})"
        self._count(-1, now)
        stopped = q.get("ram", {}).get("downtime-bytes")
        note = ("the guest stopped (STOP) before the last sync; QEMU answers query-migrate "
                f"again only once it has sent what that sync found, so that count{before} "
                "is not known" + ("" if stopped is None else
                                  f"; {stopped} bytes went out with the guest stopped "
                                  "(downtime-bytes)"))
        self._replace(-1, remaining_after=0, downtime_bytes=stopped,
                      note="; ".join(filter(None, (self._rounds[-1].note, note))))


class GuestWrites:
    """The pages the guest wrote through qtest since the last :meth:`take`."""

    def __init__(self) -> None:
        self._pages: set[int] = set()
        self._lock = threading.Lock()

    def record(self, gpa: int, length: int) -> None:
        """The qtest connection's ``on_write`` hook: [gpa, gpa + length) was written."""
        if length <= 0:
            return
        with self._lock:
            self._pages.update(range(gpa // TARGET_PAGE_SIZE,
                                     (gpa + length - 1) // TARGET_PAGE_SIZE + 1))

    def take(self) -> np.ndarray:
        """The pages written since the last call (sorted), and forget them."""
        with self._lock:
            pages, self._pages = self._pages, set()
        return np.array(sorted(pages), dtype=np.int64)


def qemu_bands(guest) -> tuple[GuestBand, ...]:
    """The guest driver's allocations (rings, buffers, working set) as named bands."""
    return tuple(GuestBand(_NAMES.get(what, what), gpa // TARGET_PAGE_SIZE,
                           -(-size // TARGET_PAGE_SIZE))
                 for what, gpa, size in guest.allocator.allocations)


def _read_ram(side, gpa: int, n: int) -> bytes:
    read = getattr(side, "read_ram", None)
    if read is not None:
        return read(gpa, n)
    with side.lock:
        return side.device.memory.read(gpa, n)


def mismatched_pages(src_server, dst_server, first_page: int, end_page: int) -> np.ndarray:
    """Pages in [first_page, end_page) whose bytes differ between the two back-ends'
    mappings of guest RAM (source and destination): each a BackendServer, or
    anything with ``read_ram(gpa, n)`` (a relay's mapping of DPDK's memory table)."""
    gpa, n = first_page * TARGET_PAGE_SIZE, (end_page - first_page) * TARGET_PAGE_SIZE
    a = np.frombuffer(_read_ram(src_server, gpa, n), np.uint8)
    b = np.frombuffer(_read_ram(dst_server, gpa, n), np.uint8)
    differ = (a.reshape(-1, TARGET_PAGE_SIZE) != b.reshape(-1, TARGET_PAGE_SIZE)).any(axis=1)
    return np.flatnonzero(differ) + first_page


def frame_name(frame: bytes) -> str | None:
    """"RX #12" for a frame the kit sent to the guest, "TX #3" for one it sent."""
    return _frame_name(frame, intact=False)
