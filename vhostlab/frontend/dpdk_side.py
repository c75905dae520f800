"""DPDK's vhost back-end as one side of the built-in migration.

testpmd (``vhostlab.backend.dpdk``) behind a recording relay
(``vhostlab.backend.relay``), so the messages the built-in front-end
exchanges with it are traced as with the kit's own back-end.
"""
from __future__ import annotations

import os
import tempfile

from vhostlab.backend.dpdk import DpdkVhostBackend
from vhostlab.backend.relay import VhostUserRelay

__all__ = ["DpdkSide"]


class DpdkSide:
    """A DPDK back-end behind a recording relay, shaped like the parts of a
    ``BackendServer`` the migration uses: ``start``, ``socket_path`` (the
    relay's), ``trace``, ``stop``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.workdir = tempfile.mkdtemp(prefix="vhostlab-dpdk-")
        os.chmod(self.workdir, 0o700)
        self.dpdk: DpdkVhostBackend | None = None
        self.relay: VhostUserRelay | None = None
        self.socket_path = os.path.join(self.workdir, "relay.sock")

    @property
    def trace(self):
        return self.relay.trace if self.relay else None

    def start(self) -> "DpdkSide":
        self.dpdk = DpdkVhostBackend(os.path.join(self.workdir, "dpdk.sock"))
        self.relay = VhostUserRelay(self.socket_path, self.dpdk.socket_path).start()
        return self

    def stop(self) -> None:
        for part in (self.relay, self.dpdk):
            if part is not None:
                part.close()
        self.relay = self.dpdk = None
        try:
            os.rmdir(self.workdir)
        except OSError:
            pass
