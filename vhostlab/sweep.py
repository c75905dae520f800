"""A live-migration sweep: max-bandwidth x the guest's dirty rate x downtime-limit.

Theory of operation
-------------------
Pre-copy copies guest RAM in rounds while the guest runs. After each round
QEMU syncs the dirty bitmap (the guest's writes, and the vhost log for the
pages the back-end wrote) and asks whether what is still dirty could be sent
within ``downtime-limit`` at the bandwidth it measured: if so it stops the
guest and sends the rest (migration/migration.c: ``migration_update_counters()``
sets ``threshold_size = bandwidth * downtime_limit`` from the bandwidth it
measured, and ``migration_iteration_run()`` completes once ``pending_size``
is 0 or below it). If the guest dirties pages faster than they can be sent,
that never happens: pre-copy does not converge, and QEMU keeps copying until
someone cancels it (or switches to post-copy, or auto-converge throttles the
guest; this kit uses neither).

:func:`run_point` runs one migration:

* ``frontend="qemu"``: two real QEMUs (:class:`vhostlab.qemu.migration.
  QemuMigration`). The guest (driven over qtest) rewrites a 1 MiB working set
  at ``dirty_rate`` bytes/s and frames flow both ways; QEMU makes every
  decision. The guest never goes quiet on its own (``busy_syncs`` is set far
  out of reach), so a setting that does not converge runs until ``give_up_s``,
  when the kit cancels it (``migrate_cancel``) and reports
  ``MigrationFailedError: migration not finished after ... (status active)``.
* ``frontend="builtin"``: the kit's built-in migration
  (:class:`vhostlab.frontend.migration.BuiltinMigration`) driven phase by
  phase. It copies pages and moves frames for real, but it has no network,
  no bandwidth and no downtime limit of its own: here a round's *duration* is
  modelled as ``pages * 4096 / max_bandwidth``, the guest moves
  ``dirty_rate / FRAME_BYTES`` frames each way per modelled second (the
  back-end writes the RX ones: the vhost log reports them), and QEMU's rule
  above decides when to stop. After ``max_rounds`` rounds it gives up, as
  the QEMU run gives up after ``give_up_s``. Times are the model's, page
  and log counts are real.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from vhostlab.memory import TARGET_PAGE_SIZE

__all__ = ["SweepPoint", "SweepResult", "default_grid", "run_point", "sweep", "plot_sweep",
           "TARGET_PAGE_SIZE", "FRAME_BYTES"]

FRAME_BYTES = 2048          # one RX buffer of the built-in guest per frame (guest.BUF_SIZE)
RX_CHUNK = 128              # frames per burst: the RX ring (256) never fills up


@dataclass(frozen=True)
class SweepPoint:
    """One setting: bandwidth in bytes/s, the guest's dirty rate in bytes/s, downtime in ms."""

    max_bandwidth: int
    dirty_rate: int
    downtime_limit: int

    @property
    def threshold_pages(self) -> float:
        """What QEMU may send with the guest stopped: bandwidth x downtime-limit, in pages."""
        return self.max_bandwidth * self.downtime_limit / 1000 / TARGET_PAGE_SIZE

    def label(self) -> str:
        return (f"{self.max_bandwidth / 2**20:g} MiB/s, dirty {self.dirty_rate / 2**20:g} MiB/s, "
                f"{self.downtime_limit} ms")


@dataclass(frozen=True)
class SweepResult:
    """What one migration did. ``dirty_pages`` per round: what the sync before it found."""

    point: SweepPoint
    frontend: str
    converged: bool
    status: str                 # completed, cancelled, failed
    rounds: int
    total_time_ms: float | None
    downtime_ms: float | None
    pages_logged: int           # pages the vhost log reported over the whole migration
    log_pages_per_round: tuple[int, ...]
    dirty_pages: tuple[int, ...]
    integrity: str
    error: str | None = None
    wall_s: float = 0.0
    notes: tuple[str, ...] = field(default=())

    def row(self) -> str:
        t = "-" if self.total_time_ms is None else f"{self.total_time_ms:8.0f}"
        d = "-" if self.downtime_ms is None else f"{self.downtime_ms:6.0f}"
        return (f"{self.point.label():40} {'yes' if self.converged else 'NO':>9} "
                f"{self.rounds:6} {t:>8} {d:>8} {self.pages_logged:8}  {self.status}, "
                f"integrity {self.integrity}")


def default_grid(frontend: str) -> list[SweepPoint]:
    """Two values of each knob: 8 runs, chosen so some converge and some do not."""
    if frontend == "qemu":
        bandwidths, rates, downtimes = (2 << 20, 32 << 20), (512 << 10, 4 << 20), (10, 300)
    else:
        bandwidths, rates, downtimes = (1 << 20, 16 << 20), (64 << 10, 1 << 20), (10, 300)
    return [SweepPoint(b, r, d) for b, r, d in itertools.product(bandwidths, rates, downtimes)]


def run_point(point: SweepPoint, frontend: str, *, give_up_s: float = 8.0,
              max_rounds: int = 12, qemu: str | None = None) -> SweepResult:
    """One migration at ``point`` with a real QEMU or the built-in front-end.

    ``give_up_s`` must stay above the kit's 5 s wait for a burst of frames: a run
    that converges while a burst is in flight waits that long for frames the
    stopped source will never deliver, and must not be cancelled meanwhile."""
    t0 = time.monotonic()
    if frontend == "qemu":
        result = _run_qemu(point, give_up_s, qemu)
    elif frontend == "builtin":
        result = _run_builtin(point, max_rounds)
    else:
        raise ValueError(f"frontend must be 'qemu' or 'builtin', not {frontend!r}")
    return _with(result, wall_s=round(time.monotonic() - t0, 2))


def sweep(points, frontend: str, *, on_result=None, **kwargs) -> list[SweepResult]:
    """run_point for each point, in order; ``on_result(result)`` after each."""
    out = []
    for point in points:
        out.append(run_point(point, frontend, **kwargs))
        if on_result is not None:
            on_result(out[-1])
    return out


def _with(result: SweepResult, **changes) -> SweepResult:
    from dataclasses import replace
    return replace(result, **changes)


# -- a real QEMU ---------------------------------------------------------------------
def _run_qemu(point: SweepPoint, give_up_s: float, qemu: str | None) -> SweepResult:
    from vhostlab.qemu.migration import MigrationConfig, QemuMigration

    config = MigrationConfig(max_bandwidth=point.max_bandwidth, dirty_rate=point.dirty_rate,
                             downtime_limit=point.downtime_limit, busy_syncs=10_000,
                             timeout=give_up_s, qemu=qemu)
    r = QemuMigration(config).run()
    s = r.summary()
    converged = r.status == "completed"
    # What each sync after the first found dirty: the pages QEMU sent in the round it
    # opened (query-migrate's "remaining" is read too late: QEMU is already sending).
    dirty = tuple(x.pages_sent for x in r.rounds[1:])
    if not converged and len(dirty) > 1:
        dirty = dirty[:-1]              # the round migrate_cancel cut short
    return SweepResult(point, "qemu", converged, r.status if converged else
                       ("cancelled" if "not finished" in (r.error or "") else r.status),
                       len(r.rounds), s["total_time_ms"], s["downtime_ms"], r.pages_logged,
                       tuple(x.pages_logged for x in r.rounds), dirty, r.integrity, r.error,
                       notes=tuple(r.notes))


# -- the built-in front-end, with a modelled link -------------------------------------
def _run_builtin(point: SweepPoint, max_rounds: int) -> SweepResult:
    from vhostlab.frontend.migration import BuiltinMigration

    m = BuiltinMigration(ram_size=8 << 20, frames_per_round=0, wait_timeout=3.0)
    clock = 0.0                    # modelled seconds since migrate
    dirty, logged = [], []
    try:
        m.start_backends()
        m.start_source()
        m.warm_up()
        m.start_destination()
        m.begin()
        snap = m.copy_round("live")                       # round 1: every page
        while True:
            seconds = snap.pages_copied * TARGET_PAGE_SIZE / point.max_bandwidth
            clock += seconds
            _guest_runs(m, point.dirty_rate * seconds / FRAME_BYTES)
            pending = _pending_pages(m)
            dirty.append(pending)
            if pending == 0 or pending < point.threshold_pages:
                break                                     # QEMU would stop the guest now
            if len(m.snapshots) >= max_rounds:
                return _gave_up(m, point, dirty, logged, clock, max_rounds)
            snap = m.copy_round("live")
            logged.append(snap.pages_from_vhost_log)
        m.stop_source()
        final = m.final_round()
        logged.append(final.pages_from_vhost_log)
        m.start_destination_device()
        m.resume()
        m.check_wires()
        summary = m.summary()
        downtime = final.pages_copied * TARGET_PAGE_SIZE / point.max_bandwidth
        return SweepResult(point, "builtin", True, "completed", len(m.snapshots),
                           round((clock + downtime) * 1e3, 1), round(downtime * 1e3, 1),
                           summary["vhost_log"]["pages_logged"], tuple(logged), tuple(dirty),
                           summary["integrity"], notes=tuple(summary["problems"]))
    finally:
        m.close()


def _guest_runs(m, frames: float) -> None:
    """The guest runs for a while: ``frames`` frames each way, in bursts the rings can take."""
    left = int(round(frames))
    while left > 0:
        n = min(RX_CHUNK, left)
        m.traffic(m.src, n)
        for frame in m.guest.receive():              # the guest reads its RX frames...
            m.rx.arrive(frame)
        m.guest.post_rx_buffers()                     # ...and posts the buffers again
        left -= n


def _pending_pages(m) -> int:
    """What the next sync would find, without clearing it: guest pages | vhost log pages."""
    import numpy as np

    guest = np.flatnonzero(m.guest.guest_dirty)
    snap = m.src.server.snapshot(trace=False).log
    log = (np.flatnonzero(np.unpackbits(np.frombuffer(snap.bitmap, np.uint8),
                                        bitorder="little")) if snap is not None else guest[:0])
    return int(np.union1d(guest, log).size)


def _gave_up(m, point, dirty, logged, clock, max_rounds) -> SweepResult:
    """Pre-copy did not converge: stop logging and give up, as migrate_cancel would."""
    m.src.dev.vhost_log_global_stop()
    m.status = "cancelled"
    error = (f"pre-copy did not converge in {max_rounds} rounds: {dirty[-1]} pages still "
             f"dirty, at most {point.threshold_pages:.1f} fit in the downtime limit; cancelled")
    return SweepResult(point, "builtin", False, "cancelled", len(m.snapshots),
                       round(clock * 1e3, 1), None, m.src.dev.pages_logged, tuple(logged),
                       tuple(dirty), "not checked", error)


# -- the picture --------------------------------------------------------------------
def plot_sweep(results, title: str = ""):
    """Rounds, total time, downtime and vhost-log pages per run, and the dirty pages
    round by round against each run's threshold. Returns a matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 8.5), layout="constrained")
    top = fig.subfigures(2, 1, height_ratios=(1, 1.1))
    bars = top[0].subplots(1, 4)
    names = [f"#{i + 1}" for i in range(len(results))]
    colours = ["#2e7d32" if r.converged else "#c62828" for r in results]
    values = [("rounds", [r.rounds for r in results]),
              ("total time (ms)", [r.total_time_ms or 0 for r in results]),
              ("downtime (ms)", [r.downtime_ms or 0 for r in results]),
              ("pages from the vhost log", [r.pages_logged for r in results])]
    for ax, (label, ys) in zip(bars, values):
        ax.bar(names, ys, color=colours)
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=90)
    for i, r in enumerate(results):
        if not r.converged:
            bars[2].text(i, 0, " no switch-over", rotation=90, va="bottom", ha="center",
                         fontsize=8)
    ax = top[1].subplots()
    for i, r in enumerate(results):
        line, = ax.plot(range(2, len(r.dirty_pages) + 2), [max(p, 0.5) for p in r.dirty_pages],
                        marker="o" if r.converged else "x",
                        linestyle="-" if r.converged else "--", label=f"#{i + 1} {r.point.label()}")
        ax.axhline(max(r.point.threshold_pages, 0.5), color=line.get_color(), linewidth=0.6,
                   linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("dirty-bitmap sync (round 1 copies all RAM, so the first sync ends it)")
    ax.set_ylabel("pages still dirty (log scale)")
    ax.set_title("dirty pages at each sync; dotted: bandwidth x downtime-limit, in pages "
                 "(below it, QEMU switches over)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title or "green: converged and switched over; red: never converged")
    return fig
