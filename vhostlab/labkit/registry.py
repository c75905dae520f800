"""The labs' registry: which front-end a lab uses, what it started, and cleaning up after.

``open_lab(name)`` makes a :class:`Lab`: the front-end chosen (doctor's rule,
or VHOSTLAB_FRONTEND), the back-end (vhostlab's own, or DPDK's with
VHOSTLAB_BACKEND=dpdk), a private 0700 directory, and a list of everything
started through it. ``lab.close()`` stops that list newest first; it also
runs at ``atexit``, and opening a lab closes the ones opened before it.
"""
from __future__ import annotations

import atexit
import html
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from vhostlab import doctor
from vhostlab.frontend.dpdk_side import BACKENDS

from .base import RAM_SIZE, LabSetupError, child_processes, wait_until
from .device import LabDevice, LabMigration
from .fixtures import OpReference, TxRing
from .frontends import Frontend, frontend_named

__all__ = ["FRONTENDS", "BACKENDS", "Lab", "choose_frontend", "choose_backend", "open_lab"]

#: The values VHOSTLAB_FRONTEND may take.
FRONTENDS = ("auto", "qemu", "builtin")
#: The values VHOSTLAB_BACKEND may take (whose vhost-user back-end the lab drives):
#: BACKENDS, from vhostlab.frontend.dpdk_side.
#: Process-wide helper threads that rightly outlive a lab: the QEMU launcher
#: forks every QEMU from one sleeping thread, so that PR_SET_PDEATHSIG ties
#: each QEMU to this process (the kernel ties that signal to the forking thread).
_PROCESS_THREADS = ("vhostlab-qemu-spawner",)


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


def choose_backend(backend: str | None = None) -> str:
    """``"vhostlab"`` (the default) or ``"dpdk"``: whose back-end the lab's cells drive.

    ``backend`` (from ``open_lab``) wins over VHOSTLAB_BACKEND. Raises
    LabSetupError for an unknown name, or for ``dpdk`` where testpmd is missing.
    """
    chosen = backend or os.environ.get("VHOSTLAB_BACKEND") or "vhostlab"
    if chosen not in BACKENDS:
        raise LabSetupError(f"backend={chosen!r}: expected one of {', '.join(BACKENDS)} "
                            "(VHOSTLAB_BACKEND or open_lab(..., backend=...))")
    if chosen == "dpdk":
        from vhostlab.backend.dpdk import dpdk_usable
        usable, why = dpdk_usable()
        if not usable:
            raise LabSetupError(f"backend 'dpdk': {why} (or unset VHOSTLAB_BACKEND)")
    return chosen


@dataclass
class _OwnedThing:
    label: str
    stop: Callable[[], Any]
    alive: Callable[[], bool] | None


@dataclass(repr=False)
class Lab:
    """One notebook's set-up: the chosen front-end and everything it started.

    ``name``: the notebook; ``frontend``: ``"qemu"`` or ``"builtin"``;
    ``qemu``: doctor's QEMU info or None; ``workdir``: a private 0700
    directory for sockets, removed by ``close()``; ``backend``:
    ``"vhostlab"`` or ``"dpdk"`` (what ``start_backend`` starts).
    """

    name: str
    frontend: str
    qemu: dict | None
    workdir: str
    backend: str = "vhostlab"
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
            self._owned.append(_OwnedThing(label, stop, alive))
        return obj

    def _label(self, kind: str) -> str:
        with self._lock:
            if self._closed:
                raise LabSetupError(f"lab {self.name} is closed; run its first cell again")
            self._counter += 1
            return f"{kind}-{self._counter}"

    def _frontend(self, name: str | None = None) -> Frontend:
        return frontend_named(name or self.frontend)

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
        """Start a vhost-user-net back-end: the lab's (see ``backend``).

        ``vhostlab``: a ``BackendServer`` in a thread of this kernel; ``dpdk``:
        testpmd's vhost port behind a recording relay
        (``vhostlab.labkit.dpdk.DpdkLabBackend``). Either way the frames the
        guest transmits are kept on its wire (``backend.wire.captured``) and
        ``backend.inject(frames)`` sends frames to the guest.
        ``break_logging``: the back-end does not log (vhostlab's skips it;
        DPDK is never asked to: the relay drops VHOST_F_LOG_ALL).
        """
        if self.backend == "dpdk":
            from .dpdk import DpdkLabBackend
            label = self._label("dpdk")
            dpdk = DpdkLabBackend(self.path(f"{label}.sock"), break_logging=break_logging)
            return self.own(dpdk, dpdk.stop, label, alive=lambda: dpdk.running)
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
                     rx_buffers: int = 64, ring: str = "split",
                     queue_size: int = 256) -> LabDevice:
        """A new back-end with a front-end attached and the device started.

        ``frontend`` (default: the lab's) ``qemu``: QEMU connects to the
        back-end and the guest driver (over qtest) brings virtio-net to
        DRIVER_OK, whereupon QEMU runs ``vhost_dev_start``; ``builtin``:
        ``vhost_dev_init`` and ``vhost_net_start`` of the built-in front-end.
        Then the guest posts ``rx_buffers`` receive buffers. ``ring``
        ("split" or "packed") and ``queue_size``: the built-in guest's rings
        (a real QEMU's legacy virtio-net runs split rings of 256).
        """
        chosen = self._frontend(frontend)
        if chosen.name != "builtin" and (ring, queue_size) != ("split", 256):
            raise LabSetupError(f"ring={ring!r}, queue_size={queue_size}: only the built-in "
                                "front-end's guest takes them; QEMU's legacy virtio-net-pci "
                                "has a 32-bit feature register, so it cannot negotiate "
                                "VIRTIO_F_RING_PACKED (bit 34): use frontend='builtin'")
        backend = self.start_backend(break_logging=break_logging)
        device = chosen.start_device(self, backend, self._label(chosen.name),
                                     **({} if chosen.name != "builtin" else
                                        {"ring": ring, "queue_size": queue_size}))
        if rx_buffers:
            device.guest.post_rx_buffers(rx_buffers)
        return device

    def migration(self, *, break_logging: bool = False, skip_final_sync: bool = False,
                  frontend: str | None = None, ring: str = "split") -> LabMigration:
        """A live migration by the lab's front-end, or ``frontend`` (call ``start()``);
        see LabMigration. ``ring="packed"``: packed rings (the built-in front-end only)."""
        chosen = self._frontend(frontend)
        if ring != "split" and chosen.name != "builtin":
            raise LabSetupError(f"ring={ring!r}: a real QEMU's legacy virtio-net-pci cannot "
                                "negotiate packed rings; use frontend='builtin'")
        label = self._label("migration")
        mig = LabMigration(chosen, break_logging, skip_final_sync, self.backend, ring)
        return self.own(mig, mig.close, label, alive=mig.running)

    def new_log(self, memory):
        """A zeroed dirty log in a memfd, sized for ``memory`` (QEMU's vhost_log_alloc)."""
        from vhostlab.dirtylog import DirtyLog
        label = self._label("dirty-log")
        log = DirtyLog.allocate(memory)
        return self.own(log, log.close, label)

    def op_reference(self, ops, backend) -> OpReference:
        """A recorder of what each VhostOps call did (lab 08)."""
        return OpReference(ops, backend)

    def qemu_stepper(self, **kwargs: Any) -> Any:
        """A real QEMU stepped one guest or QMP action at a time (lab 08).

        Returns a ``vhostlab.qemu.stepper.QemuStepper`` the lab owns (closed
        with the lab), or None on the built-in front-end: there is no QEMU.
        """
        stepper = self._frontend().stepper(self.qemu, **kwargs)
        if stepper is None:
            return None
        return self.own(stepper, stepper.close, self._label("qemu-stepper"),
                        alive=stepper.alive)

    def compare_backends(self, frames: int = 16):
        """The same VhostOps against vhostlab's back-end and DPDK's, side by side
        (``vhostlab.labkit.compare``): what each offers, the frames, the pages each
        logs, GET_VRING_BASE. Everything it starts is stopped before it returns."""
        from .compare import compare_backends
        return compare_backends(frames)

    def tx_ring(self, frames: int = 256, frame_bytes: int = 64, hdr_len: int = 12) -> TxRing:
        """A TX virtqueue in its own guest memory, full of ``frames`` frames (lab 05)."""
        label = self._label("tx-ring")
        ring = TxRing(frames, frame_bytes, hdr_len)
        return self.own(ring, ring.close, label)

    @property
    def qemu_version(self) -> tuple[int, ...] | None:
        """The real QEMU's version as numbers, e.g. (7, 2, 0); None for the built-in front-end."""
        return self._frontend().version(self.qemu)

    # -- display -----------------------------------------------------------------
    def describe(self) -> str:
        """One sentence: who plays QEMU's part here, and why."""
        forced = os.environ.get("VHOSTLAB_FRONTEND") or "auto"
        who = self._frontend().who(self.qemu)
        why = "chosen automatically" if forced == "auto" else f"forced by VHOSTLAB_FRONTEND={forced}"
        backend = ("the back-end is DPDK's (dpdk-testpmd's vhost port, behind a recording relay)"
                   if self.backend == "dpdk" else "the back-end is vhostlab's")
        return f"Lab {self.name}: QEMU's part is played by {who}, {why}; {backend}."

    def _repr_html_(self) -> str:
        return f"<p><b>vhostlab</b>: {html.escape(self.describe())}</p>"

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


def _is_kernel_thread(t: threading.Thread) -> bool:
    """Threads the Jupyter machinery or the process start on their own (not a lab's)."""
    if t.name in _PROCESS_THREADS:
        return True
    target = getattr(t, "_target", None)
    module = getattr(target, "__module__", None) or type(t).__module__ or ""
    return module.startswith(("ipykernel", "jupyter_client", "zmq", "IPython", "tornado", "comm"))


_OPEN: dict[str, Lab] = {}


def open_lab(name: str, backend: str | None = None) -> Lab:
    """Start a notebook's lab: choose the front-end and the back-end, make a
    private 0700 directory.

    ``backend``: ``"vhostlab"`` or ``"dpdk"`` (default: VHOSTLAB_BACKEND, else
    vhostlab). Opening a lab closes every lab opened before it in this
    process, so the first cell can be run again safely. Raises LabSetupError
    (see :func:`choose_frontend`, :func:`choose_backend`).
    """
    for old in list(_OPEN.values()):
        old.close()
    _OPEN.clear()
    frontend = choose_frontend()
    chosen_backend = choose_backend(backend)
    workdir = tempfile.mkdtemp(prefix=f"vhostlab-{name}-")   # mode 0700
    lab = Lab(name=name, frontend=frontend, qemu=doctor.qemu_info(), workdir=workdir,
              backend=chosen_backend,
              _threads_before={t.ident for t in threading.enumerate()})
    _OPEN[name] = lab
    return lab


@atexit.register
def _close_all() -> None:
    for lab in list(_OPEN.values()):
        lab.close(timeout=2.0)
    _OPEN.clear()
