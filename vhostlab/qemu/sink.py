"""A migration that stays in progress until it is cancelled: QEMU's stream into a
socket nobody reads.

QEMU logs dirty pages only while a migration runs: ``vhost_log_global_start``
when it starts, ``vhost_log_global_stop`` when it ends or is cancelled. To
show logging on a running device, the labs' logging window and the stepper
start a migration that must not end before they cancel it.

A slow ``max-bandwidth`` into ``exec:cat > /dev/null`` is not enough: QEMU
10.0 sends a mostly-zero guest's RAM as zero-page markers in about a second
whatever the limit (548 KB in 1.2 s at 16 KiB/s, measured), completes the
migration, stops the VM (GET_VRING_BASE on every ring) and clears the log in
its last sync, so a learner's window closes by itself mid-cell.

:class:`MigrationSink` is a unix socket that listens and never accepts. QEMU
connects (the connection waits in the backlog) and writes until the socket's
buffer is full (the sender's ``SO_SNDBUF``, about 200 KiB); then its migration
thread waits in that write. No further iteration starts, so no further dirty
sync clears the back-end's marks, and the VM keeps running. ``migrate_cancel``
shuts the socket down, the write fails, the migration ends ``cancelled`` and
QEMU runs ``vhost_log_global_stop``.
"""
from __future__ import annotations

import os
import socket
import time

from vhostlab.backend.transport import listen_unix

from .errors import QemuError

__all__ = ["MigrationSink", "migrate_to_sink", "cancel_migration"]


class MigrationSink:
    """A listening unix socket at ``path`` that accepts nothing; ``uri`` is for QMP migrate."""

    def __init__(self, path: str):
        self.path = path
        self._sock: socket.socket | None = listen_unix(path, backlog=1)

    @property
    def uri(self) -> str:
        return "unix:" + self.path

    def close(self) -> None:
        """Close the socket (a connection still waiting in its backlog is reset) and remove it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def migrate_to_sink(qemu, bandwidth: int) -> MigrationSink:
    """Start a migration of ``qemu`` (a QemuInstance) into a new sink in its work
    directory, at most ``bandwidth`` bytes/s; returns the sink (see cancel_migration)."""
    sink = MigrationSink(os.path.join(qemu.workdir, "sink.sock"))
    try:
        qemu.qmp.migrate_set_parameters(max_bandwidth=bandwidth)
        qemu.qmp.migrate(sink.uri)
    except BaseException:
        sink.close()
        raise
    return sink


def cancel_migration(qemu, sink: MigrationSink | None, timeout: float = 10.0) -> str:
    """``migrate_cancel``, wait until the migration is over, close ``sink``; returns
    the migration's last status (``cancelled``, or ``failed`` if it broke first).
    Raises QemuError if it is still running after ``timeout`` seconds."""
    try:
        qmp = qemu.qmp
        qmp.execute("migrate_cancel")
        deadline = time.monotonic() + timeout
        while True:
            status = qmp.query_migrate().get("status")
            if status in ("cancelled", "completed", "failed"):
                return status
            if time.monotonic() > deadline:
                raise QemuError(f"the migration is still {status!r} {timeout} s after "
                                "migrate_cancel")
            time.sleep(0.05)
    finally:
        if sink is not None:
            sink.close()
