"""A real-QEMU migration between two DPDK back-ends, one per host.

Each host's QEMU connects to a recording relay (``vhostlab.backend.relay``)
in front of its own testpmd (``vhostlab.backend.dpdk``: a ``net_vhost0``
port in io forwarding, looped, so every frame the guest transmits comes back
into its RX buffers unchanged). The relay's trace holds every message, as a
vhostlab back-end's does, so the narration, ``ops_called`` and the
GET_VRING_BASE / SET_VRING_BASE check read it the same way.

What changes, against a back-end this process does not implement:

- Traffic. There is no injector and no wire: the guest transmits the kit's
  self-checking frames and DPDK writes them back into its RX buffers. During
  the migration the guest leaves them there, so DPDK's writes land in pages
  QEMU may have copied already; only the vhost log can tell QEMU. On the
  destination the resumed driver reads them from the destination's RAM, and
  the TX ledger checks each byte for byte (every frame is a TX frame; the
  "to guest" direction has none of its own).
- The log. The relay sees SET_LOG_BASE go by with its fd, and its observer
  (an ``ObservedDevice``) maps the same shared log QEMU and DPDK use: the
  round tracker reads it every tick, as it reads a vhostlab back-end's, and
  the log is copied once more as each GET_VRING_BASE reply passes (before
  QEMU gets it, so before vhost_log_put's final sync clears it). DPDK keeps
  no count of its marks that this process can read: ``pages_logged`` is the
  pages seen marked in those readings (a lower bound: a mark made after the
  last reading before a sync is cleared unseen).
- Guest RAM. The relay maps each side's SET_MEM_TABLE too, so the two RAMs
  can be compared page by page after the switch-over. The destination's
  copy is taken as each SET_VRING_KICK passes, before DPDK can run that
  ring: DPDK answers SEND_RARP by putting a RARP into the guest's RX ring
  (testpmd sends it back like any frame) as soon as the rings run, which
  would otherwise show as pages that differ.
- Breaking the log. DPDK cannot be told to skip logging. With
  ``break_logging`` the source relay removes VHOST_F_LOG_ALL from the
  SET_FEATURES QEMU sends, so DPDK never logs: a front-end and a back-end
  that disagree about logging, visible in the trace (the back-end's
  SET_FEATURES lacks the bit QEMU set). The frames DPDK writes after QEMU
  copied their pages then never reach the destination.
"""
from __future__ import annotations

import os
import time
import types

import numpy as np

from vhostlab.backend.dpdk import DpdkVhostBackend, dpdk_usable
from vhostlab.backend.observe import ObservedDevice
from vhostlab.backend.relay import VhostUserRelay, strip_log_all
from vhostlab.dirtylog import DirtyRound
from vhostlab.frontend.dpdk_side import DpdkSide
from vhostlab.protocol import TO_BACKEND, TO_FRONTEND, Message, Request
from vhostlab.protocol.features import Feature
from vhostlab.switchover import frames_in_pages

from .errors import GuestDriverError, QemuError
from .guest import RX_QUEUE
from .host import VhostUserHost, vring_bases
from .migration import RX_BUDGET, QemuMigration
from .rounds import frame_name, mismatched_pages, qemu_bands
from .traffic import GuestDirtier, is_rarp
from .verify import verify_destination

__all__ = ["RelayObserver", "DpdkHost", "QemuDpdkMigration", "UNAVAILABLE", "DpdkNotUsableError"]

ECHO_TIMEOUT = 10.0         # s for DPDK (SCHED_IDLE) to send frames back on a busy machine
LOG_ALL = int(Feature.VHOST_F_LOG_ALL)

#: What the summary cannot give with DPDK, and why.
UNAVAILABLE = {
    "rx_injection": "testpmd has no injector: every frame is a guest TX frame that DPDK "
                    "writes back into the guest's RX buffers (frames to_guest: none of "
                    "their own)",
    "wire": "no wire capture: a TX frame is checked when it comes back to the guest",
    "backend_counters": "DPDK's frame and log counters are not readable while it runs; "
                        "testpmd's totals are read as it stops (dpdk_totals)",
    "pages_logged_by_backend": "DPDK keeps no count of its log marks; pages_logged is the "
                               "pages the relay saw marked in the shared log (a lower bound)",
    "rx_at_stop": "frames written as the rings stop need the kit's back-end (StopWindow)",
}


class DpdkNotUsableError(QemuError):
    """There is no usable dpdk-testpmd here (says why)."""


class RelayObserver:
    """What a QEMU migration needs from the relay beyond the picture: the log as the
    rings stop, the destination's RAM before DPDK runs, and, asked to, a DPDK
    that never logs.

    ``device``: the relay's :class:`~vhostlab.backend.observe.ObservedDevice`,
    which maps guest RAM and the log from the fds QEMU sends; this observer
    reads them there and maps nothing of its own. It runs after the device
    has seen each message. ``log_at_stop``: a copy of the log as the last
    GET_VRING_BASE reply went by; ``frozen``: ``freeze_range`` (gpa, size) of
    RAM copied as the last SET_VRING_KICK went by; ``rewritten``: (value QEMU
    sent, value passed on) for each SET_FEATURES changed; ``errors``: the
    device's list, with what went wrong here. Runs in the relay's thread and
    never raises there (the relay must go on).
    """

    def __init__(self, device: ObservedDevice, drop_log_all: bool = False,
                 discard_at_stop: bool = False) -> None:
        self.device = device
        self.drop_log_all = drop_log_all
        self.discard_at_stop = discard_at_stop
        self.discarded: set[int] = set()
        self.log_at_stop: bytes | None = None
        self.rewritten: list[tuple[int, int]] = []
        self.freeze_range: tuple[int, int] | None = None
        self.frozen: bytes | None = None
        self.errors: list[str] = device.errors

    def __call__(self, direction: str, msg: Message, fds: list) -> None:
        try:
            self._observe(direction, msg)
        except Exception as exc:  # an observer's failure never stops the traffic
            self.errors.append(f"{msg.request.name}: {exc}")

    def _observe(self, direction: str, msg: Message) -> None:
        request, dev = msg.request, self.device
        if direction == TO_FRONTEND and request == Request.GET_VRING_BASE:
            with dev.lock:
                if dev.log is not None and not dev.log.closed:
                    # skip_final_sync, emulated as StopWindow does on the kit's
                    # back-end: DPDK's ring has stopped, QEMU has not got the reply
                    # yet; its marks are taken out of the log and thrown away.
                    if self.discard_at_stop:
                        self.discarded.update(int(p) for p in dev.log.sync())
                    self.log_at_stop = dev.log.snapshot().tobytes()
        elif direction == TO_BACKEND and request == Request.SET_VRING_KICK \
                and self.freeze_range is not None and dev.memory is not None:
            self.frozen = None              # DPDK cannot run this ring before it has the kick
            self.frozen = self.read_ram(*self.freeze_range)

    def rewrite(self, direction: str, msg: Message) -> bytes | None:
        """With ``drop_log_all``: SET_FEATURES without VHOST_F_LOG_ALL (the relay's
        ``strip_log_all``), each change kept in ``rewritten``."""
        out = strip_log_all(direction, msg) if self.drop_log_all and not msg.is_reply else None
        if out is not None:
            value = int(msg.payload.value)
            self.rewritten.append((value, value & ~LOG_ALL))
        return out

    def read_log(self) -> bytes | None:
        """The shared dirty log as it is now (None before SET_LOG_BASE)."""
        with self.device.lock:
            log = self.device.log
            return None if log is None or log.closed else log.snapshot().tobytes()

    def read_ram(self, gpa: int, n: int) -> bytes:
        """``n`` bytes of guest RAM at ``gpa`` (from ``frozen`` if it covers them)."""
        if self.frozen is not None and self.freeze_range is not None:
            start, size = self.freeze_range
            if start <= gpa and gpa + n <= start + size:
                return self.frozen[gpa - start:gpa - start + n]
        with self.device.lock:
            if self.device.memory is None:
                raise QemuError("no SET_MEM_TABLE went through the relay yet")
            return self.device.memory.read(gpa, n)


class _ObservedDpdkSide(DpdkSide):
    """A DpdkSide whose relay reports to a :class:`RelayObserver` (and lets it
    rewrite); testpmd's totals stay in ``totals`` after :meth:`stop`."""

    def __init__(self, name: str, watch: RelayObserver, switchover=None) -> None:
        super().__init__(name, switchover, device=watch.device)
        self.watch = watch
        self.read_ram = watch.read_ram
        self.totals = None

    def start(self) -> "_ObservedDpdkSide":
        try:
            self.dpdk = DpdkVhostBackend(os.path.join(self.workdir, "dpdk.sock"))
            self.relay = VhostUserRelay(self.socket_path, self.dpdk.socket_path, self.trace,
                                        observer=self._observe,
                                        rewrite=self.watch.rewrite).start()
        except BaseException:
            self.stop()
            raise
        return self

    def _observe(self, direction: str, msg: Message, fds: list) -> None:
        """The switch-over pictures (DpdkSide's observer), then the RelayObserver;
        a picture that fails never stops the traffic."""
        try:
            self.observer(direction, msg, fds)
        except Exception as exc:
            self.watch.errors.append(f"{msg.request.name}: switch-over picture: {exc}")
        self.watch(direction, msg, fds)

    def stop(self) -> None:
        dpdk = self.dpdk
        try:
            super().stop()
        finally:
            if dpdk is not None:
                self.totals = dpdk.totals


class DpdkHost(VhostUserHost):
    """A host whose back-end is DPDK's (testpmd) behind a recording relay.

    ``server`` is the :class:`~vhostlab.frontend.dpdk_side.DpdkSide`; ``trace()``
    reads its relay; ``observer`` maps what went through it. ``break_logging``:
    the relay hides VHOST_F_LOG_ALL from DPDK.
    """

    def __init__(self, name: str, *, switchover=None, discard_at_stop: bool = False,
                 **kwargs) -> None:
        super().__init__(name, **kwargs)
        self.observer = RelayObserver(ObservedDevice("dpdk"), drop_log_all=self.break_logging,
                                      discard_at_stop=discard_at_stop)
        self.switchover = switchover
        self.totals = None

    @property
    def socket_path(self) -> str:
        return self.server.socket_path

    def start_backend(self):
        ok, why = dpdk_usable()
        if not ok:
            raise DpdkNotUsableError(why)
        self._own.server = _ObservedDpdkSide(self.name, self.observer,
                                             self.switchover).start()
        return self._own.server

    def counters(self) -> dict:
        raise QemuError(f"{self.name}: DPDK's counters are not readable while it runs")

    def wait_started(self, timeout: float) -> bool:
        """Wait until QEMU has given DPDK every ring (a SET_VRING_KICK for each
        SET_VRING_BASE on the last connection)."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.trace()
            last = max((r.connection for r in records), default=0)
            mine = [r for r in records if r.connection == last]
            based = set(vring_bases(mine, "SET_VRING_BASE"))
            kicked = {int((r.fields.get("payload") or {}).get("value", -1)) & 0xFF
                      for r in mine if r.request == "SET_VRING_KICK"
                      and r.direction == TO_BACKEND}
            if based and based <= kicked:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def close(self) -> None:
        """Stop QEMU, the relay and testpmd (whose totals stay in ``totals``)."""
        side = self._own.server
        super().close()
        if side is not None and self.totals is None:
            self.totals = side.totals


class QemuDpdkMigration(QemuMigration):
    """:class:`~.migration.QemuMigration` between two DPDK back-ends
    (``MigrationConfig(backend="dpdk")`` makes one). Same phases, progress,
    result; the traffic, the log and the checks read as the module says."""

    def _setup(self) -> None:
        c = self.config
        self._set_phase("starting", "starting two DPDK back-ends (testpmd, each behind a "
                                    "relay) and two QEMUs")
        self.result.unavailable = dict(UNAVAILABLE)
        self.src = DpdkHost("source", ram_size=c.ram_size, break_logging=c.break_logging,
                            qemu=c.qemu, switchover=self.switchover,
                            discard_at_stop=c.skip_final_sync).start()
        self.stop_window.discarded = self.src.observer.discarded   # the same set
        self.result.qemu_version = self.src.qemu.info.version_string
        self.dst = DpdkHost("destination", ram_size=c.ram_size, incoming=True,
                            qemu=c.qemu, switchover=self.switchover).start()
        guest = self.src.init_guest()
        guest.qtest.on_write = self.guest_writes.record
        self.dirtier = GuestDirtier(guest, c.working_set, c.dirty_rate)
        self.dirtier.fill()
        guest.post_rx_buffers()
        a = guest.allocator
        self.dst.observer.freeze_range = (a.start, -(-a.next // 4096) * 4096 - a.start)
        self._new_messages()

    # -- traffic: the guest transmits, DPDK sends every frame back -------------------
    def _warm_up(self) -> None:
        n = self.config.warm_up_frames
        self._set_phase("warm-up", f"{n} frames out to DPDK and back before migrating; the "
                                   "guest reads them")
        self._exchange(self.src, n)

    def _arrived(self, frames: list[bytes]) -> int:
        """Check frames the guest read; returns how many were not RARPs."""
        n = 0
        for frame in frames:
            if is_rarp(frame):
                self.result.rarp_frames += 1        # DPDK's answer to SEND_RARP
            else:
                self.tx.arrive(frame)
                n += 1
        return n

    def _exchange(self, host: DpdkHost, n: int) -> None:
        """``n`` frames out and back through ``host``'s DPDK; the guest reads them at once."""
        guest = host.guest
        sent = len(guest.transmit(self._frames(self.tx, n)))
        back, deadline = 0, time.monotonic() + ECHO_TIMEOUT
        while back < sent and time.monotonic() < deadline:
            back += self._arrived(guest.receive(timeout=deadline - time.monotonic()))
        if back < sent:
            self.result.notes.append(f"{host.name}: DPDK sent back {back} of {sent} frames "
                                     f"within {ECHO_TIMEOUT:g} s")

    def _take_wire(self, host) -> None:
        """No wire: frames are checked as they come back to the guest."""

    def _burst(self) -> None:
        """Frames out on the source; wait until DPDK wrote them into RX buffers, which
        the guest leaves unread (up to RX_BUDGET of them)."""
        c, guest = self.config, self.src.guest
        n = min(max(c.tx_burst, c.rx_burst), RX_BUDGET - self._rx_unread)
        if n <= 0:
            return
        sent = len(guest.transmit(self._frames(self.tx, n)))
        ready = guest.wait_used(RX_QUEUE, self._rx_unread + sent, ECHO_TIMEOUT)
        delivered = max(0, ready - self._rx_unread)
        self._rx_unread += delivered
        self._guest_did(rx_frames=delivered, tx_frames=sent)
        if delivered < sent:
            self.result.notes.append(f"the source DPDK wrote back {delivered} of {sent} "
                                     f"frames within {ECHO_TIMEOUT:g} s")

    # -- the log, read through the relay -----------------------------------------------
    def _log_bitmap(self):
        return self.src.observer.read_log()

    def _pages_logged(self) -> int:
        with self._lock:
            seen = sum(r.pages_logged for r in self.tracker.rounds)
        final = self.src.observer.log_at_stop
        if final is not None and self._t_stop_seen is not None:
            seen += int(np.bitwise_count(np.frombuffer(final, np.uint8)).sum())
        return seen

    def _final_dirty_round(self) -> None:
        """vhost_log_put's final sync: the log as the last GET_VRING_BASE reply found
        it; the pages that differ between the two RAMs, with the frames in them."""
        guest = self.src.guest
        final = self.src.observer.log_at_stop
        logged = DirtyRound.bitmap_pages(final) if final is not None else ()
        a = guest.allocator
        bad = mismatched_pages(self.src.server, self.dst.server, a.start // 4096,
                               -(-a.next // 4096))
        frames = {}
        if bad.size:
            r = guest.ring_state(RX_QUEUE)         # the source's RAM, as DPDK left it
            ring = types.SimpleNamespace(num=len(r.desc), used_idx=r.used_idx,
                                         used_ring=r.used_ring, desc=r.desc, kind="RX",
                                         ring_format="split")
            frames = frames_in_pages(ring, self.src.observer.read_ram, bad, frame_name,
                                     guest.hdr_len)
        dr = DirtyRound.make(
            len(self.dirty_rounds) + 1, (self._t_stop_seen or time.monotonic()) - self._t_migrate,
            self.config.ram_size // 4096, logged, self.guest_writes.take(), qemu_bands(guest),
            final_sync=True, mismatched=[(int(p), frames.get(int(p), ())) for p in bad],
            note="vhost_dev_stop -> vhost_log_put(dev, true): the last sync, after "
                 "GET_VRING_BASE stopped the rings (the log as the relay copied it then)")
        with self._lock:
            self.dirty_rounds.append(dr)

    # -- the checks on the destination ---------------------------------------------------
    def _verify(self) -> None:
        self._verifying()
        expected = self._rx_unread
        try:    # what DPDK wrote on the source and the guest did not read: its used ring
            ring = self.src.guest.ring_state(RX_QUEUE)
            expected = (ring.used_idx - ring.last_used_idx) & 0xFFFF
        except (GuestDriverError, QemuError) as exc:
            self.result.notes.append(f"the source's RX ring could not be read: {exc}")
        if expected != self._rx_unread:
            self.result.notes.append(f"the source's RX used ring holds {expected} unread "
                                     f"frames; the bursts counted {self._rx_unread}")
        report = verify_destination(self.src, self.dst, self._guest_state, self.tx,
                                    expected_rx=expected, skip_rarp=True)
        self.result.rarp_frames += report.rarp_frames
        self.result.verify = report
        self._emit("frames", "frames checked on the destination", report)
        self._set_phase("after", f"{self.config.after_frames} frames out and back on the "
                                 "destination")
        try:
            self._exchange(self.dst, self.config.after_frames)
        except GuestDriverError as exc:
            report.driver_errors.append(f"after the switch-over: {exc.message}")

    def _read_totals(self) -> None:
        for host in (self.src, self.dst):
            if host is not None and host.totals is not None:
                t = host.totals
                self.result.dpdk_totals[host.name] = {
                    "rx_packets": t.rx_packets, "tx_packets": t.tx_packets,
                    "tx_dropped": t.tx_dropped}

    def close(self) -> None:
        super().close()
        self._read_totals()             # with keep=True, testpmd stops only here

    def _finish(self) -> None:
        try:
            super()._finish()
        finally:
            r = self.result
            self._read_totals()
            for host in (self.src, self.dst):
                for text in (host.observer.errors if host is not None else ()):
                    r.notes.append(f"the {host.name} relay's observer: {text}")
            rewritten = self.src.observer.rewritten if self.src is not None else []
            for sent, passed in rewritten:
                r.notes.append(f"break_logging: the source relay passed SET_FEATURES "
                               f"{sent:#x} on as {passed:#x} (VHOST_F_LOG_ALL removed): "
                               "DPDK never logged")
