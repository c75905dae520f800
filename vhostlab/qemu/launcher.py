"""Start a real QEMU as a vhost front-end, with no guest OS and no KVM.

The recipe (QEMU 7.2, TCG): a ``pc`` machine whose RAM is a shared memfd
(the back-end needs fds to map guest memory), a 64 KiB "halt firmware" so
the vCPU stops at the reset vector and nothing reprograms PCI, a legacy
virtio-net-pci device, and two control channels: ``-qtest`` (port I/O and
guest memory, which the guest driver in :mod:`.guest` uses in place of a
guest kernel) and ``-qmp`` (run state, migration).

What the network device is plugged into is a parameter (:class:`NetdevSpec`,
in :mod:`.netdev`): a vhost-user back-end for real use, or an ordinary QEMU
netdev on loopback. Finding QEMU and probing what it can do is :mod:`.find`.

Nothing started here outlives its owner. QEMU runs in its own session (a
Ctrl-C aimed at the notebook is not delivered to QEMU behind our back), with
``PR_SET_PDEATHSIG=SIGKILL`` so that a killed Python process takes QEMU with
it. Because the kernel ties that signal to the *thread* that forked, QEMU is
always spawned from one long-lived daemon thread. ``close()``, the context
manager, garbage collection and interpreter exit (``weakref.finalize``
registers with ``atexit``) all run the same clean-up: stop QEMU (SIGTERM,
then SIGKILL), close the sockets, remove the private 0700 directory that
held them. Directories left by a process that was killed outright are
removed by the next start.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import weakref
from dataclasses import dataclass

from .errors import QemuExitedError, QemuNotFoundError, QemuStartError, describe_exit
# Finding QEMU and the netdevs have their own modules; their names stay importable here.
from .find import (CI_QEMU_RELEASES, MIN_QEMU_VERSION, QEMU_ENV, QemuInfo, ci_coverage,
                   find_qemu, require_qemu)
from .netdev import NetdevSpec, dgram_netdev, escape_option, udp_socket_netdev, vhost_user_netdev
from .qmp import QMP
from .qtest import QTest, QTestServer

__all__ = [
    "QemuInfo", "find_qemu", "require_qemu", "halt_firmware",
    "NetdevSpec", "vhost_user_netdev", "dgram_netdev", "udp_socket_netdev",
    "QemuInstance", "DEFAULT_RAM_SIZE", "DEFAULT_MAC", "QEMU_ENV", "MIN_QEMU_VERSION",
    "CI_QEMU_RELEASES", "ci_coverage", "WORKDIR_PREFIX", "make_workdir", "sweep_stale_workdirs",
    "close_each", "started",
]

MiB = 1 << 20
DEFAULT_RAM_SIZE = 128 * MiB
DEFAULT_MAC = "52:54:00:12:34:56"
WORKDIR_PREFIX = "vhostlab-qemu-"
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


# -- firmware --------------------------------------------------------------
def halt_firmware() -> bytes:
    """64 KiB of ``hlt`` (0xF4) with ``hlt; jmp $-3`` (F4 EB FD) at the reset vector.

    The reset vector is 16 bytes below 4 GiB, i.e. offset 65536-16 of the
    BIOS image. The vCPU halts there forever, so no firmware enumerates or
    reprograms PCI: the qtest guest driver does that itself.
    """
    image = bytearray(b"\xf4" * 65536)
    image[65536 - 16:65536 - 13] = b"\xf4\xeb\xfd"
    return bytes(image)


# -- spawning --------------------------------------------------------------
_PR_SET_PDEATHSIG = 1
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


def _die_with_parent(parent_pid: int):
    def preexec() -> None:
        # Runs in the child between fork and exec: ask the kernel to SIGKILL
        # us when the forking thread dies, then check the parent did not
        # die before the request was in place.
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(111)
    return preexec


class _Spawner:
    """One daemon thread that forks every QEMU, so PDEATHSIG ties QEMU to the process."""

    _lock = threading.Lock()
    _jobs: "queue.Queue | None" = None

    @classmethod
    def popen(cls, argv: list[str], **kwargs) -> subprocess.Popen:
        with cls._lock:
            if cls._jobs is None:
                cls._jobs = queue.Queue()
                threading.Thread(target=cls._serve, args=(cls._jobs,), daemon=True,
                                 name="vhostlab-qemu-spawner").start()
        reply: queue.Queue = queue.Queue()
        cls._jobs.put((argv, kwargs, reply))
        ok, value = reply.get()
        if not ok:
            raise value
        return value

    @staticmethod
    def _serve(jobs: queue.Queue) -> None:
        while True:
            argv, kwargs, reply = jobs.get()
            try:
                reply.put((True, subprocess.Popen(argv, **kwargs)))
            except BaseException as exc:  # handed to the caller, not lost
                reply.put((False, exc))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_workdirs() -> list[str]:
    """Remove socket directories left by vhostlab processes that no longer exist."""
    removed = []
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        m = re.fullmatch(re.escape(WORKDIR_PREFIX) + r"(\d+)-\w+", name)
        path = os.path.join(tmp, name)
        try:
            if not m or os.stat(path).st_uid != os.getuid() or _pid_alive(int(m[1])):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def make_workdir(owner: str, closed: bool) -> str:
    """A private (0700) directory named after this process, so that the next start removes
    it if this process is killed outright. ``closed``: the owner was closed, and a directory
    made now would never be removed (QemuExitedError)."""
    if closed:
        raise QemuExitedError(f"{owner} is closed")
    sweep_stale_workdirs()
    path = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")
    os.chmod(path, 0o700)
    return path


def close_each(*steps, workdir: str | None = None) -> None:
    """Run every clean-up step, then remove ``workdir``: a step that fails does not stop
    the others (clean-up goes on whatever broke)."""
    for step in steps:
        try:
            step()
        except Exception:  # each step is independent
            pass
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def started(part, what: str):
    """``part`` (a connection, a process, a server), or QemuExitedError when it is None:
    ``what`` is not started."""
    if part is None:
        raise QemuExitedError(f"{what} is not started")
    return part


# -- one QEMU --------------------------------------------------------------
@dataclass
class _Resources:
    """Everything a QemuInstance owns; closed by a finalizer that holds no reference to it."""

    workdir: str | None = None
    process: subprocess.Popen | None = None
    qtest_server: QTestServer | None = None
    qtest: QTest | None = None
    qmp: QMP | None = None
    stderr_path: str | None = None
    last_log: str = ""

    def read_log(self) -> str:
        if self.stderr_path and os.path.exists(self.stderr_path):
            with open(self.stderr_path, errors="replace") as f:
                self.last_log = f.read()
        return self.last_log

    def stop_process(self, timeout: float) -> None:
        p = self.process
        if p is None or p.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)  # its own session: pgid == pid
            except ProcessLookupError:
                pass
            try:
                p.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def close(self, timeout: float = 5.0) -> None:
        close_each(lambda: self.qmp and self.qmp.close(),
                   lambda: self.qtest and self.qtest.close(),
                   lambda: self.stop_process(timeout),
                   lambda: self.qtest_server and self.qtest_server.close(),
                   self.read_log, workdir=self.workdir)


def _hint(log: str, returncode: int | None, fallback: str | None = None) -> str:
    rules = [
        (r"-chardev socket.*(Failed to connect|Connection refused)|vhost-user.*(fail|error)",
         "QEMU could not talk to the vhost-user back-end: start the back-end "
         "(it must listen on the socket) before QEMU, or pass reconnect=N"),
        (r"Address already in use",
         "a UDP port of the netdev is taken; let dgram_netdev() pick a free local port"),
        (r"memory-backend-memfd|memfd",
         "this QEMU cannot create a memfd-backed RAM; use Linux and QEMU >= 5.0"),
        (r"Cannot allocate memory|cannot set up guest memory",
         "not enough memory for the guest RAM; pass a smaller ram_size"),
        (r"-incoming|load of migration failed|migration",
         "the migration stream was refused; source and destination need the same "
         "command line (RAM size, device, netdev type)"),
    ]
    if returncode == -signal.SIGKILL:
        return ("QEMU was killed with SIGKILL (by a test, by you, by the out-of-memory "
                "killer, or because its parent process died); start a new QemuInstance")
    for pattern, hint in rules:
        if re.search(pattern, log, re.IGNORECASE):
            return hint
    return fallback or "read QEMU's message above; the full command line is in QemuInstance.argv"


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class QemuInstance:
    """One QEMU with a legacy virtio-net-pci, driven through qtest and QMP.

    ``netdev`` is what the NIC is plugged into (:func:`vhost_user_netdev`,
    :func:`dgram_netdev`, ...; None: nothing). ``incoming=True`` starts a
    migration destination listening at :attr:`migration_uri`. ``timeout``
    bounds start-up and every qtest/QMP answer. Use as a context manager::

        with QemuInstance(dgram_netdev(port)) as q:
            guest = q.guest()

    Raises QemuNotFoundError when QEMU is unusable, QemuStartError when it
    does not come up.
    """

    def __init__(self, netdev: NetdevSpec | None = None, *, ram_size: int = DEFAULT_RAM_SIZE,
                 mac: str = DEFAULT_MAC, incoming: bool | str = False,
                 qemu: str | QemuInfo | None = None, extra_args: tuple[str, ...] = (),
                 name: str = "qemu", timeout: float = 10.0):
        # First, so that repr() and the finalizer work even when a check below raises.
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, self._res.close)
        if ram_size % MiB or not 32 * MiB <= ram_size <= 3072 * MiB:
            raise ValueError(f"ram_size={ram_size:#x}: must be a whole number of MiB "
                             "between 32 MiB and 3 GiB")
        if not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", mac):
            raise ValueError(f"mac={mac!r} is not of the form 52:54:00:12:34:56")
        self.info = qemu if isinstance(qemu, QemuInfo) else require_qemu(qemu)
        kind = netdev.args[netdev.args.index("-netdev") + 1].split(",")[0] if netdev else None
        if kind and self.info.netdevs and kind not in self.info.netdevs:
            raise QemuNotFoundError(
                f"QEMU {self.info.version_string} at {self.info.path} has no {kind!r} netdev "
                f"(it has: {', '.join(self.info.netdevs)})",
                hint="use udp_socket_netdev() instead of dgram_netdev() on QEMU before 7.2")
        self.netdev = netdev
        self.ram_size = ram_size
        self.mac = mac.lower()
        self.incoming = incoming
        self.extra_args = tuple(extra_args)
        self.name = name
        self.timeout = timeout
        self.argv: list[str] = []

    # -- paths -----------------------------------------------------------------
    def _path(self, leaf: str) -> str:
        if self._res.workdir is None:
            self._res.workdir = make_workdir(self.name, closed=not self._finalizer.alive)
        path = os.path.join(self._res.workdir, leaf)
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise QemuStartError(f"socket path {path!r} is longer than {_SUN_PATH_MAX} bytes",
                                 hint="set TMPDIR to a shorter directory")
        return path

    @property
    def workdir(self) -> str:
        """The private (0700) directory holding sockets, firmware and QEMU's log."""
        return os.path.dirname(self._path("x"))

    @property
    def qtest_socket(self) -> str:
        return self._path("qtest.sock")

    @property
    def qmp_socket(self) -> str:
        return self._path("qmp.sock")

    @property
    def migration_uri(self) -> str:
        """Where this instance listens for an incoming migration (``unix:...``)."""
        if isinstance(self.incoming, str):
            return self.incoming
        return "unix:" + self._path("migration.sock")

    @property
    def stderr_path(self) -> str:
        return self._path("qemu.log")

    # -- command line ------------------------------------------------------------
    def command_line(self) -> list[str]:
        """The full QEMU argv (FACTS.md section 1 recipe)."""
        size = f"{self.ram_size // MiB}M"
        firmware = self._path("halt.bin")
        device = ["virtio-net-pci", "disable-modern=on", "romfile=", f"mac={self.mac}"]
        argv = [self.info.path, "-name", escape_option(self.name),
                "-machine", "pc,accel=tcg,memory-backend=mem", "-m", size,
                "-nodefaults", "-display", "none",
                "-object", f"memory-backend-memfd,id=mem,size={size},share=on",
                "-bios", firmware]
        if self.netdev is not None:
            argv += list(self.netdev.args)
            device[1:1] = [f"netdev={self.netdev.netdev_id}", *self.netdev.device_props]
        argv += ["-device", ",".join(device),
                 "-qtest", f"unix:{self.qtest_socket}", "-qtest-log", "/dev/null",
                 "-qmp", f"unix:{self.qmp_socket},server=on,wait=off"]
        if self.incoming:
            argv += ["-incoming", self.migration_uri]
        return argv + list(self.extra_args)

    # -- life cycle ----------------------------------------------------------------
    def start(self) -> "QemuInstance":
        """Start QEMU, accept its qtest connection, connect QMP. Returns self."""
        if self._res.process is not None:
            raise QemuStartError(f"{self.name} was already started (pid {self.pid})")
        try:
            self._spawn()
            self._res.qtest = self._res.qtest_server.accept(
                self.timeout, self.alive, self._diagnose, command_timeout=self.timeout)
            qmp = QMP(self.qmp_socket, name=self.name, timeout=self.timeout,
                      diagnose=self._diagnose)
            self._res.qmp = qmp
            qmp.connect(self.timeout, self.alive)
        except BaseException as exc:  # Ctrl-C included: never leave QEMU behind
            spawned, running = self._res.process is not None, self.alive()
            what, info = self._diagnose()
            self.close()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)) or not spawned:
                raise
            if running:  # it came up half-way: say what did not answer
                log = self._res.last_log
                what = f"it did not come up: {getattr(exc, 'message', exc)}"
                info = {"stderr_tail": _tail(log) or None,
                        "hint": _hint(log, None, getattr(exc, "hint", None))}
            raise QemuStartError(f"{self.name} failed to start: {what}", **info) from exc
        return self

    def _spawn(self) -> None:
        firmware = self._path("halt.bin")
        with open(firmware, "wb") as f:
            f.write(halt_firmware())
        self._res.qtest_server = QTestServer(self.qtest_socket)
        self._res.stderr_path = self.stderr_path
        self.argv = self.command_line()
        with open(self.stderr_path, "wb") as log:
            self._res.process = _Spawner.popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, close_fds=True,
                preexec_fn=_die_with_parent(os.getpid()))

    def close(self, timeout: float = 5.0) -> None:
        """Stop QEMU and remove its sockets and directory. Safe to call twice."""
        if self._finalizer.alive:
            self._finalizer.detach()
            self._res.close(timeout)

    def __enter__(self) -> "QemuInstance":
        return self.start() if self._res.process is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- state -----------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._res.process.pid if self._res.process else None

    @property
    def returncode(self) -> int | None:
        """QEMU's return code once it exited (negative: the signal), else None."""
        return self._res.process.poll() if self._res.process else None

    def alive(self) -> bool:
        """True while QEMU runs."""
        return self._res.process is not None and self._res.process.poll() is None

    def log(self) -> str:
        """What QEMU wrote to stdout/stderr so far (kept after close)."""
        return self._res.read_log()

    def _diagnose(self) -> tuple[str, dict]:
        if self._res.process is None:
            return ("QEMU was never started", {})
        try:  # a broken socket can be seen a moment before the exit status is
            rc = self._res.process.wait(0.5)
        except subprocess.TimeoutExpired:
            rc = None
        if rc is None:
            return ("QEMU is still running", {"hint": "QEMU may be stuck; close() it"})
        log = self.log()
        return (f"QEMU (pid {self.pid}) exited with {describe_exit(rc)}",
                {"exit_code": rc, "stderr_tail": _tail(log) or None, "hint": _hint(log, rc)})

    def check_alive(self) -> None:
        """Raise QemuExitedError (exit status, stderr, hint) if QEMU is gone."""
        if not self.alive():
            what, info = self._diagnose()
            raise QemuExitedError(what, **info)

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for QEMU to exit on its own; return its return code."""
        try:
            return self._res.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise QemuExitedError(f"{self.name} still running after {timeout:g} s") from None

    @property
    def qtest(self) -> QTest:
        """The qtest connection (port I/O and guest memory)."""
        return started(self._res.qtest, self.name)

    @property
    def qmp(self) -> QMP:
        """The QMP connection (run state, migration, events)."""
        return started(self._res.qmp, self.name)

    def guest(self, **kwargs):
        """A :class:`~vhostlab.qemu.guest.QTestVirtioNetGuest` on this QEMU, initialised."""
        from .guest import QTestVirtioNetGuest
        return QTestVirtioNetGuest(self.qtest, ram_size=self.ram_size, **kwargs)

    def __repr__(self) -> str:
        state = "running" if self.alive() else describe_exit(self.returncode) \
            if self._res.process else "not started"
        return f"<QemuInstance {self.name} pid={self.pid} {state}>"
