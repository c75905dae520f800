"""DPDK's vhost back-end in a lab's cells, where vhostlab's back-end usually is.

With ``VHOSTLAB_BACKEND=dpdk`` (or ``open_lab(name, backend="dpdk")``),
``lab.start_backend()`` returns a :class:`DpdkLabBackend` instead of a
``BackendServer``. The cells use it the same way: its ``socket_path`` is
where a front-end connects, ``trace`` holds every message, ``snapshot()``
the device as the views draw it, ``inject()`` sends frames to the guest and
``wire.captured`` holds what the guest transmitted.

What runs, and why each part:

    front-end --> relay (records, observes) --> testpmd port 0 (net_vhost0)
                                                     | io forwarding, paired
    a second guest (the wire) <-- built-in front-end --> testpmd port 1

- testpmd (``vhostlab.backend.dpdk``) with two vhost ports paired: what the
  lab's guest transmits on port 0 leaves on port 1, and what enters port 1
  arrives in the lab's guest, as between two ports of a switch (OVS-DPDK's
  usual place).
- On port 1, a second built-in guest with the built-in front-end plays the
  wire: its RX ring is where the lab's frames land (``wire.captured``), its TX
  ring is how frames are injected.
- The relay (``vhostlab.backend.relay``) records the lab's messages and its
  observer (``vhostlab.backend.observe``) keeps what the front-end told DPDK,
  so the snapshot shows memory, rings and log; the observer's docstring says
  which numbers DPDK keeps to itself.

``break_logging``: DPDK logs correctly, so the negative control is a relay
that drops VHOST_F_LOG_ALL from SET_FEATURES: DPDK is never asked to log.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Callable

from vhostlab.backend.dpdk import DpdkVhostBackend
from vhostlab.backend.observe import ObservedDevice
from vhostlab.backend.relay import VhostUserRelay, strip_log_all
from vhostlab.backend.trace import freeze
from vhostlab.frontend import BuiltinVirtioNetGuest, VhostDev, VhostOps

from .base import wait_until

__all__ = ["DpdkLabBackend", "PeerWire"]

PEER_RAM = 16 << 20
_FAILURE = re.compile(r"fail|invalid|error|refus|too (big|large|many)|not supported",
                      re.IGNORECASE)         # the wire's guest: RX buffers and a TX ring, nothing more


class PeerWire:
    """The far side of testpmd's port pair: a built-in guest on port 1.

    ``captured``: the frames the lab's guest transmitted that reached it,
    oldest first, read from its RX ring at each access (buffers are posted
    again). ``transmit(frames)``: frames into port 1, towards the lab's guest.
    """

    name = "DPDK testpmd: port 1, a second guest"

    def __init__(self, socket_path: str) -> None:
        self.dev = VhostDev(VhostOps.connect(socket_path))
        self.guest = BuiltinVirtioNetGuest(ram_size=PEER_RAM)
        self._captured: list[bytes] = []
        self._lock = threading.Lock()
        self.dev.vhost_dev_init()
        self.guest.negotiate(self.dev.features)
        self.dev.vhost_net_start(self.guest)
        self.guest.post_rx_buffers()

    @property
    def captured(self) -> list[bytes]:
        with self._lock:
            frames = self.guest.receive()
            if frames:
                self.guest.post_rx_buffers(len(frames))
                self._captured += frames
            return list(self._captured)

    def transmit(self, frames: list[bytes]) -> int:
        with self._lock:
            self.guest.reap(1)
            return self.guest.transmit(frames)

    def close(self) -> None:
        try:
            self.dev.vhost_dev_cleanup()
        finally:
            self.guest.close()


class DpdkLabBackend:
    """testpmd's vhost port, shaped like the parts of a ``BackendServer`` the labs use.

    ``socket_path``: where the lab's front-end connects (the relay's socket).
    Started by the constructor; :meth:`stop` stops everything it started.
    """

    name = "dpdk"

    def __init__(self, socket_path: str, *, break_logging: bool = False) -> None:
        self.socket_path, self.break_logging = socket_path, break_logging
        self.workdir = tempfile.mkdtemp(prefix="vhostlab-dpdk-")
        self.dpdk: DpdkVhostBackend | None = None
        self.relay: VhostUserRelay | None = None
        self.wire: PeerWire | None = None
        self.device = ObservedDevice("dpdk", wire=PeerWire.name, socket_path=socket_path)
        self._sent_to_guest = 0
        try:
            self.dpdk = DpdkVhostBackend(os.path.join(self.workdir, "port0.sock"),
                                         peer_socket=os.path.join(self.workdir, "port1.sock"))
            self.wire = PeerWire(self.dpdk.peer_socket)
            self.relay = VhostUserRelay(socket_path, self.dpdk.socket_path,
                                        observer=self.device,
                                        rewrite=strip_log_all if break_logging else None)
            self.relay.start()
        except BaseException:
            self.stop()
            raise

    # -- what BackendServer offers -------------------------------------------------
    def start(self) -> "DpdkLabBackend":
        return self                       # listening since the constructor

    @property
    def trace(self):
        return self.relay.trace

    @property
    def running(self) -> bool:
        return self.dpdk is not None and self.dpdk.proc is not None \
            and self.dpdk.proc.poll() is None

    @property
    def connected(self) -> bool:
        return self.relay is not None and self.relay.connected

    def inject(self, frames) -> int:
        """Frames from the wire towards the guest: the port-1 guest transmits them and
        testpmd forwards them to port 0. A frame that finds no RX buffer there is
        dropped by DPDK (testpmd counts it); nothing is kept for later."""
        frames = list(frames)
        self._sent_to_guest += len(frames)
        return self.wire.transmit(frames)

    def snapshot(self, descriptors: bool = False, trace: bool = True):
        """The device as its front-end configured it (see vhostlab.backend.observe)."""
        self.device.connected = self.connected
        records = self.relay.trace.records()
        errors = tuple(f"{r.request}: {r.error}" for r in records if r.error)
        snap = self.device.snapshot(records if trace else (),
                                    {"errors": tuple(self.device.errors) + errors
                                     + self.dpdk_errors(),
                                     "injected": self._sent_to_guest})
        # Frames each ring returned: its used->idx, read in guest memory.
        used = {v.index: v.used_idx or 0 for v in snap.vrings}
        counters = dict(snap.counters, guest_rx_frames=used.get(0, 0),
                        guest_tx_frames=used.get(1, 0))
        return dataclasses.replace(snap, counters=freeze(counters))

    def wait_for(self, predicate: Callable, timeout: float = 10.0) -> bool:
        """Wait until ``predicate(snapshot)`` holds (BackendServer.wait_for)."""
        return wait_until(lambda: predicate(self.snapshot(trace=False)), timeout)

    def output(self) -> str:
        """What testpmd printed so far (its own log of the vhost-user messages)."""
        return self.dpdk.output() if self.dpdk else ""

    def dpdk_errors(self) -> tuple[str, ...]:
        """DPDK's own words for each refusal on the lab's port, from testpmd's log:
        one entry per run of consecutive failure lines ("invalid virtqueue size
        100; processing VHOST_USER_SET_VRING_NUM failed; ...")."""
        port = f"({self.dpdk.socket_path}) " if self.dpdk else None
        runs, run = [], []
        for line in self.output().splitlines():
            if not port or port not in line:
                continue
            text = line.split(port, 1)[1].strip().rstrip(".")
            if _FAILURE.search(text):
                run.append(text)
            elif run:
                runs.append("DPDK: " + "; ".join(run))
                run = []
        if run:
            runs.append("DPDK: " + "; ".join(run))
        return tuple(runs)

    def stop(self) -> None:
        """Stop the relay, the wire's front-end and guest, and testpmd; raises the
        first error met, after stopping the rest."""
        errors = []
        for part in (self.relay, self.wire, self.dpdk, self.device):
            if part is not None:
                try:
                    part.close()
                except Exception as exc:       # keep stopping the rest
                    errors.append(exc)
        self.relay = self.wire = self.dpdk = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        deadline = time.monotonic() + 1
        while os.path.exists(self.socket_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        if errors:
            raise errors[0]

    close = stop

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<DpdkLabBackend {self.socket_path} (testpmd, {state})>"
