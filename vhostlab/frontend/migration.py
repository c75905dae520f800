"""A built-in live migration between two back-ends, following the seed step by step.

Theory of operation
-------------------
Two in-process vhost-user-net back-ends (each a ``BackendServer`` on its own
socket) stand for the source and destination hosts' back-ends; two
``VhostDev`` (with their ``VhostOps``) stand for the source and destination
QEMUs; one :class:`~vhostlab.frontend.guest.BuiltinVirtioNetGuest` is the guest that
moves. RAM is copied from the source guest's memfd to the destination's, in
rounds, as QEMU's precopy does:

1. ``vhost_log_global_start`` on the source: SET_LOG_BASE, SET_FEATURES with
   VHOST_F_LOG_ALL, SET_VRING_ADDR with VHOST_VRING_F_LOG (seed steps 1 and 2).
2. Round 1 copies every page. Each later round first syncs the dirty
   bitmap (QEMU's migration_bitmap_sync): the pages the guest wrote (tracked
   by the front-end, as QEMU tracks vCPU writes) and the pages the back-end
   wrote (``vhost_log_sync``: the vhost log, read and cleared), then copies
   those pages. Frames flow both ways after each copy, so the back-end writes
   RX frames into pages already copied: only the vhost log can say so.
3. Stop: ``vhost_dev_stop`` on the source (GET_VRING_BASE per ring, then
   ``vhost_log_put(sync=True)``: the final log sync; seed step 3), then the
   last round copies what is still dirty, while nothing runs.
4. The destination starts: ``vhost_dev_start`` (SET_VRING_BASE = what the
   source's GET_VRING_BASE returned), SET_VRING_ENABLE, SEND_RARP; the guest
   resumes on the destination's RAM and reads the frames the source back-end
   had put in its RX buffers, now from the destination's memory.

The downtime (``downtime_s``) is the time the guest could not run: from
the moment the source begins ``vhost_dev_stop`` to the moment the
destination's ``vhost_dev_start`` has returned. (A real QEMU reports its
own in query-migrate's ``downtime``, measured on the source.) The
page-by-page comparison of the two RAMs at switch-over is the kit's
integrity check, not part of a migration, so its time is left out.

Integrity is checked, not assumed: every frame carries its own identity and
content (frames.py); every RX frame the back-ends delivered must be read by
the guest intact from guest memory, every TX frame must reach a wire exactly
once, and at switch-over the two RAMs must be equal page for page.

With ``backend="dpdk"`` the two back-ends are DPDK's (testpmd with a vhost
port, ``vhostlab.backend.dpdk``), reached through a recording relay so the
messages are traced all the same. testpmd has no wire to inject from or
capture to: it forwards every frame the guest transmits back into the
guest's RX ring (io forwarding on one looped port). So each TX frame must
come back exactly once, intact, read from guest memory, and the ones DPDK
wrote into RX buffers after a copy round reach the guest only if DPDK
logged those writes and the pages were copied again. A SEND_RARP makes DPDK
send the guest a RARP too; it is counted, not checked.

With ``ring="packed"`` the guest's rings are packed: the device writes its
used descriptors back into the descriptor ring, so that is what the vhost log
must cover (VhostDev.log_guest_addr), and GET_VRING_BASE / SET_VRING_BASE
carry the wrap counters (``vring_base`` in the summary decodes them).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from vhostlab.backend import BackendServer, CaptureWire, is_rarp
from vhostlab.dirtylog import DirtyRound, GuestBand
from vhostlab.memory import TARGET_PAGE_SIZE, GuestMemory
from vhostlab.protocol import Feature
from vhostlab.ring.packed_layout import parse_packed_vring_base
from vhostlab.switchover import SwitchoverRecorder, frames_in_pages

from .channel import VhostUserChannel
from .dpdk_side import BACKENDS, DpdkSide, _ignore_log
from .frames import GUEST_MAC, RX, TX, FrameLedger, frame_name
from .guest import (BUF_GPA, BUF_SIZE, RING_GPA, RINGS, RX_QUEUE, TX_QUEUE,
                    BuiltinVirtioNetGuest, GuestDriverError)
from .ramcopy import compare_pages, copy_pages, ram_pages
from .vhost_dev import VhostDev
from .vhost_ops import VhostOps

__all__ = ["BuiltinMigration", "BuiltinRound",
           "copy_pages", "compare_pages", "ram_pages", "builtin_bands"]

WAIT_TIMEOUT = 10.0


@dataclass(frozen=True)
class BuiltinRound:
    """One round of RAM copy, for the labs to draw.

    ``pages_dirtied_by_guest`` and ``pages_from_vhost_log`` are what the sync
    before this round found (0 in round 1, which copies everything);
    ``log_bitmap`` is the vhost log as the back-end had marked it since the
    previous sync (one bit per page, bit ``p % 8`` of byte ``p // 8``).
    """

    round: int
    phase: str                     # "live" or "stop-and-copy"
    pages_copied: int
    pages_dirtied_by_guest: int
    pages_from_vhost_log: int
    pages_from_both: int
    log_bitmap: np.ndarray
    guest_bitmap: np.ndarray
    rx_frames_after_copy: int = 0
    tx_frames_after_copy: int = 0

    def summary(self) -> dict:
        return {"round": self.round, "phase": self.phase, "pages_copied": self.pages_copied,
                "pages_dirtied_by_guest": self.pages_dirtied_by_guest,
                "pages_from_vhost_log": self.pages_from_vhost_log,
                "rx_frames_after_copy": self.rx_frames_after_copy,
                "tx_frames_after_copy": self.tx_frames_after_copy}


def builtin_bands(guest: BuiltinVirtioNetGuest) -> tuple[GuestBand, ...]:
    """Where the built-in guest keeps its rings and buffers (guest.py's fixed layout)."""
    bands = []
    for q, kind in ((RX_QUEUE, "RX"), (TX_QUEUE, "TX")):
        size = guest.queues[q].ring_size
        bands.append(GuestBand(f"{kind} ring", RING_GPA[q] // TARGET_PAGE_SIZE,
                               -(-size // TARGET_PAGE_SIZE)))
    for q, kind in ((RX_QUEUE, "RX"), (TX_QUEUE, "TX")):
        bands.append(GuestBand(f"{kind} buffers", BUF_GPA[q] // TARGET_PAGE_SIZE,
                               -(-guest.queues[q].num * BUF_SIZE // TARGET_PAGE_SIZE)))
    return tuple(sorted(bands, key=lambda b: b.first_page))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


def _reserve(ram_size: int) -> int:
    """Address space for one guest RAM mapping: its regions plus guard pages, with room."""
    return 4 * ram_size + (64 << 20)


def _bitmap(pages: np.ndarray, npages: int) -> np.ndarray:
    bits = np.zeros(npages, dtype=np.uint8)
    bits[np.asarray(pages, dtype=np.int64)] = 1
    return np.packbits(bits, bitorder="little")


@dataclass
class _Side:
    """One host: its back-end server, its QEMU (VhostDev), its guest RAM."""

    name: str
    server: BackendServer | DpdkSide
    wire: CaptureWire | None
    dev: VhostDev | None = None
    memory: GuestMemory | None = None


@dataclass
class BuiltinMigration:
    """Drive a whole migration; each phase is a method so the demo can narrate between them.

    ``run()`` does every phase. ``rounds`` live rounds precede the stop;
    ``frames_per_round`` frames go each way after each live copy (and once
    before and once after migration). ``break_logging`` makes both back-ends
    skip dirty logging, so the check must fail. ``backend_handlers`` replaces
    request handlers in both back-ends (an exercise runs a learner's
    GET_VRING_BASE / SET_VRING_BASE there); ``wait_timeout`` bounds each wait
    for frames, so a back-end that loses them costs seconds, not minutes.
    Faults and hooks for the exercises, on the source's front-end:
    ``log_sync`` reads and clears the log in place of ``DirtyLog.sync``
    (a function of the log's u64 words returning dirty pages);
    ``skip_final_sync`` leaves out vhost_log_put's last sync at the stop;
    ``log_used_ring=False`` sends SET_VRING_ADDR without VHOST_VRING_F_LOG.
    ``backend``: "vhostlab" (in-process back-ends) or "dpdk" (two testpmd
    processes; ``backend_handlers`` do not apply, and ``break_logging``
    makes the source front-end ignore DPDK's log, as DPDK cannot skip it).
    ``ring``: "split" or "packed" (the guest's rings; packed needs a back-end
    that offers VIRTIO_F_RING_PACKED, see :meth:`backend_offers_packed`).
    """

    ram_size: int = 16 << 20
    rounds: int = 3
    frames_per_round: int = 16
    break_logging: bool = False
    queue_size: int = 256
    backend_handlers: dict | None = None
    wait_timeout: float = WAIT_TIMEOUT
    log_sync: object = None
    skip_final_sync: bool = False
    log_used_ring: bool = True
    backend: str = "vhostlab"
    ring: str = "split"
    snapshots: list = field(default_factory=list)
    dirty_rounds: list = field(default_factory=list)    # DirtyRound per sync, for the views
    ops_called: list = field(default_factory=list)
    rx: FrameLedger = field(default_factory=lambda: FrameLedger(RX))
    tx: FrameLedger = field(default_factory=lambda: FrameLedger(TX))
    pages_mismatched: np.ndarray | None = None
    rarp_frames: int = 0
    status: str = "not started"
    downtime_s: float | None = field(default=None, init=False)
    total_time_s: float | None = field(default=None, init=False)
    ram_compare_s: float = field(default=0.0, init=False)   # the check, not in the downtime

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: expected one of {BACKENDS}")
        if self.ring not in RINGS:
            raise ValueError(f"ring={self.ring!r}: expected one of {RINGS}")
        self.echo = self.backend == "dpdk"       # frames come back, no wire
        if self.echo and self.backend_handlers:
            raise ValueError("backend_handlers replace vhostlab's own handlers; DPDK's "
                             "back-end cannot take them")
        if self.echo and self.break_logging and self.log_sync is None:
            # DPDK cannot be told to skip logging: the source front-end ignores
            # what it logged instead (every sync reads and clears, and reports
            # nothing), which loses the same pages.
            self.log_sync = _ignore_log
        self.switchover = SwitchoverRecorder()   # rings at GET_VRING_BASE / SET_VRING_BASE
        self.src = self._side("source")
        self.dst = self._side("destination")
        if not self.echo:
            self.switchover.install(self.src.server, "source")
            self.switchover.install(self.dst.server, "destination")
        self._final_log = np.zeros(0, np.int64)     # what vhost_log_put's sync took
        self.problems: list[str] = []     # what went wrong on the way (not integrity)
        self.guest: BuiltinVirtioNetGuest | None = None
        self._seq = {RX: 0, TX: 0}
        self._lengths = np.random.default_rng(2020)
        self._pending_log = np.zeros(0, np.int64)   # pages from the final sync in vhost_log_put
        self._t_begin = self._t_stop = None         # time.monotonic() at migrate, at the stop
        self.vring_bases: dict[int, int] = {}       # what the source's GET_VRING_BASE returned

    def _side(self, name: str) -> _Side:
        if self.echo:
            return _Side(name, DpdkSide(name, self.switchover), None)
        wire = CaptureWire()
        server = BackendServer(None, wire=wire, break_logging=self.break_logging,
                               handlers=self.backend_handlers)
        return _Side(name, server, wire)

    def _guest(self, what: str, fn, *args, default=None):
        """Run a guest step; a GuestDriverError (a ring not as the guest left it) is recorded."""
        try:
            return fn(*args)
        except GuestDriverError as exc:
            self.problems.append(f"guest {what}: {exc}")
            return default

    def _receive(self) -> None:
        for frame in self._guest("receive", self.guest.receive, default=[]):
            if not self.echo:
                self.rx.arrive(frame)
            elif is_rarp(frame):
                self.rarp_frames += 1          # DPDK's answer to SEND_RARP
            else:
                self.tx.arrive(frame)          # a TX frame, forwarded back by testpmd

    # -- phases -------------------------------------------------------------------
    def start_backends(self) -> None:
        """Start both back-end servers, each on its own private socket."""
        for side in (self.src, self.dst):
            side.server.start()

    def _connect(self, side: _Side) -> VhostDev:
        ops = VhostOps(VhostUserChannel.connect(side.server.socket_path))
        ops.ops_called = self.ops_called           # one list, both QEMUs, in time order
        side.dev = VhostDev(ops, dirty_sink=None)
        if side is self.src:
            side.dev.log_sync = self.log_sync
            side.dev.log_used_ring = self.log_used_ring
        return side.dev

    def start_source(self) -> None:
        """Source QEMU: vhost_dev_init, guest negotiates, vhost_net_start; guest posts RX."""
        dev = self._connect(self.src)
        dev.vhost_dev_init()
        self.guest = BuiltinVirtioNetGuest(self.ram_size, self.queue_size, GuestMemory.allocate(
            self.ram_size, reserve=_reserve(self.ram_size)), ring=self.ring)
        self.src.memory = self.guest.memory
        self.guest.negotiate(dev.features)
        dev.vhost_net_start(self.guest)
        self.guest.post_rx_buffers()

    def warm_up(self) -> None:
        """Traffic before migration; the guest reads its RX frames at once."""
        self.traffic(self.src)
        self._receive()
        self.guest.post_rx_buffers()

    def start_destination(self) -> None:
        """Destination QEMU at -incoming: connects and initialises, then waits."""
        self._connect(self.dst).vhost_dev_init()
        self.dst.memory = GuestMemory.allocate(self.ram_size, reserve=_reserve(self.ram_size))

    def begin(self) -> None:
        """Migration starts: vhost_log_global_start on the source (SET_LOG_BASE, LOG_ALL, F_LOG)."""
        self.status = "active"
        self._t_begin = time.monotonic()
        self.guest.take_guest_dirty()        # QEMU's bitmap starts all dirty: round 1 copies all
        self.src.dev.vhost_log_global_start()

    def copy_round(self, phase: str = "live") -> BuiltinRound:
        """One round: sync the dirty bitmap (not before round 1), then copy those pages."""
        number = len(self.snapshots) + 1
        npages = self.guest.npages
        if number == 1:
            guest_pages = log_pages = np.zeros(0, np.int64)
            pages = ram_pages(self.src.memory)
        else:
            guest_pages = self.guest.take_guest_dirty().astype(np.int64)
            log_pages = np.concatenate([self._pending_log, self._sync_log()])
            self._pending_log = np.zeros(0, np.int64)
            pages = np.union1d(guest_pages, log_pages)
        self.src.dev.mark(f"round {number}: copy {pages.size} pages", phase=phase)
        copied = copy_pages(self.src.memory, self.dst.memory, pages)
        snap = BuiltinRound(number, phase, copied, int(np.unique(guest_pages).size),
                             int(np.unique(log_pages).size),
                             int(np.intersect1d(guest_pages, log_pages).size),
                             _bitmap(log_pages, npages), _bitmap(guest_pages, npages))
        self.snapshots.append(snap)
        if number > 1 and phase == "live":
            self.dirty_rounds.append(DirtyRound.make(
                len(self.dirty_rounds) + 1, self._since_begin(), npages, log_pages,
                guest_pages, builtin_bands(self.guest)))
        return snap

    def _since_begin(self) -> float:
        return 0.0 if self._t_begin is None else time.monotonic() - self._t_begin

    def _sync_log(self) -> np.ndarray:
        return self.src.dev.vhost_log_sync().astype(np.int64)

    def traffic(self, side: _Side, n: int | None = None) -> tuple[int, int]:
        """``n`` frames each way through ``side``'s back-end; wait until it has handled them."""
        n = self.frames_per_round if n is None else n
        if self.echo:
            return self._echo_traffic(side, n)
        snap = side.server.snapshot(trace=False).counters
        rx0, tx0 = snap["guest_rx_frames"], snap["guest_tx_frames"]
        rx_frames = [self._next(RX) for _ in range(n)]
        tx_frames = [self._next(TX) for _ in range(n)]
        sent = self._guest("transmit", self.guest.transmit, tx_frames, default=0)
        side.server.inject(rx_frames)
        done = side.server.wait_for(lambda s: s.counters["guest_rx_frames"] >= rx0 + n
                                    and s.counters["guest_tx_frames"] >= tx0 + sent,
                                    self.wait_timeout)
        if not done:
            c = side.server.snapshot(trace=False).counters
            self.problems.append(
                f"{side.name} back-end took {c['guest_tx_frames'] - tx0} of {sent} TX and "
                f"delivered {c['guest_rx_frames'] - rx0} of {n} RX frames in {self.wait_timeout} s")
        self._guest("reap", self.guest.reap, TX_QUEUE)
        return n, sent

    def _echo_traffic(self, side: _Side, n: int) -> tuple[int, int]:
        """``n`` TX frames to DPDK; wait until as many are back in RX buffers (the
        guest reads them later, so some live in pages copied before they came)."""
        before = self.guest.pending_used(RX_QUEUE)
        sent = self._guest("transmit", self.guest.transmit,
                           [self._next(TX) for _ in range(n)], default=0)
        deadline = time.monotonic() + self.wait_timeout
        back = 0
        while time.monotonic() < deadline:
            back = self.guest.pending_used(RX_QUEUE) - before
            if back >= sent:
                break
            self.guest.wait_call(RX_QUEUE, 0.05)
        if back < sent:
            self.problems.append(f"{side.name} back-end (DPDK) returned {back} of {sent} "
                                 f"frames in {self.wait_timeout} s")
        self._guest("reap", self.guest.reap, TX_QUEUE)
        return back, sent

    def _next(self, direction: int) -> bytes:
        ledger = self.rx if direction == RX else self.tx
        seq = self._seq[direction]
        self._seq[direction] += 1
        return ledger.send(seq, int(self._lengths.integers(60, 1515)))

    def live_round(self) -> BuiltinRound:
        """A live round: copy, then frames both ways while the guest keeps running."""
        snap = self.copy_round("live")
        rx, tx = self.traffic(self.src)
        snap = dataclasses.replace(snap, rx_frames_after_copy=rx, tx_frames_after_copy=tx)
        self.snapshots[-1] = snap
        return snap

    def stop_source(self) -> dict[int, int]:
        """vm_stop: vhost_dev_stop on the source (GET_VRING_BASE per ring, final log sync)."""
        dev = self.src.dev
        sink: list[np.ndarray] = []
        dev.dirty_sink = sink.append
        self._t_stop = time.monotonic()                # the guest stops running here
        if self.skip_final_sync:
            dev.log_sync = lambda log64: ()            # vhost_log_put's sync finds nothing
        bases = dev.vhost_dev_stop(self.guest)
        self.vring_bases = dict(bases)
        dev.dirty_sink = None
        self._pending_log = (np.concatenate(sink).astype(np.int64) if sink
                             else np.zeros(0, np.int64))
        self._final_log = self._pending_log
        self._t_final_sync = self._since_begin()
        return bases

    def final_round(self) -> BuiltinRound:
        """Stop-and-copy: the pages still dirty, then compare the two RAMs."""
        snap = self.copy_round("stop-and-copy")
        self.src.dev.vhost_log_global_stop()
        t0 = time.monotonic()
        self.pages_mismatched = compare_pages(self.src.memory, self.dst.memory,
                                              ram_pages(self.src.memory))
        self.ram_compare_s = time.monotonic() - t0
        self.dirty_rounds.append(self._final_round(snap))
        return snap

    def _final_round(self, snap: BuiltinRound) -> DirtyRound:
        """vhost_log_put's final sync as its own frame, with the pages that differ at the
        destination and the RX frames that lived in them."""
        guest = np.flatnonzero(np.unpackbits(snap.guest_bitmap, bitorder="little"))
        bad = self.pages_mismatched if self.pages_mismatched is not None else ()
        rx = [r for r in self.switchover.taken("source") if r.index == RX_QUEUE]
        frames = (frames_in_pages(rx[0], self.src.memory.read, bad, frame_name,
                                  self.guest.hdr_len) if rx and len(bad) else {})
        return DirtyRound.make(
            len(self.dirty_rounds) + 1, getattr(self, "_t_final_sync", self._since_begin()),
            self.guest.npages, self._final_log, guest, builtin_bands(self.guest),
            final_sync=True, mismatched=[(int(p), frames.get(int(p), ())) for p in bad],
            note="vhost_dev_stop -> vhost_log_put(dev, true): the last sync, after "
                 "GET_VRING_BASE stopped the rings")

    def start_destination_device(self) -> None:
        """The guest moves; destination vhost_net_start (SET_VRING_BASE from the source), RARP."""
        self.guest.move_to(self.dst.memory)
        dev = self.dst.dev
        dev.vhost_net_start(self.guest)
        resumed = time.monotonic()                     # the guest runs on the destination
        if self._t_stop is not None:
            self.downtime_s = resumed - self._t_stop - self.ram_compare_s
        if self._t_begin is not None:
            self.total_time_s = resumed - self._t_begin
        dev.vhost_ops.vhost_migration_done(GUEST_MAC)
        self.status = "completed"

    def resume(self) -> None:
        """The guest runs on the destination: reads what arrived, reposts, more traffic."""
        self._receive()
        self.guest.post_rx_buffers()
        self._guest("reap", self.guest.reap, TX_QUEUE)
        self.traffic(self.dst)
        self._receive()

    def check_wires(self) -> None:
        """Every frame that reached either wire goes through the TX ledger (RARPs aside)."""
        for side in (self.src, self.dst):
            for frame in (side.wire.captured if side.wire is not None else ()):
                if is_rarp(frame):
                    self.rarp_frames += 1
                else:
                    self.tx.arrive(frame)

    def run(self) -> dict:
        """Every phase, in order; always closes what it opened. Returns ``summary()``."""
        try:
            self.start_backends()
            self.start_source()
            self.warm_up()
            self.start_destination()
            self.begin()
            for _ in range(self.rounds):
                self.live_round()
            self.stop_source()
            self.final_round()
            self.start_destination_device()
            self.resume()
            self.check_wires()
            return self.summary()
        finally:
            self.close()

    # -- results --------------------------------------------------------------------
    @property
    def integrity_ok(self) -> bool:
        rx, tx = self.rx.summary(), self.tx.summary()
        checked = (tx,) if self.echo else (rx, tx)     # with DPDK every frame is a TX echo
        return (self.pages_mismatched is not None and self.pages_mismatched.size == 0
                and all(s["sent"] > 0 and s["lost"] == 0 and s["corrupted"] == 0
                        and s["duplicated"] == 0 for s in checked)
                and self.status == "completed")

    def summary(self) -> dict:
        """The JSON-ready result (what ``vhostlab demo --json`` prints)."""
        rx, tx = self.rx.summary(), self.tx.summary()
        src = self.src.dev
        frames = {k: rx[k] + tx[k] for k in ("sent", "delivered", "lost", "corrupted")}
        frames.update(duplicated=rx["duplicated"] + tx["duplicated"], rx=rx, tx=tx)
        return {
            "frontend": "builtin",
            "backend": self.backend,
            "ring": self.ring,
            "vring_base": self.vring_base_summary(),
            "migration": {"status": self.status, "rounds": len(self.snapshots),
                          "pages_copied": sum(s.pages_copied for s in self.snapshots),
                          "pages_mismatched": (int(self.pages_mismatched.size)
                                               if self.pages_mismatched is not None else None),
                          "per_round": [s.summary() for s in self.snapshots]},
            "vhost_log": {"pages_logged": src.pages_logged if src else 0,
                          "syncs": src.syncs if src else 0},
            # vhost_dev_stop on the source to vhost_dev_start done on the destination
            "downtime_ms": _ms(self.downtime_s),
            "total_time_ms": _ms(self.total_time_s),
            "frames": frames,
            "rarp_frames": self.rarp_frames,
            "problems": list(self.problems),
            "break_logging": self.break_logging,
            "integrity": "ok" if self.integrity_ok else "corrupted",
            "ops_called": list(self.ops_called),
        }

    def vring_base_summary(self) -> list[dict]:
        """GET_VRING_BASE's ``num`` per queue at the source's stop; for packed
        rings with its parts (bits 0-14 last_avail_idx, 15 its wrap counter,
        16-30 last_used_idx, 31 its wrap counter)."""
        out = []
        for index, num in sorted(self.vring_bases.items()):
            entry = {"queue": index, "num": num}
            if self.ring == "packed":
                entry.update(parse_packed_vring_base(num)._asdict())
            out.append(entry)
        return out

    def backend_offers_packed(self) -> bool:
        """Does this migration's back-end offer VIRTIO_F_RING_PACKED? Asks a
        back-end of the same kind (started and stopped here) in GET_FEATURES."""
        side = self._side("probe")
        try:
            side.server.start()
            ops = VhostOps(VhostUserChannel.connect(side.server.socket_path))
            try:
                return bool(ops.vhost_get_features() & Feature.VIRTIO_F_RING_PACKED)
            finally:
                ops.vhost_backend_cleanup()
        finally:
            side.server.stop()

    def close(self) -> None:
        """Close devices, guest RAM and back-ends; idempotent."""
        for side in (self.src, self.dst):
            if side.dev is not None:
                try:
                    side.dev.vhost_dev_cleanup()
                except Exception:
                    pass
        if self.guest is not None:
            self.guest.close(close_memory=False)
        for side in (self.src, self.dst):
            if side.memory is not None:
                side.memory.close()
            side.server.stop()
