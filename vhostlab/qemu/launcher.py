"""Start a real QEMU as a vhost front-end, with no guest OS and no KVM.

The recipe (QEMU 7.2, TCG): a ``pc`` machine whose RAM is a shared memfd
(the back-end needs fds to map guest memory), a 64 KiB "halt firmware" so
the vCPU stops at the reset vector and nothing reprograms PCI, a legacy
virtio-net-pci device, and two control channels: ``-qtest`` (port I/O and
guest memory, which the guest driver in :mod:`.guest` uses in place of a
guest kernel) and ``-qmp`` (run state, migration).

What the network device is plugged into is a parameter (:class:`NetdevSpec`):
a vhost-user back-end for real use, or an ordinary QEMU netdev on loopback.

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
import functools
import ipaddress
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import weakref
from dataclasses import dataclass, field

from .errors import QemuExitedError, QemuNotFoundError, QemuStartError, describe_exit
from .qmp import QMP
from .qtest import QTest, QTestServer

__all__ = [
    "QemuInfo", "find_qemu", "require_qemu", "halt_firmware",
    "NetdevSpec", "vhost_user_netdev", "dgram_netdev", "udp_socket_netdev",
    "QemuInstance", "DEFAULT_RAM_SIZE", "DEFAULT_MAC", "QEMU_ENV", "MIN_QEMU_VERSION",
    "CI_QEMU_RELEASES", "ci_coverage",
]

MiB = 1 << 20
DEFAULT_RAM_SIZE = 128 * MiB
DEFAULT_MAC = "52:54:00:12:34:56"
QEMU_ENV = "VHOSTLAB_QEMU"
QEMU_BINARY = "qemu-system-x86_64"
#: ``-machine memory-backend=`` appeared in QEMU 5.0.
MIN_QEMU_VERSION = (5, 0, 0)
#: The QEMU releases CI runs the QEMU tests and the labs against (Debian 11, 12
#: and 13: ``.ci/run`` and ``scripts/debian-qemu.sh``). Binder's Ubuntu QEMU
#: (6.2 on 22.04, 8.2 on 24.04) lies between them.
CI_QEMU_RELEASES = ((5, 2), (7, 2), (10, 0))
WORKDIR_PREFIX = "vhostlab-qemu-"
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


# -- finding QEMU ----------------------------------------------------------
@dataclass(frozen=True)
class QemuInfo:
    """What ``qemu-system-x86_64`` at ``path`` can do; ``problems`` empty means usable."""

    path: str
    version: tuple[int, int, int]
    has_memfd: bool
    has_virtio_net_pci: bool
    netdevs: tuple[str, ...] = ()
    accelerators: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        """True when the vhostlab recipe can run on this QEMU."""
        return not self.problems

    @property
    def version_string(self) -> str:
        return ".".join(map(str, self.version))


def ci_coverage(version: tuple[int, ...]) -> str:
    """How CI covers a QEMU version: "tested" (a release CI runs), "in range", or "untested"."""
    release = tuple(version[:2])
    if release in CI_QEMU_RELEASES:
        return "tested"
    if CI_QEMU_RELEASES[0] < release < CI_QEMU_RELEASES[-1]:
        return "in range"
    return "untested"


def _run_help(path: str, *args: str) -> str:
    res = subprocess.run([path, *args], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=20, check=False)
    return res.stdout


@functools.lru_cache(maxsize=8)
def _probe(path: str, mtime_ns: int, size: int) -> QemuInfo:
    # mtime and size are in the key so an upgraded binary is probed afresh.
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", _run_help(path, "--version"))
    version = (int(m[1]), int(m[2]), int(m[3] or 0)) if m else (0, 0, 0)
    objects = _run_help(path, "-object", "help")
    devices = _run_help(path, "-device", "help")
    # Both lists are a title line, then one name per line.
    netdevs = tuple(_run_help(path, "-netdev", "help").split("\n", 1)[-1].split())
    accels = tuple(_run_help(path, "-accel", "help").split("\n", 1)[-1].split())
    problems = []
    if not m:
        problems.append(f"{path} --version did not print a QEMU version")
    elif version < MIN_QEMU_VERSION:
        problems.append(f"QEMU {'.'.join(map(str, version))} is older than "
                        f"{'.'.join(map(str, MIN_QEMU_VERSION))}")
    has_memfd = "memory-backend-memfd" in objects
    has_vnet = '"virtio-net-pci"' in devices
    if not has_memfd:
        problems.append("no memory-backend-memfd object (guest RAM must be a shareable fd)")
    if not has_vnet:
        problems.append("no virtio-net-pci device")
    return QemuInfo(path, version, has_memfd, has_vnet, netdevs, accels, tuple(problems))


def find_qemu(path: str | None = None) -> QemuInfo | None:
    """Find and probe QEMU: ``path``, else $VHOSTLAB_QEMU, else ``qemu-system-x86_64`` on PATH.

    Returns None when there is no such executable. The answers of
    ``--version`` / ``-object help`` / ``-device help`` are cached.
    """
    path = path or os.environ.get(QEMU_ENV) or shutil.which(QEMU_BINARY)
    if not path:
        return None
    path = shutil.which(path) or path
    try:
        st = os.stat(path)
        return _probe(os.path.realpath(path), st.st_mtime_ns, st.st_size)
    except (OSError, subprocess.SubprocessError):
        return None


def require_qemu(path: str | None = None) -> QemuInfo:
    """Like :func:`find_qemu`, but raise QemuNotFoundError when QEMU is absent or unusable."""
    info = find_qemu(path)
    hint = ("install it (Debian/Ubuntu: apt-get install --no-install-recommends "
            f"qemu-system-x86) or point ${QEMU_ENV} at a qemu-system-x86_64")
    if info is None:
        raise QemuNotFoundError(f"{QEMU_BINARY} not found (${QEMU_ENV} unset or wrong)", hint=hint)
    if not info.usable:
        raise QemuNotFoundError(f"QEMU at {info.path} cannot run the lab: "
                                + "; ".join(info.problems), hint=hint)
    return info


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


# -- netdevs ---------------------------------------------------------------
@dataclass(frozen=True)
class NetdevSpec:
    """The QEMU arguments that create netdev ``netdev_id``, plus virtio-net-pci properties it needs.

    ``listen_address`` is where QEMU receives datagrams for the guest (UDP
    netdevs only).
    """

    args: tuple[str, ...]
    netdev_id: str = "net0"
    device_props: tuple[str, ...] = ()
    description: str = ""
    listen_address: tuple[str, int] | None = None


def _escape(value: str) -> str:
    # QEMU option syntax: a comma inside a value is written twice.
    return value.replace(",", ",,")


def vhost_user_netdev(socket_path: str, *, reconnect: int | None = None,
                      queues: int | None = None, netdev_id: str = "net0",
                      chardev_id: str = "chr0", host_mtu: int | None = None) -> NetdevSpec:
    """A vhost-user netdev: QEMU connects as client to the back-end listening at ``socket_path``.

    ``host_mtu`` sets the virtio-net-pci property of that name: the device then
    offers VIRTIO_NET_F_MTU, and a guest that acks it makes QEMU send
    NET_SET_MTU (``vhost_net_set_mtu``) before it starts the back-end.
    """
    chardev = f"socket,id={chardev_id},path={_escape(socket_path)}"
    if reconnect is not None:
        chardev += f",reconnect={int(reconnect)}"
    netdev = f"vhost-user,id={netdev_id},chardev={chardev_id},vhostforce=on"
    props: tuple[str, ...] = ()
    if queues is not None:
        if not 1 <= queues <= 128:
            raise ValueError(f"queues={queues} outside 1..128")
        netdev += f",queues={queues}"
        if queues > 1:
            props = ("mq=on", f"vectors={2 * queues + 2}")
    if host_mtu is not None:
        if not 68 <= host_mtu <= 65535:
            raise ValueError(f"host_mtu={host_mtu} outside 68..65535")
        props += (f"host_mtu={int(host_mtu)}",)
    return NetdevSpec(("-chardev", chardev, "-netdev", netdev), netdev_id, props,
                      f"vhost-user back-end at {socket_path}")


def _loopback(host: str) -> str:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"host {host!r} is not a loopback address; the lab never "
                         "sends frames off this machine")
    return host


def _free_udp_port(host: str) -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def dgram_netdev(remote_port: int, local_port: int | None = None, *,
                 host: str = "127.0.0.1", netdev_id: str = "net0") -> NetdevSpec:
    """``-netdev dgram`` on loopback (QEMU >= 7.2).

    QEMU binds ``host:local_port`` (a free port when None) and sends every
    frame the guest transmits, as one datagram, to ``host:remote_port``;
    datagrams sent to ``local_port`` reach the guest's RX queue.
    """
    host = _loopback(host)
    local_port = local_port or _free_udp_port(host)
    netdev = (f"dgram,id={netdev_id},local.type=inet,local.host={host},"
              f"local.port={local_port},remote.type=inet,remote.host={host},"
              f"remote.port={remote_port}")
    return NetdevSpec(("-netdev", netdev), netdev_id, (),
                      f"UDP {host}:{local_port} <-> {host}:{remote_port}", (host, local_port))


def udp_socket_netdev(remote_port: int, local_port: int | None = None, *,
                      host: str = "127.0.0.1", netdev_id: str = "net0") -> NetdevSpec:
    """The older ``-netdev socket,udp=...,localaddr=...`` form of :func:`dgram_netdev`."""
    host = _loopback(host)
    local_port = local_port or _free_udp_port(host)
    netdev = f"socket,id={netdev_id},udp={host}:{remote_port},localaddr={host}:{local_port}"
    return NetdevSpec(("-netdev", netdev), netdev_id, (),
                      f"UDP {host}:{local_port} <-> {host}:{remote_port}", (host, local_port))


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
    closers: list = field(default_factory=list)

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
        for step in (lambda: self.qmp and self.qmp.close(),
                     lambda: self.qtest and self.qtest.close(),
                     lambda: self.stop_process(timeout),
                     lambda: self.qtest_server and self.qtest_server.close(),
                     self.read_log,
                     *self.closers):
            try:
                step()
            except Exception:  # clean-up goes on; each step is independent
                pass
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


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
            if not self._finalizer.alive:  # closed: never create a directory nobody removes
                raise QemuExitedError(f"{self.name} is closed")
            sweep_stale_workdirs()
            self._res.workdir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")
            os.chmod(self._res.workdir, 0o700)
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
        argv = [self.info.path, "-name", _escape(self.name),
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
        if self._res.qtest is None:
            raise QemuExitedError(f"{self.name} is not started")
        return self._res.qtest

    @property
    def qmp(self) -> QMP:
        """The QMP connection (run state, migration, events)."""
        if self._res.qmp is None:
            raise QemuExitedError(f"{self.name} is not started")
        return self._res.qmp

    def guest(self, **kwargs):
        """A :class:`~vhostlab.qemu.guest.QTestVirtioNetGuest` on this QEMU, initialised."""
        from .guest import QTestVirtioNetGuest
        return QTestVirtioNetGuest(self.qtest, ram_size=self.ram_size, **kwargs)

    def __repr__(self) -> str:
        state = "running" if self.alive() else describe_exit(self.returncode) \
            if self._res.process else "not started"
        return f"<QemuInstance {self.name} pid={self.pid} {state}>"
