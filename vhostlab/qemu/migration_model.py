"""What a real-QEMU live migration is asked to do and what it reports.

The data of :mod:`.migration`, apart from the code that runs it:
:class:`MigrationConfig` (how to migrate), :class:`ProgressEvent` and
:class:`MigrationProgress` (what the labs' views see while it runs),
:class:`MigrationResult` (what it did, and whether every frame survived).
Its pre-copy rounds are :class:`~.rounds.PrecopyRound` s, made by
:class:`~.rounds.RoundTracker`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .errors import QemuError
from .launcher import DEFAULT_RAM_SIZE
from .rounds import PrecopyRound
from .traffic import FROM_GUEST, TO_GUEST
from .verify import VerifyReport

__all__ = ["BACKENDS", "MigrationConfig", "ProgressEvent", "MigrationProgress", "MigrationResult",
           "MigrationFailedError"]


#: Whose back-ends serve the two hosts.
BACKENDS = ("vhostlab", "dpdk")


class MigrationFailedError(QemuError):
    """The migration did not complete (QEMU said failed, or it did not finish in time)."""


@dataclass(frozen=True)
class MigrationConfig:
    """How to migrate. Bandwidth in bytes/s, downtime in ms, times in s.

    ``busy_syncs``: the guest keeps dirtying memory until dirty-sync-count
    reaches this. ``working_set`` / ``dirty_rate``: how much guest RAM it
    rewrites, how fast. ``rx_burst`` / ``tx_burst`` frames go each way every
    ``burst_interval``. ``destination_uri`` replaces the destination QEMU's
    own (to show a destination that never comes up). ``rx_at_stop``: RX
    frames the source back-end writes as GET_VRING_BASE arrives, after QEMU's
    last bitmap sync (only the final sync reports them). ``skip_final_sync``
    emulates a front-end that skips vhost_log_put's final sync (QEMU has no
    such switch): the source back-end discards its log marks as the rings
    stop, so that sync finds nothing (switchover.StopWindow).
    ``source_handlers``: request -> handler entries the source back-end uses
    instead of its own (``BackendServer(handlers=...)``), e.g. an exercise's
    SET_LOG_BASE.
    ``backend``: "vhostlab" (the kit's back-ends, in this process) or "dpdk"
    (DPDK's, each a testpmd behind a recording relay: :mod:`.dpdk_side`;
    ``rx_at_stop``, ``skip_final_sync`` and ``source_handlers`` act inside
    the kit's back-end and are refused there).
    """

    ram_size: int = DEFAULT_RAM_SIZE
    max_bandwidth: int = 2 << 20
    downtime_limit: int = 10
    busy_syncs: int = 4
    working_set: int = 1 << 20
    dirty_rate: int = 3 << 20
    rx_burst: int = 8
    tx_burst: int = 4
    burst_interval: float = 0.2
    tick: float = 0.02
    warm_up_frames: int = 16
    after_frames: int = 16
    break_logging: bool = False
    rx_at_stop: int = 0
    skip_final_sync: bool = False
    timeout: float = 60.0
    qemu: str | None = None
    destination_uri: str | None = None
    source_handlers: Mapping | None = None
    backend: str = "vhostlab"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: expected one of {BACKENDS}")
        inside = [name for name, on in (("rx_at_stop", self.rx_at_stop),
                                        ("source_handlers", self.source_handlers)) if on]
        if self.backend == "dpdk" and inside:
            raise ValueError(f"{', '.join(inside)} act inside vhostlab's back-end; "
                             "DPDK's cannot take them (backend='dpdk')")


@dataclass(frozen=True)
class ProgressEvent:
    """Something happened: ``kind`` is phase, round, messages, event or frames."""

    kind: str
    text: str
    data: object = None


@dataclass(frozen=True)
class MigrationProgress:
    """A consistent picture of a migration in progress (what the labs' views poll)."""

    phase: str
    status: str
    dirty_sync_count: int
    rounds: tuple[PrecopyRound, ...]
    events: tuple[dict, ...]
    last_query: dict
    error: str | None
    elapsed: float
    done: bool


@dataclass
class MigrationResult:
    """What a migration did and whether every frame survived it."""

    status: str = "not started"
    qemu_version: str = ""
    config: MigrationConfig = field(default_factory=MigrationConfig)
    rounds: tuple[PrecopyRound, ...] = ()
    final_query: dict = field(default_factory=dict)
    events: tuple[dict, ...] = ()
    to_guest: dict = field(default_factory=dict)
    from_guest: dict = field(default_factory=dict)
    verify: VerifyReport | None = None
    ops_called: list = field(default_factory=list)
    pages_logged: int = 0
    rarp_frames: int = 0
    resources: dict = field(default_factory=dict)
    wall_time: float = 0.0
    error: str | None = None
    notes: list = field(default_factory=list)
    # With DPDK: what the kit cannot read from a back-end it did not write
    # (name -> why), and testpmd's own totals per side, read as it stopped.
    unavailable: dict = field(default_factory=dict)
    dpdk_totals: dict = field(default_factory=dict)

    @property
    def _checked(self) -> tuple[dict, ...]:
        # With DPDK every frame is a guest TX frame that testpmd sends back.
        if self.config.backend == "dpdk":
            return (self.from_guest,)
        return (self.to_guest, self.from_guest)

    @property
    def dirty_sync_count(self) -> int:
        return int(self.final_query.get("ram", {}).get("dirty-sync-count", 0))

    @property
    def integrity_ok(self) -> bool:
        """Completed, nothing lost, corrupted or duplicated, ring positions handed over."""
        ok_frames = all(d.get("sent", 0) and not (d["lost"] or d["corrupted"] or d["duplicated"])
                        for d in self._checked)
        return (self.status == "completed" and self.error is None and ok_frames
                and self.verify is not None and self.verify.ok)

    @property
    def integrity(self) -> str:
        """"ok", "corrupted", or "not checked" (the migration did not complete)."""
        if self.integrity_ok:
            return "ok"
        return "corrupted" if self.status == "completed" and self.verify else "not checked"

    def summary(self) -> dict:
        """The JSON summary (the built-in demo's fields plus the real QEMU's numbers)."""
        directions = {TO_GUEST: self.to_guest, FROM_GUEST: self.from_guest}
        keys = ("sent", "delivered", "lost", "corrupted", "duplicated")
        frames = {k: sum(d.get(k, 0) for d in directions.values()) for k in keys}
        q = self.final_query
        completed = self.status == "completed"
        return {
            "frontend": "qemu",
            "backend": self.config.backend,
            "qemu_version": self.qemu_version,
            "migration": {"status": self.status, "rounds": len(self.rounds),
                          "max_bandwidth": self.config.max_bandwidth,
                          "downtime_limit": self.config.downtime_limit,
                          "transferred": q.get("ram", {}).get("transferred"),
                          "per_round": [r.summary() for r in self.rounds],
                          "error": self.error},
            # QEMU reads the vhost log at every bitmap sync, and once more in
            # vhost_log_put when vhost_dev_stop stops the device.
            "vhost_log": {"pages_logged": self.pages_logged,
                          "syncs": self.dirty_sync_count + (1 if completed else 0)},
            "frames": frames,
            "frames_by_direction": {k: dict(v) for k, v in directions.items()},
            "integrity": self.integrity,
            "ops_called": list(self.ops_called),
            "dirty_sync_count": self.dirty_sync_count,
            "total_time_ms": q.get("total-time"),
            "downtime_ms": q.get("downtime"),
            "break_logging": self.config.break_logging,
            "skip_final_sync": self.config.skip_final_sync,
            "vring_handoff": self.verify.handoff if self.verify else {},
            "rarp_frames": self.rarp_frames,
            "driver_errors": list(self.verify.driver_errors) if self.verify else [],
            # The RX frames the source back-end wrote and the guest had not read, as
            # the destination's used ring and RAM hold them (all three equal when ok).
            "rx_check": ({"expected": self.verify.rx_expected, "found": self.verify.rx_found,
                          "intact": self.verify.rx_intact} if self.verify else {}),
            "events": list(self.events),
            "notes": list(self.notes),
            "resources": dict(self.resources),
            "wall_time_s": round(self.wall_time, 3),
            **({"unavailable": dict(self.unavailable), "dpdk_totals": dict(self.dpdk_totals)}
               if self.config.backend == "dpdk" else {}),
        }
