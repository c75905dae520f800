"""Set-up for the lab notebooks: who plays QEMU's part, and cleaning up after.

A lab notebook begins with::

    from vhostlab import labkit
    lab = labkit.open_lab("04_virtqueues")

``open_lab`` picks the front-end that plays QEMU's part: a real
``qemu-system-x86_64`` when one is installed, else the kit's built-in Python
front-end. The rule is doctor's ``choose_frontend`` (vhostlab/doctor.py), so
the notebooks and ``vhostlab doctor`` always agree; the environment variable
``VHOSTLAB_FRONTEND=qemu|builtin|auto`` overrides it.

The lab starts what the cells need and keeps the plumbing out of them:
``lab.start_backend()`` (the vhost-user-net back-end, in a thread of this
kernel), ``lab.connect_ops(backend)`` (the built-in ``VhostOps``, one op per
call), ``lab.builtin_guest()`` (memfd guest RAM and a virtio-net driver),
``lab.start_device()`` (a back-end with a front-end attached, the device at
DRIVER_OK), ``lab.migration()`` (a live migration by the lab's front-end).

Everything started through ``lab`` is registered with it and stopped, newest
first, by ``lab.close()``, which each notebook's last code cell calls, and by
``atexit`` when the kernel shuts down. Running the first cell again closes the
previous lab first, so re-running a notebook never leaves a second copy of
anything behind. Waiting on the back-end's thread sleeps (``wait_until``);
nothing here spins.
"""
from __future__ import annotations

from .errors import VhostlabError

import atexit
import html
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from vhostlab import doctor
from vhostlab.protocol import TO_BACKEND

__all__ = [
    "FRONTENDS", "RAM_SIZE", "LabSetupError", "Lab", "LabDevice", "LoggingWindow",
    "LabMigration", "OpReference", "TxRing", "choose_frontend", "open_lab",
    "child_processes", "wait_until", "vring_view", "llvm_ir",
]

#: The values VHOSTLAB_FRONTEND may take.
FRONTENDS = ("auto", "qemu", "builtin")
#: Guest RAM of every lab guest (QEMU's -m): small enough for Binder's 2 GB.
RAM_SIZE = 128 << 20
RX_AT_STOP = 8            # RX frames a real QEMU's source back-end writes as its rings stop
#: Process-wide helper threads that rightly outlive a lab: the QEMU launcher
#: forks every QEMU from one sleeping thread, so that PR_SET_PDEATHSIG ties
#: each QEMU to this process (the kernel ties that signal to the forking thread).
_PROCESS_THREADS = ("vhostlab-qemu-spawner",)


class LabSetupError(VhostlabError, RuntimeError):
    """The lab cannot be set up as asked (a bad VHOSTLAB_FRONTEND, QEMU missing, lab closed)."""


def choose_frontend() -> str:
    """Return ``"qemu"`` or ``"builtin"``: who plays QEMU's part in the labs.

    VHOSTLAB_FRONTEND (``auto`` when unset) is checked here so that a typo is
    a clear error instead of a silent fallback; the choice itself is doctor's
    ``choose_frontend``. Raises LabSetupError for an unknown value, or for
    ``qemu`` when no QEMU is installed.
    """
    forced = os.environ.get("VHOSTLAB_FRONTEND") or "auto"
    if forced not in FRONTENDS:
        raise LabSetupError(f"VHOSTLAB_FRONTEND={forced!r}: expected one of {', '.join(FRONTENDS)}")
    qemu = doctor.qemu_info()
    if forced == "qemu" and not (qemu and qemu.get("version")):
        raise LabSetupError(
            "VHOSTLAB_FRONTEND=qemu but no working qemu-system-x86_64 was found "
            f"(install it: {doctor.APT_QEMU}, or set VHOSTLAB_FRONTEND=builtin)")
    return doctor.choose_frontend(qemu)


def child_processes(pid: int | None = None) -> list[int]:
    """Pids of the live (not zombie) children of ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    children = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace").rsplit(")", 1)[-1].split()
        except (OSError, ValueError):
            continue  # not a process, or it exited while we looked
        if len(stat) > 1 and stat[1] == str(pid) and stat[0] != "Z":
            children.append(int(entry))
    return sorted(children)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0,
               interval: float = 0.01) -> bool:
    """Sleep in short steps until ``predicate()`` is true; False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(interval, left))
    return True


def vring_view(guest, backend, queue: int, title: str | None = None):
    """The view of virtqueue ``queue``: the ring as guest memory holds it now, and
    the back-end's own state (``last_avail_idx``, errors) beside it.

    ``guest`` is the built-in guest or the QEMU guest driver (which reads the
    ring over qtest); both are read afresh at every display.
    """
    from vhostlab.viz import VirtqueueView
    if hasattr(guest, "ring_state"):                     # the QEMU guest driver
        def ring():
            return guest.ring_state(queue)
    else:
        from vhostlab.ring import vring_views
        q = guest.queues[queue]

        def ring():        # guest memory, and what only the driver knows
            return {"views": vring_views(guest.memory, q.num, q.desc, q.avail, q.used),
                    "last_used_idx": q.last_used_idx, "in_flight": tuple(q.inflight),
                    "gpas": {"desc": q.desc, "avail": q.avail, "used": q.used}}

    def state():
        return backend.snapshot(trace=False).vrings[queue]
    kind = "RX" if queue % 2 == 0 else "TX"
    return VirtqueueView(ring, state=state, title=title or f"queue {queue} ({kind})")


def llvm_ir(kernel) -> str:
    """The LLVM IR numba generates for ``kernel`` (a numba dispatcher called at least once).

    numba cannot show the IR of code it loaded from its on-disk cache, so the
    same Python source is compiled once more, uncached, for the signatures the
    kernel was called with (a second or two for a ring kernel).
    """
    import numba
    fresh = numba.njit(nogil=True)(kernel.py_func)
    for sig in kernel.signatures:
        fresh.compile(sig)
    return "\n".join(fresh.inspect_llvm(sig) for sig in fresh.signatures)


@dataclass
class _Owned:
    label: str
    stop: Callable[[], Any]
    alive: Callable[[], bool] | None


@dataclass(repr=False)
class Lab:
    """One notebook's set-up: the chosen front-end and everything it started.

    ``name``: the notebook; ``frontend``: ``"qemu"`` or ``"builtin"``;
    ``qemu``: doctor's QEMU info or None; ``workdir``: a private 0700
    directory for sockets, removed by ``close()``.
    """

    name: str
    frontend: str
    qemu: dict | None
    workdir: str
    _threads_before: set = field(default_factory=set)
    _owned: list = field(default_factory=list)
    _closed: bool = False
    _counter: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- ownership ---------------------------------------------------------------
    def own(self, obj: Any, stop: Callable[[], Any], label: str,
            alive: Callable[[], bool] | None = None) -> Any:
        """Register ``obj`` so that ``close()`` calls ``stop()``; returns ``obj``."""
        with self._lock:
            self._owned.append(_Owned(label, stop, alive))
        return obj

    def _label(self, kind: str) -> str:
        with self._lock:
            if self._closed:
                raise LabSetupError(f"lab {self.name} is closed; run its first cell again")
            self._counter += 1
            return f"{kind}-{self._counter}"

    def path(self, name: str) -> str:
        """A path inside the lab's private directory (for a unix socket)."""
        return os.path.join(self.workdir, name)

    def running(self) -> list[str]:
        """Labels of the registered things that are still alive."""
        return [item.label for item in list(self._owned) if item.alive and item.alive()]

    def _our_threads(self) -> list[threading.Thread]:
        return [t for t in threading.enumerate()
                if t.ident not in self._threads_before and t.is_alive()
                and t is not threading.current_thread() and not _is_kernel_thread(t)]

    def leftovers(self) -> list[str]:
        """What this lab started that still runs: threads, child processes, owned things,
        its directory. A notebook's last cell asserts it is empty after ``close()``."""
        left = [f"thread {t.name}" for t in self._our_threads()]
        left += [f"child process {pid}" for pid in child_processes()]
        left += self.running()
        return left + ([f"directory {self.workdir}"] if os.path.exists(self.workdir) else [])

    def close(self, timeout: float = 10.0) -> list[str]:
        """Stop everything registered, newest first; return the errors met, as text.

        Safe to call twice. Waits up to ``timeout`` s for child processes and
        threads to end, then removes the private directory.
        """
        with self._lock:
            items, self._owned, self._closed = list(reversed(self._owned)), [], True
        errors = []
        for item in items:
            try:
                item.stop()
            except Exception as exc:  # keep stopping the rest
                errors.append(f"{item.label}: {exc.__class__.__name__}: {exc}")
        wait_until(lambda: not child_processes() and not self._our_threads(), timeout, 0.02)
        shutil.rmtree(self.workdir, ignore_errors=True)
        return errors

    # -- what the cells start ----------------------------------------------------
    def start_backend(self, *, break_logging: bool = False, queue_pairs: int = 1):
        """Start a vhost-user-net back-end (``BackendServer``) in a thread of this kernel.

        The frames the guest transmits are kept on its wire
        (``backend.wire.captured``). ``break_logging``: skip dirty logging.
        """
        from vhostlab.backend import BackendServer
        from vhostlab.frontend import CaptureWire
        label = self._label("backend")
        server = BackendServer(self.path(f"{label}.sock"), queue_pairs=queue_pairs,
                               wire=CaptureWire(), break_logging=break_logging)
        server.start()
        return self.own(server, server.stop, label, alive=lambda: server.running)

    def connect_ops(self, backend, *, handshake: bool = False):
        """The built-in front-end's ``VhostOps``, connected to ``backend``'s socket.

        ``handshake``: first do what ``vhost_dev_init()`` does before the rings
        (``vhost_backend_init``, ``vhost_set_owner``, ``vhost_get_features``).
        """
        from vhostlab.frontend import VhostOps
        label = self._label("vhost-ops")
        ops = self.own(VhostOps.connect(backend.socket_path), lambda: ops.channel.close(), label)
        if handshake:
            ops.vhost_backend_init()
            ops.vhost_set_owner()
            ops.vhost_get_features()
        return ops

    def builtin_guest(self, ram_size: int = RAM_SIZE, queue_size: int = 256):
        """The built-in guest: memfd RAM in QEMU's pc regions and a virtio-net driver."""
        from vhostlab.frontend import BuiltinVirtioNetGuest
        label = self._label("guest")
        guest = BuiltinVirtioNetGuest(ram_size=ram_size, queue_size=queue_size)
        return self.own(guest, guest.close, label)

    def start_device(self, *, frontend: str | None = None, break_logging: bool = False,
                     rx_buffers: int = 64) -> "LabDevice":
        """A new back-end with a front-end attached and the device started.

        ``frontend`` (default: the lab's) ``qemu``: QEMU connects to the
        back-end and the guest driver (over qtest) brings virtio-net to
        DRIVER_OK, whereupon QEMU runs ``vhost_dev_start``; ``builtin``:
        ``vhost_dev_init`` and ``vhost_net_start`` of the built-in front-end.
        Then the guest posts ``rx_buffers`` receive buffers.
        """
        frontend = frontend or self.frontend
        if frontend not in ("qemu", "builtin"):
            raise LabSetupError(f"frontend={frontend!r}: expected 'qemu' or 'builtin'")
        backend = self.start_backend(break_logging=break_logging)
        label = self._label(frontend)
        if frontend == "qemu":
            from vhostlab.qemu import QemuInstance, vhost_user_netdev
            qemu = QemuInstance(vhost_user_netdev(backend.socket_path), ram_size=RAM_SIZE,
                                name=label)
            self.own(qemu, qemu.close, label, alive=qemu.alive)
            device = LabDevice("qemu", backend, qemu.start().guest(), qemu=qemu)
        else:
            from vhostlab.frontend import BuiltinVirtioNetGuest, VhostDev, VhostOps
            vhost_dev = VhostDev(VhostOps.connect(backend.socket_path))
            guest = BuiltinVirtioNetGuest(ram_size=RAM_SIZE)
            device = self.own(LabDevice("builtin", backend, guest, vhost_dev=vhost_dev),
                              lambda: device.close(), label)
            vhost_dev.vhost_dev_init()
            guest.negotiate(vhost_dev.features)
            vhost_dev.vhost_net_start(guest)
        if rx_buffers:
            device.guest.post_rx_buffers(rx_buffers)
        return device

    def migration(self, *, break_logging: bool = False,
                  skip_final_sync: bool = False) -> "LabMigration":
        """A live migration by the lab's front-end (call ``start()``); see LabMigration."""
        label = self._label("migration")
        mig = LabMigration(self.frontend, break_logging, skip_final_sync)
        return self.own(mig, mig.close, label, alive=mig.running)

    def new_log(self, memory):
        """A zeroed dirty log in a memfd, sized for ``memory`` (QEMU's vhost_log_alloc)."""
        from vhostlab.dirtylog import DirtyLog
        label = self._label("dirty-log")
        log = DirtyLog.allocate(memory)
        return self.own(log, log.close, label)

    def op_reference(self, ops, backend) -> "OpReference":
        """A recorder of what each VhostOps call did (lab 08)."""
        return OpReference(ops, backend)

    def qemu_stepper(self, **kwargs: Any) -> Any:
        """A real QEMU stepped one guest or QMP action at a time (lab 08).

        Returns a ``vhostlab.qemu.stepper.QemuStepper`` the lab owns (closed
        with the lab), or None on the built-in front-end: there is no QEMU.
        """
        if self.frontend != "qemu":
            return None
        from vhostlab.qemu.stepper import QemuStepper
        from vhostlab.viz import CallTimelineView
        kwargs.setdefault("qemu", (self.qemu or {}).get("path"))
        stepper = QemuStepper(timeline_view=CallTimelineView, **kwargs)
        return self.own(stepper, stepper.close, self._label("qemu-stepper"),
                        alive=stepper.alive)

    def tx_ring(self, frames: int = 256, frame_bytes: int = 64, hdr_len: int = 12) -> "TxRing":
        """A TX virtqueue in its own guest memory, full of ``frames`` frames (lab 05)."""
        label = self._label("tx-ring")
        ring = TxRing(frames, frame_bytes, hdr_len)
        return self.own(ring, ring.close, label)

    @property
    def qemu_version(self) -> tuple[int, ...] | None:
        """The real QEMU's version as numbers, e.g. (7, 2, 0); None for the built-in front-end."""
        import re
        if self.frontend != "qemu" or not self.qemu:
            return None
        found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(self.qemu.get("version") or ""))
        return tuple(int(x) for x in found.groups() if x is not None) if found else None

    # -- display -----------------------------------------------------------------
    def describe(self) -> str:
        """One sentence: who plays QEMU's part here, and why."""
        forced = os.environ.get("VHOSTLAB_FRONTEND") or "auto"
        who = (f"a real QEMU ({self.qemu['path']}, version {self.qemu['version']})"
               if self.frontend == "qemu" else "the built-in Python front-end (vhostlab.frontend)")
        why = "chosen automatically" if forced == "auto" else f"forced by VHOSTLAB_FRONTEND={forced}"
        return f"Lab {self.name}: QEMU's part is played by {who}, {why}."

    def _repr_html_(self) -> str:
        return f"<p><b>vhostlab</b>: {html.escape(self.describe())}</p>"

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


class LabDevice:
    """A running virtio-net device: a back-end, a front-end, a guest driver.

    ``frontend`` ``"qemu"``: ``qemu`` is the QemuInstance, ``guest`` the qtest
    driver; ``"builtin"``: ``vhost_dev`` is the VhostDev (``ops`` its
    VhostOps), ``guest`` the built-in guest. ``backend`` is the BackendServer
    whose trace and state the views draw.
    """

    def __init__(self, frontend: str, backend, guest, *, vhost_dev=None, qemu=None):
        self.frontend, self.backend, self.guest = frontend, backend, guest
        self.vhost_dev, self.qemu = vhost_dev, qemu
        self.ops = vhost_dev.vhost_ops if vhost_dev is not None else None

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
            if self.frontend == "qemu":
                got += self.guest.receive(timeout=left)
                continue
            frames = self.guest.receive()
            if frames:
                self.guest.post_rx_buffers(len(frames))
                got += frames
            else:
                self.guest.wait_call(0, left)     # sleeps on the call eventfd
        return got

    def call_view(self, title: str | None = None):
        """The vhost.c calls with their messages: the built-in VhostDev's own timeline,
        or, for a real QEMU, the nesting inferred from the back-end's trace."""
        from vhostlab.viz import CallTimelineView
        if self.vhost_dev is not None:
            return CallTimelineView(self.vhost_dev, title=title or "Calls and messages")
        return CallTimelineView.inferred(self.backend_trace(), title=title or
                                         "Calls and messages (inferred from the trace)")

    def dirty_round(self, log=None):
        """A DirtyRound of the log as it is now (``log``, or the back-end's mapping of
        it), with the guest's rings and buffers as bands; nothing is cleared."""
        from vhostlab.dirtylog import DirtyRound
        if log is None:
            snap = self.backend.snapshot(trace=False).log
            bitmap = snap.bitmap if snap is not None else b""
        else:
            bitmap = log.snapshot().tobytes()
        if self.frontend == "qemu":
            from vhostlab.qemu.rounds import qemu_bands
            bands = qemu_bands(self.guest)
        else:
            from vhostlab.frontend.migration import builtin_bands
            bands = builtin_bands(self.guest)
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

    ``qemu``: a migration into a sink (``exec:cat > /dev/null``) slowed to
    ``bandwidth`` bytes/s, so QEMU runs ``vhost_log_global_start`` and keeps
    logging on; cancelled at the end (``migrate_cancel``:
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
        dev = self.device
        self._base = self._snapshot().counters["pages_logged"]
        if dev.frontend == "qemu":
            dev.qemu.qmp.migrate_set_parameters(max_bandwidth=self.bandwidth)
            dev.qemu.qmp.migrate("exec:cat > /dev/null")
        else:
            dev.vhost_dev.vhost_log_global_start()
        if not wait_until(lambda: self._snapshot().logging, 10.0):
            raise LabSetupError("the front-end did not turn dirty logging on within 10 s")
        return self

    def __exit__(self, *exc) -> None:
        dev = self.device
        if dev.frontend == "qemu":
            dev.qemu.qmp.execute("migrate_cancel")
            wait_until(lambda: dev.qemu.qmp.query_migrate().get("status")
                       in ("cancelled", "completed", "failed"), 10.0, 0.05)
        else:
            dev.vhost_dev.vhost_log_global_stop()
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
    back-end also writes RX_AT_STOP frames as GET_VRING_BASE arrives, so the
    window that only the final sync covers is never empty.
    """

    def __init__(self, frontend: str, break_logging: bool, skip_final_sync: bool = False):
        self.frontend, self.break_logging = frontend, break_logging
        self.skip_final_sync = skip_final_sync
        self.thread: threading.Thread | None = None
        self._summary: dict | None = None
        self._error: BaseException | None = None
        if frontend == "qemu":
            from vhostlab.qemu.migration import MigrationConfig, QemuMigration
            config = MigrationConfig(ram_size=RAM_SIZE, break_logging=break_logging,
                                     rx_at_stop=RX_AT_STOP, skip_final_sync=skip_final_sync)
            self.impl = QemuMigration(config, keep=True)   # keep: traces stay readable
        else:
            from vhostlab.frontend import BuiltinMigration
            self.impl = BuiltinMigration(ram_size=RAM_SIZE, break_logging=break_logging,
                                         skip_final_sync=skip_final_sync)

    def start(self) -> "LabMigration":
        """Start the migration in a background thread; returns at once."""
        self.thread = threading.Thread(target=self._run, name="vhostlab-lab-migration",
                                       daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            result = self.impl.run()
            self._summary = result.summary() if self.frontend == "qemu" else result
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
        if self.frontend == "qemu":
            return list(self.impl.progress().rounds)
        return list(self.impl.snapshots)

    def dirty_rounds(self) -> list:
        """One DirtyRound per sync of the dirty log, the last one vhost_log_put's."""
        return list(self.impl.dirty_rounds)

    def rings_at_switchover(self, side: str = "source") -> list:
        """The rings as the back-end saw them: on the source just before GET_VRING_BASE,
        on the destination after SET_VRING_BASE (VringAtSwitchover, by ring index)."""
        return self.impl.switchover.taken(side)

    def call_view(self, side: str = "source", title: str | None = None):
        """The vhost.c calls of one side's front-end, with their messages (see LabDevice)."""
        from vhostlab.viz import CallTimelineView
        title = title or f"{side}: calls and messages"
        if self.frontend == "qemu":
            trace = self.source_trace() if side == "source" else self.destination_trace()
            return CallTimelineView.inferred(trace, title=title + " (inferred from the trace)")
        dev = (self.impl.src if side == "source" else self.impl.dst).dev
        return CallTimelineView(dev, title=title)

    def source_trace(self) -> tuple:
        """Every message the source's back-end received and sent."""
        if self.frontend == "qemu":
            return self.impl.src.trace() if self.impl.src else ()
        return self.impl.src.server.trace.records()

    def destination_trace(self) -> tuple:
        """Every message the destination's back-end received and sent."""
        if self.frontend == "qemu":
            return self.impl.dst.trace() if self.impl.dst else ()
        return self.impl.dst.server.trace.records()

    def requests(self, side: str = "source") -> list[str]:
        """The names of the requests the source (or destination) back-end received."""
        trace = self.source_trace() if side == "source" else self.destination_trace()
        return [r.request for r in trace if r.direction == TO_BACKEND]

    def watch(self):
        """A live view of the run (timeline, rounds), redrawn until it ends."""
        from vhostlab.viz import watch_migration
        return watch_migration(self.impl, until=self.thread)

    def close(self) -> None:
        if self.thread is not None:
            self.thread.join(120)
        self.impl.close()


class OpReference:
    """What each VhostOps call did: the messages it sent, its local answer, or its error.

    One ``with ref.op(name):`` block per call, calling that op. An op
    vhost-user lacks (``NotSupportedByVhostUser``, naming the kernel ioctl),
    one whose protocol feature was not negotiated (``ProtocolFeatureMissing``)
    and one the back-end refused (``BackendReplyError``) are recorded as what
    happened, and not raised further. ``outcomes``: op -> {kind, detail}.
    """

    def __init__(self, ops, backend):
        self.ops, self.backend = ops, backend
        self.outcomes: dict[str, dict] = {}

    def op(self, name: str) -> "_OpCall":
        return _OpCall(self, name)

    def covered(self) -> set[str]:
        return set(self.outcomes)

    def rows(self) -> list[dict]:
        """One dict per recorded op (op, kind, detail), in the seed's order."""
        from vhostlab.frontend import VHOST_OPS_TABLE
        order = {o.name: i for i, o in enumerate(VHOST_OPS_TABLE)}
        return [dict(op=n, **self.outcomes[n]) for n in sorted(self.outcomes, key=order.get)]

    def _repr_html_(self) -> str:
        body = "".join(f"<tr><td><code>{html.escape(r['op'])}</code></td><td>"
                       f"{html.escape(r['kind'])}</td><td>{html.escape(r['detail'])}</td></tr>"
                       for r in self.rows())
        return ("<table><thead><tr><th>op</th><th>what it did</th><th>detail</th></tr>"
                f"</thead><tbody>{body}</tbody></table>")


class _OpCall:
    def __init__(self, ref: OpReference, name: str):
        self.ref, self.name = ref, name

    def _new(self) -> list:
        return [r for r in self.ref.backend.trace.records() if r.seq > self.seq]

    def __enter__(self) -> "_OpCall":
        self.seq = max((r.seq for r in self.ref.backend.trace.records()), default=0)
        self.ncalled = len(self.ref.ops.ops_called)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        from vhostlab.frontend import (BackendReplyError, NotSupportedByVhostUser,
                                       ProtocolFeatureMissing, op_info)
        called = self.ref.ops.ops_called[self.ncalled:]
        if self.name not in called:
            raise LabSetupError(f"the block for {self.name} called {called or 'no op'}")
        info = op_info(self.name)
        if info.messages and not info.local and exc is None:
            wait_until(self._new, 1.0)          # the back-end's thread records what it got
        sent = ", ".join(r.request for r in self._new() if r.direction == TO_BACKEND)
        if isinstance(exc, NotSupportedByVhostUser):
            kind, detail = "kernel only", f"ioctl {exc.kernel_ioctl}: {exc.reason}"
        elif isinstance(exc, ProtocolFeatureMissing):
            kind, detail = "needs a protocol feature", f"{exc.request} needs {exc.feature}"
        elif isinstance(exc, BackendReplyError):
            kind, detail = "refused by the back-end", f"{sent}: {exc}"
        elif exc is not None:
            return False
        else:
            kind, detail = ("message", sent) if sent else ("local", f"no message: {info.note}")
        self.ref.outcomes[self.name] = {"kind": kind, "detail": detail}
        return True


class TxRing:
    """A TX virtqueue in its own guest memory, full of frames, for racing the kernels.

    ``vq``: the device side (``vhostlab.ring.Virtqueue``); ``driver``: the
    guest side, which posted ``frames`` chains of a ``hdr_len``-byte
    virtio-net header and ``frame_bytes`` bytes. ``rewind()`` makes the same
    chains available again, so the Python twin and the numba kernel take the
    very same descriptors.
    """

    RING_GPA, BUF_GPA = 0x100000, 0x200000

    def __init__(self, frames: int, frame_bytes: int, hdr_len: int):
        from vhostlab.memory import GuestMemory
        from vhostlab.ring import Virtqueue, VirtqueueDriver
        num = 1 << max(frames - 1, 1).bit_length()
        self.memory = GuestMemory.allocate(8 << 20, layout="flat")
        self.driver = VirtqueueDriver(self.memory, num, self.RING_GPA)
        self.frames = [bytes([i & 0xFF]) * frame_bytes for i in range(frames)]
        stride = (hdr_len + frame_bytes + 63) // 64 * 64
        for i, frame in enumerate(self.frames):
            gpa = self.BUF_GPA + i * stride
            self.memory.write(gpa, bytes(hdr_len) + frame)
            self.driver.add_buffer([(gpa, hdr_len + len(frame), False)])
        self.driver.publish()
        self.vq = Virtqueue(1, "tx")
        self.vq.set_num(num)
        self.vq.set_addr(self.driver.desc_gpa, self.driver.avail_gpa, self.driver.used_gpa,
                         memory=self.memory)
        self.vq.set_base(0)

    def used(self):
        """A copy of the used ring's elements."""
        return self.driver.views.used_ring.copy()

    def rewind(self) -> None:
        """Forget what the device did: used ring zeroed, last_avail_idx back to 0."""
        self.memory.write(self.driver.used_gpa, bytes(4 + 8 * self.driver.num))
        self.vq.set_base(0)

    def close(self) -> None:
        self.driver = None                      # its views keep guest memory mapped
        self.memory.close()


def _is_kernel_thread(t: threading.Thread) -> bool:
    """Threads the Jupyter machinery or the process start on their own (not a lab's)."""
    if t.name in _PROCESS_THREADS:
        return True
    target = getattr(t, "_target", None)
    module = getattr(target, "__module__", None) or type(t).__module__ or ""
    return module.startswith(("ipykernel", "jupyter_client", "zmq", "IPython", "tornado", "comm"))


_OPEN: dict[str, Lab] = {}


def open_lab(name: str) -> Lab:
    """Start a notebook's lab: choose the front-end, make a private 0700 directory.

    Opening a lab closes every lab opened before it in this process, so the
    first cell can be run again safely. Raises LabSetupError (see
    :func:`choose_frontend`).
    """
    for old in list(_OPEN.values()):
        old.close()
    _OPEN.clear()
    frontend = choose_frontend()
    workdir = tempfile.mkdtemp(prefix=f"vhostlab-{name}-")   # mode 0700
    lab = Lab(name=name, frontend=frontend, qemu=doctor.qemu_info(), workdir=workdir,
              _threads_before={t.ident for t in threading.enumerate()})
    _OPEN[name] = lab
    return lab


@atexit.register
def _close_all() -> None:
    for lab in list(_OPEN.values()):
        lab.close(timeout=2.0)
    _OPEN.clear()
