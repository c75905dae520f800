"""What a lab's cells hold: a running device, a logging window, a live migration.

Each is the same on both front-ends; where a real QEMU and the built-in
front-end differ, it asks its :class:`~vhostlab.labkit.frontends.Frontend`.
``frontend`` is that front-end's name (``"qemu"`` or ``"builtin"``).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Sequence

from vhostlab.protocol import TO_BACKEND

from .base import RAM_SIZE, LabSetupError, wait_until

__all__ = ["LabDevice", "LoggingWindow", "LabMigration", "vring_view"]


def vring_view(guest, backend, queue: int, title: str | None = None):
    """The view of virtqueue ``queue`` of ``guest`` (the built-in guest or the QEMU guest
    driver) with ``backend``'s state beside it: ``vhostlab.viz.guestring.vring_view``,
    imported when first drawn so that opening a lab stays quick."""
    from vhostlab.viz.guestring import vring_view as view
    return view(guest, backend, queue, title)


class LabDevice:
    """A running virtio-net device: a back-end, a front-end, a guest driver.

    ``frontend`` ``"qemu"``: ``qemu`` is the QemuInstance, ``guest`` the qtest
    driver; ``"builtin"``: ``vhost_dev`` is the VhostDev (``ops`` its
    VhostOps), ``guest`` the built-in guest. ``backend`` is the BackendServer
    whose trace and state the views draw.
    """

    def __init__(self, frontend: Any, backend, guest, *, vhost_dev=None, qemu=None):
        self._frontend = frontend
        self.backend, self.guest = backend, guest
        self.vhost_dev, self.qemu = vhost_dev, qemu
        self.ops = vhost_dev.vhost_ops if vhost_dev is not None else None
        self.migration_sink = None      # qemu: where an open logging window's migration goes

    @property
    def frontend(self) -> str:
        """``"qemu"`` or ``"builtin"``: who plays QEMU's part."""
        return self._frontend.name

    def backend_trace(self) -> tuple:
        """Every message the back-end received and sent, oldest first."""
        return self.backend.trace.records()

    def requests(self) -> list[str]:
        """The names of the requests the back-end received, in order."""
        return [r.request for r in self.backend_trace() if r.direction == TO_BACKEND]

    def trace_view(self, limit: int = 0):
        """The back-end's message trace as a table (the ``limit`` latest rows; 0: all)."""
        from vhostlab.viz import TraceView
        return TraceView(self.backend, limit=limit)

    def vring_view(self, queue: int):
        """The view of virtqueue ``queue`` (see :func:`vring_view`)."""
        return vring_view(self.guest, self.backend, queue)

    def wire_frames(self) -> list[bytes]:
        """The frames the guest transmitted, as they reached the back-end's wire."""
        return list(self.backend.wire.captured)

    def wait_wire(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """Wait until ``count`` frames reached the wire; return what is there."""
        wait_until(lambda: len(self.backend.wire.captured) >= count, timeout)
        return self.wire_frames()

    def transmit(self, frames: Sequence[bytes]) -> None:
        """The guest transmits ``frames`` (and kicks the TX queue)."""
        self.guest.transmit(list(frames))

    def receive(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """Wait for ``count`` frames in the guest's RX buffers (fewer after ``timeout``);
        the buffers are posted again."""
        got: list[bytes] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and (left := deadline - time.monotonic()) > 0:
            got += self._frontend.receive(self.guest, left)
        return got

    def call_view(self, title: str | None = None):
        """The vhost.c calls with their messages: the built-in VhostDev's own timeline,
        or, for a real QEMU, the nesting inferred from the back-end's trace."""
        return self._frontend.call_view(self, title)

    def dirty_round(self, log=None):
        """A DirtyRound of the log as it is now (``log``, or the back-end's mapping of
        it), with the guest's rings and buffers as bands; nothing is cleared."""
        from vhostlab.dirtylog import DirtyRound
        if log is None:
            snap = self.backend.snapshot(trace=False).log
            bitmap = snap.bitmap if snap is not None else b""
        else:
            bitmap = log.snapshot().tobytes()
        bands = self._frontend.bands(self.guest)
        return DirtyRound.make(0, 0.0, RAM_SIZE // 4096, DirtyRound.bitmap_pages(bitmap), (),
                               bands, note="the log as it is now; no sync has cleared it")

    def logging_window(self, bandwidth: int = 16 << 10) -> "LoggingWindow":
        """Dirty logging on for the duration of a ``with`` block (see LoggingWindow)."""
        return LoggingWindow(self, bandwidth)

    def close(self) -> None:
        """Stop the built-in front-end's side (the lab stops QEMU and back-ends itself)."""
        if self.vhost_dev is not None:
            try:
                self.vhost_dev.vhost_dev_cleanup()
            finally:
                self.guest.close()


class LoggingWindow:
    """Dirty logging on while a ``with`` block runs; ``pages_logged``: what the back-end marked.

    ``qemu``: a migration into a socket that nobody reads
    (:class:`vhostlab.qemu.sink.MigrationSink`), at most ``bandwidth`` bytes/s,
    so QEMU runs ``vhost_log_global_start`` and keeps logging on, the VM
    running; cancelled at the end (``migrate_cancel``:
    ``vhost_log_global_stop``). ``builtin``: ``vhost_log_global_start`` and
    ``vhost_log_global_stop`` of the built-in VhostDev.
    """

    def __init__(self, device: LabDevice, bandwidth: int):
        self.device, self.bandwidth, self._base = device, bandwidth, 0

    def _snapshot(self):
        return self.device.backend.snapshot(trace=False)

    @property
    def pages_logged(self) -> int:
        return self._snapshot().counters["pages_logged"] - self._base

    def wait_logged(self, pages: int = 1, timeout: float = 10.0) -> bool:
        """Wait until the back-end has marked ``pages`` pages since the window opened."""
        return wait_until(lambda: self.pages_logged >= pages, timeout)

    def __enter__(self) -> "LoggingWindow":
        self._base = self._snapshot().counters["pages_logged"]
        self.device._frontend.logging_start(self.device, self.bandwidth)
        if not wait_until(lambda: self._snapshot().logging, 10.0):
            raise LabSetupError("the front-end did not turn dirty logging on within 10 s")
        return self

    def __exit__(self, *exc) -> None:
        self.device._frontend.logging_stop(self.device)
        wait_until(lambda: not self._snapshot().logging, 10.0)


class LabMigration:
    """A live migration run in a background thread, by a real QEMU or the built-in front-end.

    ``impl`` is the migration itself: ``vhostlab.qemu.QemuMigration`` (two
    QEMUs, each with its own back-end) or ``vhostlab.frontend.BuiltinMigration``
    (two back-ends, RAM copied between two memfds); the views read its rounds
    while it runs. ``summary()`` is the JSON summary both give (the one
    ``vhostlab demo --json`` prints): ``migration``, ``vhost_log``, ``frames``,
    ``integrity``, ``ops_called``. ``break_logging``: the back-ends skip logging.
    ``skip_final_sync``: vhost_log_put's final sync finds nothing (the built-in
    front-end leaves it out; with a real QEMU the source back-end discards its
    marks as the rings stop, see MigrationConfig). With a real QEMU the source
    back-end also writes ``RX_AT_STOP`` frames (vhostlab.labkit.frontends) as
    GET_VRING_BASE arrives, so the window that only the final sync covers is
    never empty.
    """

    def __init__(self, frontend: Any, break_logging: bool, skip_final_sync: bool = False,
                 backend: str = "vhostlab", ring: str = "split"):
        self._frontend = frontend
        self.break_logging, self.skip_final_sync = break_logging, skip_final_sync
        self.backend = backend
        self.thread: threading.Thread | None = None
        self._summary: dict | None = None
        self._error: BaseException | None = None
        self.impl = frontend.new_migration(break_logging, skip_final_sync, backend,
                                           **({"ring": ring} if ring != "split" else {}))

    @property
    def frontend(self) -> str:
        """``"qemu"`` or ``"builtin"``: who runs the migration."""
        return self._frontend.name

    def start(self) -> "LabMigration":
        """Start the migration in a background thread; returns at once."""
        self.thread = threading.Thread(target=self._run, name="vhostlab-lab-migration",
                                       daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            self._summary = self._frontend.migration_summary(self.impl.run())
        except BaseException as exc:  # handed to wait()
            self._error = exc

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait(self, timeout: float = 90.0) -> dict:
        """Wait for the end and return ``summary()``; raises what the run raised."""
        if self.thread is None:
            raise LabSetupError("call start() first")
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"the migration is still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self.summary()

    def summary(self) -> dict:
        if self._summary is None:
            raise LabSetupError("the migration has not finished")
        return self._summary

    def rounds(self) -> list:
        """The per-round snapshots so far (QEMU: one per dirty sync, or syncs, it saw)."""
        return self._frontend.migration_rounds(self.impl)

    def dirty_rounds(self) -> list:
        """One DirtyRound per sync of the dirty log, the last one vhost_log_put's."""
        return list(self.impl.dirty_rounds)

    def rings_at_switchover(self, side: str = "source") -> list:
        """The rings as the back-end saw them: on the source just before GET_VRING_BASE,
        on the destination after SET_VRING_BASE, by ring index: a VringAtSwitchover per
        split ring, a PackedRingAtSwitchover per packed one (``ring_format`` says which)."""
        return self.impl.switchover.taken(side)

    def call_view(self, side: str = "source", title: str | None = None):
        """The vhost.c calls of one side's front-end, with their messages (see LabDevice)."""
        return self._frontend.migration_call_view(self.impl, side,
                                                  title or f"{side}: calls and messages")

    def source_trace(self) -> tuple:
        """Every message the source's back-end received and sent."""
        return self._frontend.migration_trace(self.impl, "source")

    def destination_trace(self) -> tuple:
        """Every message the destination's back-end received and sent."""
        return self._frontend.migration_trace(self.impl, "destination")

    def requests(self, side: str = "source") -> list[str]:
        """The names of the requests the source (or destination) back-end received."""
        trace = self._frontend.migration_trace(self.impl, side)
        return [r.request for r in trace if r.direction == TO_BACKEND]

    def watch(self):
        """A live view of the run (timeline, rounds), redrawn until it ends."""
        from vhostlab.viz import watch_migration
        return watch_migration(self.impl, until=self.thread)

    def close(self) -> None:
        if self.thread is not None:
            self.thread.join(120)
        self.impl.close()
