"""One side of a built-in migration whose back-ends are DPDK's.

``BuiltinMigration(backend="dpdk")`` puts a :class:`DpdkSide` where a
vhostlab ``BackendServer`` would be: testpmd's vhost port behind a recording
relay, whose observer keeps what the front-end told DPDK and copies the rings
at the switch-over (``SwitchoverRecorder.observer``).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from vhostlab.backend.dpdk import DpdkVhostBackend
from vhostlab.backend.observe import ObservedDevice
from vhostlab.backend.relay import VhostUserRelay
from vhostlab.backend.trace import MessageTrace
from vhostlab.switchover import SwitchoverRecorder

__all__ = ["BACKENDS", "DpdkSide"]

BACKENDS = ("vhostlab", "dpdk")


def _ignore_log(words: np.ndarray) -> np.ndarray:
    """A log sync that clears the log and reports no page dirty."""
    words[:] = 0
    return np.zeros(0, np.int64)


class DpdkSide:
    """A DPDK back-end behind a recording relay, shaped like the parts of a
    ``BackendServer`` the migration uses: ``start``, ``socket_path`` (the
    relay's), ``trace``, ``stop``. ``device``: the relay's observer of what the
    front-end told DPDK (a new ObservedDevice if None)."""

    def __init__(self, name: str, switchover: SwitchoverRecorder | None = None,
                 device: ObservedDevice | None = None) -> None:
        self.name = name
        self.workdir = tempfile.mkdtemp(prefix="vhostlab-dpdk-")
        os.chmod(self.workdir, 0o700)
        self.dpdk: DpdkVhostBackend | None = None
        self.relay: VhostUserRelay | None = None
        self.device = device if device is not None else ObservedDevice("dpdk")
        self.observer = switchover.observer(self.device, name) if switchover else self.device
        self.trace = MessageTrace()         # kept after stop, for the labs to read
        self.socket_path = os.path.join(self.workdir, "relay.sock")

    def start(self) -> "DpdkSide":
        self.dpdk = DpdkVhostBackend(os.path.join(self.workdir, "dpdk.sock"))
        self.relay = VhostUserRelay(self.socket_path, self.dpdk.socket_path, self.trace,
                                    observer=self.observer).start()
        return self

    def stop(self) -> None:
        for part in (self.relay, self.dpdk, self.device):
            if part is not None:
                part.close()
        self.relay = self.dpdk = None
        try:
            os.rmdir(self.workdir)
        except OSError:
            pass
