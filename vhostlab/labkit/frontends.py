"""Who plays QEMU's part in a lab: a real QEMU, or the kit's built-in front-end.

Everything the labs do differently on the two is a method of :class:`Frontend`;
:class:`QemuFrontend` and :class:`BuiltinFrontend` implement it, and the
rest of the lab kit (``Lab``, ``LabDevice``, ``LoggingWindow``,
``LabMigration``) asks the one it was given instead of testing a name.
:func:`frontend_named` turns the name a lab holds (``"qemu"`` or
``"builtin"``, from VHOSTLAB_FRONTEND or doctor) into its front-end.
"""
from __future__ import annotations

import re
from typing import Any, Protocol, runtime_checkable

from .base import RAM_SIZE, LabSetupError, wait_until
from .device import LabDevice

__all__ = ["Frontend", "QemuFrontend", "BuiltinFrontend", "RX_AT_STOP", "frontend_named"]

#: RX frames a real QEMU's source back-end writes as its rings stop (see LabMigration).
RX_AT_STOP = 8


@runtime_checkable
class Frontend(Protocol):
    """What the labs need from whoever plays QEMU's part (one object per front-end)."""

    name: str                                   # "qemu" or "builtin"

    def who(self, qemu: dict | None) -> str:
        """Who plays QEMU's part, in words (``qemu``: doctor's QEMU info)."""

    def version(self, qemu: dict | None) -> tuple[int, ...] | None:
        """The real QEMU's version as numbers, or None."""

    def start_device(self, lab: Any, backend: Any, label: str) -> LabDevice:
        """Attach this front-end to ``backend`` and start the device (DRIVER_OK);
        register with ``lab`` what ``lab.close()`` must stop."""

    def receive(self, guest: Any, timeout: float) -> list[bytes]:
        """Frames received into ``guest``'s RX buffers, waiting up to ``timeout`` s;
        the buffers are posted again."""

    def bands(self, guest: Any) -> list:
        """The guest's rings and buffers as labelled bands of pages, for DirtyRound."""

    def call_view(self, device: LabDevice, title: str | None) -> Any:
        """The vhost.c calls of ``device``'s front-end, with the messages each sent."""

    def logging_start(self, device: LabDevice, bandwidth: int) -> None:
        """Make the front-end run ``vhost_log_global_start`` on ``device``."""

    def logging_stop(self, device: LabDevice) -> None:
        """Make the front-end run ``vhost_log_global_stop`` on ``device``."""

    def new_migration(self, break_logging: bool, skip_final_sync: bool,
                      backend: str = "vhostlab") -> Any:
        """A live migration not yet started (``run()`` runs it; see LabMigration),
        between two back-ends of kind ``backend`` ("vhostlab" or "dpdk")."""

    def migration_summary(self, result: Any) -> dict:
        """The JSON summary of what the migration's ``run()`` returned."""

    def migration_rounds(self, migration: Any) -> list:
        """The per-round snapshots of ``migration`` so far."""

    def migration_trace(self, migration: Any, side: str) -> tuple:
        """Every message the ``side`` ("source" or "destination") back-end got and sent."""

    def migration_call_view(self, migration: Any, side: str, title: str) -> Any:
        """The vhost.c calls of one side's front-end, with their messages."""

    def stepper(self, qemu: dict | None, **kwargs: Any) -> Any:
        """A QemuStepper (not started), or None where there is no QEMU to step."""


class QemuFrontend:
    """A real ``qemu-system-x86_64``, its guest driven over qtest (``vhostlab.qemu``)."""

    name = "qemu"

    def who(self, qemu: dict | None) -> str:
        return f"a real QEMU ({qemu['path']}, version {qemu['version']})"

    def version(self, qemu: dict | None) -> tuple[int, ...] | None:
        found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str((qemu or {}).get("version") or ""))
        return tuple(int(x) for x in found.groups() if x is not None) if found else None

    def start_device(self, lab: Any, backend: Any, label: str) -> LabDevice:
        # QEMU connects to the back-end; the guest driver (over qtest) brings
        # virtio-net to DRIVER_OK, whereupon QEMU runs vhost_dev_start.
        from vhostlab.qemu import QemuInstance, vhost_user_netdev
        qemu = QemuInstance(vhost_user_netdev(backend.socket_path), ram_size=RAM_SIZE, name=label)
        lab.own(qemu, qemu.close, label, alive=qemu.alive)
        return LabDevice(self, backend, qemu.start().guest(), qemu=qemu)

    def receive(self, guest: Any, timeout: float) -> list[bytes]:
        return guest.receive(timeout=timeout)

    def bands(self, guest: Any) -> list:
        from vhostlab.qemu.rounds import qemu_bands
        return qemu_bands(guest)

    def call_view(self, device: LabDevice, title: str | None) -> Any:
        from vhostlab.viz import CallTimelineView
        return CallTimelineView.inferred(device.backend_trace(), title=title or
                                         "Calls and messages (inferred from the trace)")

    def logging_start(self, device: LabDevice, bandwidth: int) -> None:
        # A migration into a socket nobody reads: it stays in progress, and QEMU
        # keeps logging on, until migrate_cancel (vhostlab.qemu.sink).
        from vhostlab.qemu.sink import migrate_to_sink
        device.migration_sink = migrate_to_sink(device.qemu, bandwidth)

    def logging_stop(self, device: LabDevice) -> None:
        from vhostlab.qemu.sink import cancel_migration
        sink, device.migration_sink = device.migration_sink, None
        cancel_migration(device.qemu, sink)

    def new_migration(self, break_logging: bool, skip_final_sync: bool,
                      backend: str = "vhostlab") -> Any:
        from vhostlab.qemu.migration import MigrationConfig, QemuMigration
        # DPDK's back-end cannot write RX frames as its rings stop (StopWindow
        # needs the kit's): there the echoed traffic fills that window.
        config = MigrationConfig(ram_size=RAM_SIZE, break_logging=break_logging,
                                 rx_at_stop=RX_AT_STOP if backend == "vhostlab" else 0,
                                 skip_final_sync=skip_final_sync, backend=backend)
        return QemuMigration(config, keep=True)   # keep: traces stay readable

    def migration_summary(self, result: Any) -> dict:
        return result.summary()

    def migration_rounds(self, migration: Any) -> list:
        return list(migration.progress().rounds)

    def migration_trace(self, migration: Any, side: str) -> tuple:
        host = migration.src if side == "source" else migration.dst
        return host.trace() if host else ()

    def migration_call_view(self, migration: Any, side: str, title: str) -> Any:
        from vhostlab.viz import CallTimelineView
        return CallTimelineView.inferred(self.migration_trace(migration, side),
                                         title=title + " (inferred from the trace)")

    def stepper(self, qemu: dict | None, **kwargs: Any) -> Any:
        from vhostlab.qemu.stepper import QemuStepper
        from vhostlab.viz import CallTimelineView
        kwargs.setdefault("qemu", (qemu or {}).get("path"))
        return QemuStepper(timeline_view=CallTimelineView, **kwargs)


class BuiltinFrontend:
    """The kit's own front-end in Python (``vhostlab.frontend``): VhostDev, VhostOps and
    a memfd guest."""

    name = "builtin"

    def who(self, qemu: dict | None) -> str:
        return "the built-in Python front-end (vhostlab.frontend)"

    def version(self, qemu: dict | None) -> tuple[int, ...] | None:
        return None

    def start_device(self, lab: Any, backend: Any, label: str, *, ring: str = "split",
                     queue_size: int = 256) -> LabDevice:
        # vhost_dev_init and vhost_net_start of the built-in front-end.
        from vhostlab.frontend import BuiltinVirtioNetGuest, VhostDev, VhostOps
        vhost_dev = VhostDev(VhostOps.connect(backend.socket_path))
        guest = BuiltinVirtioNetGuest(ram_size=RAM_SIZE, queue_size=queue_size, ring=ring)
        device = LabDevice(self, backend, guest, vhost_dev=vhost_dev)
        lab.own(device, device.close, label)
        vhost_dev.vhost_dev_init()
        guest.negotiate(vhost_dev.features)
        vhost_dev.vhost_net_start(guest)
        return device

    def receive(self, guest: Any, timeout: float) -> list[bytes]:
        frames = guest.receive()
        if frames:
            guest.post_rx_buffers(len(frames))
        else:
            guest.wait_call(0, timeout)     # sleeps on the call eventfd
        return frames

    def bands(self, guest: Any) -> list:
        from vhostlab.frontend.migration import builtin_bands
        return builtin_bands(guest)

    def call_view(self, device: LabDevice, title: str | None) -> Any:
        from vhostlab.viz import CallTimelineView
        return CallTimelineView(device.vhost_dev, title=title or "Calls and messages")

    def logging_start(self, device: LabDevice, bandwidth: int) -> None:
        device.vhost_dev.vhost_log_global_start()

    def logging_stop(self, device: LabDevice) -> None:
        device.vhost_dev.vhost_log_global_stop()

    def new_migration(self, break_logging: bool, skip_final_sync: bool,
                      backend: str = "vhostlab", ring: str = "split") -> Any:
        from vhostlab.frontend import BuiltinMigration
        return BuiltinMigration(ram_size=RAM_SIZE, break_logging=break_logging,
                                skip_final_sync=skip_final_sync, backend=backend, ring=ring)

    def migration_summary(self, result: Any) -> dict:
        return result

    def migration_rounds(self, migration: Any) -> list:
        return list(migration.snapshots)

    def migration_trace(self, migration: Any, side: str) -> tuple:
        return (migration.src if side == "source" else migration.dst).server.trace.records()

    def migration_call_view(self, migration: Any, side: str, title: str) -> Any:
        from vhostlab.viz import CallTimelineView
        dev = (migration.src if side == "source" else migration.dst).dev
        return CallTimelineView(dev, title=title)

    def stepper(self, qemu: dict | None, **kwargs: Any) -> Any:
        return None                     # there is no QEMU to step


#: The front-end names a lab may hold, and their front-ends.
_FRONTENDS: dict[str, Frontend] = {"qemu": QemuFrontend(), "builtin": BuiltinFrontend()}


def frontend_named(name: str) -> Frontend:
    """The front-end called ``name``; LabSetupError for any other name."""
    try:
        return _FRONTENDS[name]
    except KeyError:
        raise LabSetupError(f"frontend={name!r}: expected 'qemu' or 'builtin'") from None
