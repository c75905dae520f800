"""DPDK's vhost back-end as a peer: ``dpdk-testpmd`` with a ``net_vhost0`` port.

The labs' third peer: the same VhostOps and the same migration, against a
back-end nobody here wrote. testpmd's vhost PMD (DPDK lib/vhost) listens on a
unix socket as vhost-user back-ends do; a front-end (the built-in one, or a
real QEMU with ``-chardev socket,path=...``) connects to it. In ``io`` mode
on its one port (``--port-topology=loop``) testpmd sends every frame the
guest transmits straight back to the guest's RX queue, unchanged, so traffic
flows both ways and a frame can be checked byte for byte when it returns.
(``macswap`` returns it too, but testpmd 22.11's vector macswap rewrites the
addresses in ways that are not a plain swap, so the labs use ``io``.)

One CPU. testpmd polls: its forwarding lcore spins at 100% whether or not a
frame arrives, and DPDK 22.11's testpmd has no sleep or interrupt mode (the
``--max-sleep-us`` of later releases is not there). So the peer runs every
testpmd thread under ``SCHED_IDLE``: it only gets a CPU nobody else wants.
The kernel, QEMU and the notebook's kernel keep the CPU when they need it;
testpmd runs in the gaps (a front-end waiting for a reply leaves the CPU
idle, so replies still come at once). On a machine with one CPU both lcores
share it (``--lcores 0@C,1@C``). Memory: ``--no-huge -m 64`` and 2048 mbufs
(fewer and EAL refuses to start), about 200 MiB resident, most of it DPDK's
driver libraries.

    with DpdkVhostBackend(socket_path) as dpdk:    # listening when this returns
        ops = VhostOps.connect(socket_path)
        ...
    dpdk.totals     # testpmd's RX/TX packet totals, read when it stopped
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass

from .bench_dpdk import _die_with_parent, find_testpmd, stop
from .bench_dpdk import forward_totals as _totals
from .errors import BackendError

__all__ = ["DpdkVhostBackend", "DpdkError", "find_testpmd", "dpdk_usable",
           "FORWARD_MODES"]

#: testpmd forwarding modes that make sense for a vhost port on its own:
#: io returns each frame to the guest unchanged, macswap returns it with its
#: addresses rewritten, rxonly drops it.
FORWARD_MODES = ("io", "macswap", "rxonly")
START_TIMEOUT = 60.0        # s for the socket to appear (EAL start-up on a loaded CPU)
MEMORY_MB = 64
NB_MBUFS = 2048


class DpdkError(BackendError):
    """testpmd could not be found, started, or went away; says what testpmd last printed."""


def dpdk_usable(probe: bool = False) -> tuple[bool, str]:
    """(usable, why): is there a testpmd here, and (``probe``) does its vhost
    port come up? The probe starts testpmd on a scratch socket and stops it
    (about a second)."""
    testpmd = find_testpmd()
    if not testpmd or not os.access(testpmd, os.X_OK):
        return False, "no dpdk-testpmd (apt-get install dpdk dpdk-dev, or set VHOSTLAB_DPDK)"
    if probe:
        with tempfile.TemporaryDirectory(prefix="vhostlab-dpdk-") as tmp:
            try:
                DpdkVhostBackend(os.path.join(tmp, "probe.sock"), forward="rxonly",
                                 testpmd=testpmd).close()
            except DpdkError as err:
                return False, f"{testpmd} did not start its vhost port: {err.reason[:200]}"
    started = "; its vhost port started here" if probe else ""
    return True, f"{testpmd}: DPDK's vhost back-end (testpmd --vdev net_vhost0){started}"


def _lcores() -> list[str]:
    """EAL lcore options: two lcores (main + one forwarding), on two CPUs this
    process may use, or both on the one CPU it has."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) == 1:
        return ["--lcores", f"0@{cpus[0]},1@{cpus[0]}", "--main-lcore", "0"]
    return ["-l", f"{cpus[0]},{cpus[1]}", "--main-lcore", str(cpus[0])]


def testpmd_vhost_cmd(testpmd: str, socket_path: str, prefix: str, forward: str = "io",
                      queues: int = 1, peer_socket: str | None = None) -> list[str]:
    """The testpmd command line for a vhost-user back-end listening at ``socket_path``.

    With ``peer_socket`` a second vhost port listens there and the two are
    paired (``--port-topology=paired``): what one port's guest transmits goes
    to the other's, as between two ports of a switch."""
    vdevs = ["--vdev", f"net_vhost0,iface={socket_path},queues={queues}"]
    if peer_socket is not None:
        vdevs += ["--vdev", f"net_vhost1,iface={peer_socket},queues={queues}"]
    topology = "loop" if peer_socket is None else "paired"
    return [testpmd, *_lcores(), "--no-huge", "-m", str(MEMORY_MB), "--no-pci",
            "--single-file-segments", f"--file-prefix={prefix}", *vdevs,
            "--", f"--forward-mode={forward}", f"--port-topology={topology}", "--nb-cores=1",
            f"--total-num-mbufs={NB_MBUFS}", "--stats-period", "1"]


def _idle_and_die_with_parent() -> None:
    """preexec_fn: SCHED_IDLE for every thread testpmd starts, SIGKILL when we die."""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    _die_with_parent()


@dataclass(frozen=True)
class ForwardTotals:
    """testpmd's "Accumulated forward statistics" for the vhost port."""

    rx_packets: int
    tx_packets: int
    tx_dropped: int


class DpdkVhostBackend:
    """One testpmd process serving a vhost-user socket (server side).

    ``forward``: one of FORWARD_MODES. ``peer_socket``: a second vhost port,
    paired with the first (see :func:`testpmd_vhost_cmd`). The process lives in its own session,
    dies with this one (PR_SET_PDEATHSIG), and is stopped by :meth:`close`
    (SIGINT, so it prints its totals; SIGKILL if it does not stop), which the
    context manager calls even when the block fails.
    """

    def __init__(self, socket_path: str, *, forward: str = "io",
                 testpmd: str | None = None, log_path: str | None = None,
                 peer_socket: str | None = None) -> None:
        if forward not in FORWARD_MODES:
            raise DpdkError("unknown testpmd forwarding mode", what="DpdkVhostBackend",
                            field="forward", value=forward, limit=", ".join(FORWARD_MODES))
        self.testpmd = testpmd or find_testpmd()
        if not self.testpmd:
            raise DpdkError(dpdk_usable()[1], what="DpdkVhostBackend")
        self.socket_path, self.forward, self.peer_socket = socket_path, forward, peer_socket
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vhostlab-testpmd-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.totals: ForwardTotals | None = None
        self._start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _start(self) -> None:
        prefix = f"vhostlab{os.getpid()}-{abs(hash(self.socket_path)) % 100000}"
        cmd = testpmd_vhost_cmd(self.testpmd, self.socket_path, prefix, self.forward,
                                peer_socket=self.peer_socket)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_idle_and_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT
        sockets = [p for p in (self.socket_path, self.peer_socket) if p]
        while not all(os.path.exists(p) for p in sockets):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = ("exited" if self.proc.poll() is not None
                       else f"did not listen within {START_TIMEOUT:g} s")
                tail = self.output()[-1500:]
                self.close()
                raise DpdkError(f"testpmd {why}; its last output:\n{tail}",
                                what="DpdkVhostBackend", field="socket",
                                value=self.socket_path)
            time.sleep(0.05)

    def output(self) -> str:
        """What testpmd printed so far."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def wait_forwarding(self, timeout: float = 60.0) -> bool:
        """Wait until testpmd forwards (its first periodic statistics): a vhost
        port starts forwarding once a front-end has started its rings."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Port statistics" in self.output():
                return True
            if self.proc is None or self.proc.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    def close(self) -> ForwardTotals | None:
        """Stop testpmd (SIGINT, then SIGKILL), read its totals, remove the socket."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop(proc)                  # SIGINT (testpmd prints its totals), then SIGKILL
            self.totals = forward_totals(self.output())
        for path in (self.socket_path, self.peer_socket):
            try:
                if path:
                    os.unlink(path)
            except OSError:
                pass
        if self._own_log:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass
        return self.totals

    def __enter__(self) -> "DpdkVhostBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.proc and self.proc.poll() is None else "stopped"
        return f"<DpdkVhostBackend {self.socket_path} forward={self.forward} {state}>"


def forward_totals(output: str) -> ForwardTotals | None:
    """RX/TX packets from testpmd's final "Accumulated forward statistics", if printed."""
    if "Accumulated forward statistics" not in output:
        return None
    t = _totals(output)
    return ForwardTotals(t["RX-packets"] or 0, t["TX-packets"] or 0, t["TX-dropped"] or 0)
