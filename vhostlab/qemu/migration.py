"""Live migration between two real QEMUs, each with its own vhostlab back-end.

Theory of operation
-------------------
Two hosts (:class:`~.host.VhostUserHost`): the source QEMU runs the guest's
virtio-net (driven over qtest) against back-end A; the destination QEMU,
started with ``-incoming``, is connected to back-end B and waits. Both
back-ends serve from background threads of this process.

1. Warm-up: frames both ways on the source, read by the guest at once.
2. ``migrate``: the source QEMU runs vhost_log_global_start (SET_LOG_BASE,
   SET_FEATURES with VHOST_F_LOG_ALL, SET_VRING_ADDR with VHOST_VRING_F_LOG:
   the seed's steps 1 and 2) and copies RAM in rounds. Each round ends in a
   bitmap sync (``dirty-sync-count`` in query-migrate), which also reads and
   clears the vhost log (vhost_log_sync).
3. While QEMU copies, the guest stays busy: it rewrites a working set with
   random data and transmits frames (qtest writes, which QEMU tracks
   itself), and the back-end writes frames into the guest's RX buffers
   (which only the vhost log tells QEMU about). The guest does not read
   those RX frames on the source: they must arrive in the destination's
   RAM. ``max-bandwidth`` is tight and ``downtime-limit`` small, so QEMU
   cannot switch over while the guest is busy; after ``busy_syncs`` syncs
   a last RX burst lands (after QEMU copied those pages at least once) and
   the guest goes quiet, so the next rounds converge.
4. Switch-over: STOP on the source, vhost_dev_stop (GET_VRING_BASE per ring,
   then vhost_log_put's final sync: seed step 3), the last pages, RESUME on
   the destination, whose back-end gets SET_VRING_BASE.
5. Checks: the driver resumes on the destination's qtest; every RX frame
   the source back-end delivered is read from the destination's RAM at the
   addresses the used ring gives, byte for byte; every TX frame reached a
   back-end exactly once; the destination got in SET_VRING_BASE what the
   source returned from GET_VRING_BASE; then more frames both ways on the
   destination.

The orchestrator reads the vhost log and query-migrate every ``tick`` and
hands the readings to a :class:`~.rounds.RoundTracker`, which makes one
:class:`~.rounds.PrecopyRound` per round (a dirty-bitmap sync and what QEMU
sends until the next). The data (config, events, progress, result) is in
:mod:`.migration_model`; the checks on the destination in :mod:`.verify`.

Everything runs in one background thread (:meth:`QemuMigration.start`), so
a notebook cell stays responsive; :meth:`QemuMigration.progress` returns a
consistent immutable picture at any time, and ``on_progress`` receives
:class:`ProgressEvent` objects as things happen.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import replace
from typing import Callable

from vhostlab.dirtylog import DirtyRound
from vhostlab.errors import VhostlabError
from vhostlab.switchover import StopWindow, SwitchoverRecorder, frames_in_pages

from .errors import GuestDriverError, QemuError
from .host import VhostUserHost, ops_called, process_peak_rss
from .migration_model import (MigrationConfig, MigrationFailedError, MigrationProgress,
                              MigrationResult, ProgressEvent)
from .rounds import (GuestWrites, PrecopyRound, RoundTracker, frame_name, mismatched_pages,
                     qemu_bands)
from .traffic import FROM_GUEST, TO_GUEST, FrameLedger, GuestDirtier, is_rarp
from .verify import verify_destination

# The model's names stay importable from here, where the labs and tests take them.
__all__ = ["MigrationConfig", "PrecopyRound", "ProgressEvent", "MigrationProgress",
           "MigrationResult", "QemuMigration", "MigrationFailedError", "migrate"]

log = logging.getLogger("vhostlab.qemu")

DELIVERY_TIMEOUT = 5.0
RX_BUDGET = 200            # RX frames left unread during the migration (ring of 256)


class _Aborted(VhostlabError):
    """close() was called while the migration ran."""


class QemuMigration:
    """Migrate a guest between two QEMUs with vhostlab back-ends, traffic flowing both ways.

    ``run()`` does it all in the calling thread and returns a
    :class:`MigrationResult`; ``start()`` does it in a background thread
    (then ``wait()``). ``progress()`` is safe to call from any thread.
    ``on_progress`` is called (from the migration thread) with each
    :class:`ProgressEvent`. Everything started is stopped when the run ends
    (``keep=True`` keeps the hosts for inspection until ``close()``).
    """

    def __new__(cls, config: MigrationConfig | None = None, **kwargs):
        # MigrationConfig(backend="dpdk") gets the DPDK peers (.dpdk_side).
        if cls is QemuMigration and config is not None and config.backend == "dpdk":
            from .dpdk_side import QemuDpdkMigration
            cls = QemuDpdkMigration
        return super().__new__(cls)

    def __init__(self, config: MigrationConfig | None = None, *,
                 on_progress: Callable[[ProgressEvent], None] | None = None, keep: bool = False):
        self.config = config or MigrationConfig()
        self.on_progress = on_progress
        self.keep = keep
        self.result = MigrationResult(config=self.config)
        self.src: VhostUserHost | None = None
        self.dst: VhostUserHost | None = None
        self.rx = FrameLedger(TO_GUEST)
        self.tx = FrameLedger(FROM_GUEST)
        self._rng = random.Random(2020)
        self._lock = threading.Lock()
        self._phase = "not started"
        self.tracker = RoundTracker()           # read and changed under self._lock
        self._query: dict = {}
        self._t0 = self._t_migrate = 0.0
        self._abort = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._trace_seq = {"source": 0, "destination": 0}
        self._t_stop_seen: float | None = None
        self._rx_unread = 0                     # RX frames delivered, not read by the guest
        self.dirtier: GuestDirtier | None = None
        self._guest_state: dict | None = None
        self._pages_logged0 = 0                 # the source back-end's count when migrate began
        self._last_guest_action = 0.0           # time.time() after the last qtest action
        # For the views: one DirtyRound per round (and vhost_log_put's final sync),
        # the pages the guest wrote through qtest, the rings at the switch-over.
        self.dirty_rounds: list[DirtyRound] = []
        self.guest_writes = GuestWrites()
        self.switchover = SwitchoverRecorder()
        self.stop_window = StopWindow()

    # -- running -------------------------------------------------------------------
    def start(self) -> "QemuMigration":
        """Run in a background thread; returns at once."""
        if self._thread is not None:
            raise RuntimeError("this migration was already started")
        self._thread = threading.Thread(target=self.run, name="vhostlab-qemu-migration",
                                        daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> MigrationResult:
        """Wait for the background run; raises TimeoutError if it is still going."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the migration is still running after {timeout} s")
        return self.result

    def run(self) -> MigrationResult:
        """Every phase, in order. Returns the result; failures are in ``result.error``."""
        self._t0 = time.monotonic()
        try:
            self._setup()
            self._warm_up()
            self._migrate()
            self._verify()
            self._set_phase("done", "migration finished")
        except _Aborted:
            self.result.error = "aborted: close() was called"
            self._set_phase("failed", self.result.error)
        except Exception as exc:  # reported in the result; the hosts are closed below
            log.debug("migration failed", exc_info=True)
            self.result.error = f"{exc.__class__.__name__}: {exc}"
            self._set_phase("failed", self.result.error)
        finally:
            self._finish()
        return self.result

    def close(self) -> None:
        """Stop the run if it is going, and every QEMU and back-end. Idempotent."""
        self._abort.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.config.timeout + 30)
        for host in (self.src, self.dst):
            if host is not None:
                host.close()

    def __enter__(self) -> "QemuMigration":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- progress ----------------------------------------------------------------------
    def progress(self) -> MigrationProgress:
        """A consistent, immutable picture of the run so far."""
        with self._lock:
            q = self._query
            return MigrationProgress(
                phase=self._phase, status=q.get("status", "not started"),
                dirty_sync_count=int(q.get("ram", {}).get("dirty-sync-count", 0)),
                rounds=self.tracker.rounds, events=self._events(), last_query=dict(q),
                error=self.result.error, elapsed=time.monotonic() - self._t0 if self._t0 else 0.0,
                done=self._done.is_set())

    def _emit(self, kind: str, text: str, data: object = None) -> None:
        if self.on_progress is None:
            return
        try:
            self.on_progress(ProgressEvent(kind, text, data))
        except Exception:  # a broken view must not break the migration
            log.exception("on_progress callback failed")

    def _set_phase(self, phase: str, text: str) -> None:
        with self._lock:
            self._phase = phase
        self._emit("phase", text, phase)

    def _check_abort(self) -> None:
        if self._abort.is_set():
            raise _Aborted()

    def _events(self) -> tuple[dict, ...]:
        out = []
        for who, host in (("source", self.src), ("destination", self.dst)):
            try:
                events = host.qemu.qmp.events if host is not None else []
            except Exception:
                continue
            out += [{"qemu": who, "event": e.name, "timestamp": e.timestamp, "data": e.data}
                    for e in events]
        return tuple(sorted(out, key=lambda e: e["timestamp"]))

    def _new_messages(self) -> None:
        """Hand the back-ends' new trace records to ``on_progress``."""
        for who, host in (("source", self.src), ("destination", self.dst)):
            if host is None or not host.tracing:
                continue
            records = host.trace(since=self._trace_seq[who])
            if records:
                self._trace_seq[who] = records[-1].seq
                self._emit("messages", who, records)

    # -- phases ------------------------------------------------------------------------
    def _setup(self) -> None:
        c = self.config
        self._set_phase("starting", "starting two back-ends and two QEMUs")
        self.src = VhostUserHost("source", ram_size=c.ram_size, break_logging=c.break_logging,
                                 qemu=c.qemu, handlers=c.source_handlers).start()
        self.result.qemu_version = self.src.qemu.info.version_string
        self.dst = VhostUserHost("destination", ram_size=c.ram_size, incoming=True,
                                 qemu=c.qemu).start()
        self.switchover.install(self.src.server, "source")
        self.switchover.install(self.dst.server, "destination")
        self.stop_window = StopWindow(self._frames_at_stop if c.rx_at_stop else None,
                                      discard_marks=c.skip_final_sync).install(self.src.server)
        guest = self.src.init_guest()
        guest.qtest.on_write = self.guest_writes.record
        self.dirtier = GuestDirtier(guest, c.working_set, c.dirty_rate)
        self.dirtier.fill()
        guest.post_rx_buffers()
        self._new_messages()

    def _frames(self, ledger: FrameLedger, n: int) -> list[bytes]:
        return [ledger.make(self._rng.randint(60, 1514)) for _ in range(n)]

    def _frames_at_stop(self) -> list[bytes]:
        n = min(self.config.rx_at_stop, RX_BUDGET - self._rx_unread)
        return self._frames(self.rx, n) if n > 0 else []

    def _warm_up(self) -> None:
        n = self.config.warm_up_frames
        self._set_phase("warm-up", f"{n} frames each way before migrating; the guest reads them")
        self._exchange(self.src, n)

    def _exchange(self, host: VhostUserHost, n: int) -> None:
        """``n`` frames each way through ``host``; the guest reads its RX frames at once."""
        guest = host.guest
        base = host.counters()
        guest.transmit(self._frames(self.tx, n))
        host.server.inject(self._frames(self.rx, n))
        got, deadline = [], time.monotonic() + DELIVERY_TIMEOUT
        while len(got) < n and time.monotonic() < deadline:
            got += guest.receive(timeout=deadline - time.monotonic())
        for frame in got:
            self.rx.arrive(frame)
        host.server.wait_for(lambda s: s.counters["guest_tx_frames"] >= base["guest_tx_frames"] + n,
                             DELIVERY_TIMEOUT)
        self._take_wire(host)

    def _take_wire(self, host: VhostUserHost) -> None:
        for frame in host.wire.take():
            if is_rarp(frame):
                self.result.rarp_frames += 1
            else:
                self.tx.arrive(frame)

    def _migrate(self) -> None:
        c, qmp = self.config, self.src.qemu.qmp
        self._set_phase("migrating", "migrate: QEMU starts dirty logging and copies RAM in rounds")
        qmp.migrate_set_capabilities(events=True)
        qmp.migrate_set_parameters(max_bandwidth=c.max_bandwidth, downtime_limit=c.downtime_limit)
        self._pages_logged0 = self._pages_logged()
        self._t_migrate = time.monotonic()
        self.guest_writes.take()             # round 1 copies everything anyway
        qmp.migrate(c.destination_uri or self.dst.migration_uri)
        self._busy_rounds()
        self._set_phase("quiescing", "the guest goes quiet; QEMU converges and switches over")
        self._converge()
        self._set_phase("switch-over", "the source stopped; the destination runs")
        self._await_switch_over()

    def _poll(self) -> str:
        """Read the vhost log and query-migrate and hand both to the round tracker."""
        self._new_messages()
        bitmap = self._log_bitmap()
        q = self.src.qemu.qmp.query_migrate()
        at = time.monotonic() - self._t_migrate
        with self._lock:
            if bitmap is not None:
                self.tracker.log_read(bitmap)
            self._query = q
            opened = self.tracker.query_migrate(q, at)
        if opened is not None:
            self._dirty_round(opened, at)
            self._emit("round", f"dirty sync {opened.dirty_sync_count}", opened)
        return q.get("status", "none")

    def _log_bitmap(self):
        """The source's vhost log as it is now (None before SET_LOG_BASE)."""
        log = self.src.server.snapshot(trace=False).log
        return None if log is None else log.bitmap

    def _pages_logged(self) -> int:
        """How many page marks the source back-end has made so far."""
        return self.src.counters()["pages_logged"]

    def _dirty_round(self, snap: PrecopyRound, at: float) -> None:
        """The round's DirtyRound: the log pages the polls saw before this sync, and the
        pages the guest wrote through qtest meanwhile (QEMU's own bitmap)."""
        guest = self.src.guest
        dr = DirtyRound.make(len(self.dirty_rounds) + 1, at,
                             self.config.ram_size // 4096, snap.logged_pages(),
                             self.guest_writes.take(), qemu_bands(guest), note=snap.note)
        with self._lock:
            self.dirty_rounds.append(dr)

    def _final_dirty_round(self) -> None:
        """vhost_log_put's final sync as its own frame: the log as the back-end left it at
        GET_VRING_BASE; and the pages that differ at the destination, with their frames."""
        guest = self.src.guest
        log = self.switchover.final_log()
        skipped = self.config.skip_final_sync      # then the sync found the log emptied
        logged = DirtyRound.bitmap_pages(log.tobytes()) if log is not None and not skipped else ()
        a = guest.allocator
        bad = mismatched_pages(self.src.server, self.dst.server, a.start // 4096,
                               -(-a.next // 4096))
        rx = [r for r in self.switchover.taken("source") if r.index == 0]
        mem = self.src.server.device.memory
        frames = (frames_in_pages(rx[0], mem.read, bad, frame_name, guest.hdr_len)
                  if rx and bad.size else {})
        dr = DirtyRound.make(
            len(self.dirty_rounds) + 1, (self._t_stop_seen or time.monotonic()) - self._t_migrate,
            self.config.ram_size // 4096, logged, self.guest_writes.take(), qemu_bands(guest),
            final_sync=True, mismatched=[(int(p), frames.get(int(p), ())) for p in bad],
            note="vhost_dev_stop -> vhost_log_put(dev, true): the last sync, after "
                 "GET_VRING_BASE stopped the rings" + (
                     f"; it found nothing: the back-end discarded "
                     f"{len(self.stop_window.discarded)} marked pages (skip_final_sync)"
                     if skipped else ""))
        with self._lock:
            self.dirty_rounds.append(dr)

    def _check_status(self, status: str) -> None:
        if status in ("failed", "cancelled"):
            desc = self._query.get("error-desc", "no error-desc given")
            raise MigrationFailedError(f"migration {status}: {desc}")
        if time.monotonic() - self._t_migrate > self.config.timeout:
            self._cancel()
            raise MigrationFailedError(
                f"migration not finished after {self.config.timeout:g} s "
                f"(status {status}); cancelled")

    def _cancel(self) -> None:
        try:
            self.src.qemu.qmp.execute("migrate_cancel")
        except QemuError:
            pass

    def _guest_did(self, **what: int) -> None:
        with self._lock:
            self.tracker.guest_did(**what)

    def _busy_rounds(self) -> None:
        """Guest writes, TX and RX bursts, and polling, until ``busy_syncs`` syncs."""
        c = self.config
        next_burst = time.monotonic()
        while True:
            self._check_abort()
            status = self._poll()
            self._check_status(status)
            count = int(self._query.get("ram", {}).get("dirty-sync-count", 0))
            if status == "completed":
                return              # converged early; _verify accounts for what happened
            if status == "active" and count >= c.busy_syncs:
                break
            if not self._vm_running():
                return              # QEMU is switching over: a vCPU no longer acts
            self._guest_did(bytes_written=self.dirtier.catch_up())
            self._last_guest_action = time.time()
            if time.monotonic() >= next_burst and status == "active":
                self._burst()
                next_burst = time.monotonic() + c.burst_interval
            time.sleep(c.tick)
        # A last burst: RX frames into pages QEMU has copied at least once. Then quiet.
        if not self._vm_running():
            return
        self._burst()
        self._guest_did(bytes_written=self.dirtier.catch_up())
        self._last_guest_action = time.time()
        self._guest_state = self.src.guest.export_state()

    def _vm_running(self) -> bool:
        """Whether the source VM still runs. vm_stop sets the run state first, under
        the lock qtest commands also take, so a guest action that starts after this
        said True can still overlap the stop only by its own few milliseconds."""
        return self.src.qemu.qmp.query_status().get("status") == "running"

    def _burst(self) -> None:
        """TX and RX frames on the source; waits until its back-end has handled them,
        or until its rings stop (QEMU switched over in the meantime)."""
        c, host = self.config, self.src
        base, at_stop = host.counters(), self.stop_window.delivered
        sent_tx = len(host.guest.transmit(self._frames(self.tx, c.tx_burst)))
        self._last_guest_action = time.time()
        n_rx = min(c.rx_burst, RX_BUDGET - self._rx_unread)
        frames = self._frames(self.rx, n_rx) if n_rx > 0 else []
        if frames:
            host.server.inject(frames)

        def rx_done(s) -> int:
            # The stop window's frames (written at GET_VRING_BASE) are not this burst's.
            return (s.counters["guest_rx_frames"] - base["guest_rx_frames"]
                    - (self.stop_window.delivered - at_stop))

        def handled(s) -> bool:
            return (rx_done(s) >= len(frames)
                    and s.counters["guest_tx_frames"] >= base["guest_tx_frames"] + sent_tx)

        host.server.wait_for(lambda s: handled(s) or not all(
            v.started for v in s.vrings[:2]), DELIVERY_TIMEOUT)
        snap = host.server.snapshot(trace=False)
        delivered = rx_done(snap)
        self._rx_unread += delivered
        self._guest_did(rx_frames=delivered, tx_frames=sent_tx)
        if delivered < len(frames) and not snap.vrings[0].started:
            # The RX ring stopped first: the rest wait in the stopped back-end and never
            # reach the guest, as frames reaching a source host after the switch-over
            # do not. They were never in the guest's path: not counted as sent.
            self.rx.withdraw(frames[delivered:])
            self.result.notes.append(
                f"{len(frames) - delivered} of {len(frames)} RX frames of a burst reached "
                "the source back-end after its RX ring stopped (GET_VRING_BASE): never "
                "written into the guest, not counted as sent")
        elif not handled(snap):
            self.result.notes.append(
                f"the source back-end handled {delivered} of {len(frames)} RX frames (and "
                f"not all of {sent_tx} TX frames) within {DELIVERY_TIMEOUT:g} s")
        self._take_wire(host)

    def _converge(self) -> None:
        while True:
            self._check_abort()
            status = self._poll()
            self._check_status(status)
            if status == "completed":
                return
            time.sleep(self.config.tick)

    def _await_switch_over(self) -> None:
        src, dst = self.src.qemu.qmp, self.dst.qemu.qmp
        stop = src.wait_event("STOP", timeout=10)
        self._t_stop_seen = time.monotonic() - max(0.0, time.time() - stop.timestamp)
        resume = dst.wait_event("RESUME", timeout=30)
        self.dst.wait_started(DELIVERY_TIMEOUT)
        self._new_messages()
        self._emit("event", "STOP on the source, RESUME on the destination", (stop, resume))
        if stop.timestamp < self._last_guest_action:
            # The guest (this process) must act like a vCPU: nothing after STOP.
            # Both times are this host's wall clock (QMP timestamps are QEMU's).
            self.result.notes.append(
                f"the source stopped {self._last_guest_action - stop.timestamp:.3f} s before "
                "the guest's last action: that action may be lost (the guest stalled "
                "long enough for QEMU to converge while it was still busy)")

    def _verifying(self) -> None:
        """The start of the checks: the driver's state, and the final dirty-log frame."""
        self._set_phase("verifying", "the driver resumes on the destination; checking frames")
        if self._guest_state is None:      # converged before the guest went quiet
            self._guest_state = self.src.guest.export_state()
        try:                               # before the destination's guest writes anything
            self._final_dirty_round()
        except Exception as exc:  # the picture is extra; the checks below still run
            log.debug("no final dirty-log frame", exc_info=True)
            self.result.notes.append(f"no final dirty-log frame: {exc}")

    def _verify(self) -> None:
        self._verifying()
        self._take_wire(self.src)          # TX frames the source back-end took before the stop
        self._rx_unread += self.stop_window.delivered
        report = verify_destination(self.src, self.dst, self._guest_state, self.rx,
                                    expected_rx=self._rx_unread)
        self.result.verify = report
        self._emit("frames", "frames checked on the destination", report)
        self._set_phase("after", f"{self.config.after_frames} frames each way on the destination")
        try:
            self._exchange(self.dst, self.config.after_frames)
        except GuestDriverError as exc:
            report.driver_errors.append(f"after the switch-over: {exc.message}")
        self._take_wire(self.dst)

    def _finish(self) -> None:
        r = self.result
        try:
            self._new_messages()
            if self.src is not None and self.src.tracing:
                r.pages_logged = self._pages_logged() - self._pages_logged0
                r.ops_called = ops_called(self.src.trace(),
                                          self.dst.trace() if self.dst else ())
            with self._lock:
                r.final_query = dict(self._query)
                r.rounds = self.tracker.rounds
            r.status = self._query.get("status", "not started")
            r.events = self._events()
            r.to_guest, r.from_guest = self.rx.summary(), self.tx.summary()
            r.resources = self._resources()
        finally:
            r.wall_time = time.monotonic() - self._t0
            if not self.keep:
                for host in (self.src, self.dst):
                    if host is not None:
                        host.close()
            self._done.set()

    def _resources(self) -> dict:
        qemus = {h.name: h.qemu_peak_rss() for h in (self.src, self.dst) if h is not None}
        me = process_peak_rss()
        return {"qemu_peak_rss_bytes": qemus, "python_peak_rss_bytes": me,
                "total_peak_rss_bytes": sum(qemus.values()) + me}


def migrate(config: MigrationConfig | None = None, **kwargs) -> MigrationResult:
    """Run one migration in this thread: ``migrate(MigrationConfig(break_logging=True))``."""
    config = replace(config or MigrationConfig(), **kwargs)
    return QemuMigration(config).run()
