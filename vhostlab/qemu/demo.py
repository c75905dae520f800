"""``vhostlab demo --frontend qemu``: the seed's three migration steps, done by a real QEMU.

Two QEMUs, each with its own vhostlab back-end (in this process), migrate a
guest whose virtio-net driver runs over qtest, with frames flowing both ways.
With ``--backend dpdk`` each QEMU has its own DPDK back-end (testpmd) behind a
recording relay, and the messages quoted are the relay's (.dpdk_side).
The narration follows the seed document's section 2 as it happens and quotes
the messages exactly as the source back-end received them (its trace,
decoded by the protocol layer). "->" is QEMU to back-end, "<-" the reply.
"""
from __future__ import annotations

import queue
import time
from dataclasses import replace
from typing import Callable

from vhostlab.frontend.demo import SEED_STEPS  # the seed's own words, one copy
from vhostlab.protocol import TO_BACKEND, format_record

from .errors import QemuError
from .launcher import require_qemu
from .migration import MigrationConfig, PrecopyRound, ProgressEvent, QemuMigration
from .sequences import explain_stop

__all__ = ["run_demo", "SEED_STEPS", "format_record"]

EXIT_OK, EXIT_SETUP, EXIT_CORRUPTED = 0, 2, 3
VHOST_F_LOG_ALL = 1 << 26
MiB = 1 << 20

STEP_NOTES = {
    1: "The device already runs, so vhost_log_global_start() -> vhost_migration_log() "
       "-> vhost_dev_log_resize() sends it, before step 2:",
    2: "SET_FEATURES turns VHOST_F_LOG_ALL on; then vhost_dev_set_log() -> "
       "vhost_virtqueue_set_addr() sets VHOST_VRING_F_LOG on each ring, so used-ring "
       "writes are logged too (at log_guest_addr):",
    3: "The source stopped (STOP): vhost_dev_stop() stops each ring and takes its "
       "last_avail_idx:",
}
LOG_PUT_NOTE = ("(QEMU reads and clears the vhost log one last time: vhost_log_put(dev, true) "
                "syncs when it drops the last reference to the shared log)")
SEED_LOG_PUT = ("And when backend is stopped, vhost_log_put() is used to synchronize "
                "dirty page memory.")


def _as_sent(record) -> dict:
    """A record's payload as QEMU sent it, before a relay rewrote it (the DPDK
    negative control): the seed's steps are what QEMU does."""
    return record.fields.get("rewritten_from") or record.fields.get("payload") or {}


class _QemuNarrator:
    """Turns progress events into the seed's story, one line at a time.

    It keeps every record it is handed, so that :meth:`finish` can check the
    story against them: a message a seed step expects that QEMU never sent, or
    that reached the narrator but was not narrated, is said out loud instead
    of silently missing from the output.
    """

    def __init__(self, out: Callable[[str], None], config: MigrationConfig,
                 qemu_version: tuple[int, ...] | None = None):
        self.out, self.config, self.qemu_version = out, config, qemu_version
        self.step = 0               # seed steps announced so far
        self.source_started = False
        self.destination_seen = False
        self.pending: str | None = None   # the request whose reply is shown next
        self.records: dict[str, list] = {"source": [], "destination": []}
        self.narrated: set[tuple[str, int]] = set()    # (who, seq) of the lines printed
        self.active_rounds = 0
        self.stop_explained = False
        self.logged = ("the relay saw DPDK's marks on" if config.backend == "dpdk"
                       else "the back-end had logged")

    def seed_step(self, n: int, note: str = "") -> None:
        if self.step >= n:
            return
        self.step = n
        why, seq = SEED_STEPS[n - 1]
        self.out(f"\nSeed step {n}: \"{why}\"")
        self.out(f"  Calling sequence: {seq}")
        if note:
            self.out(f"  {note}")

    def __call__(self, ev: ProgressEvent) -> None:
        handler = getattr(self, f"on_{ev.kind}", None)
        if handler is not None:
            handler(ev)

    def on_phase(self, ev: ProgressEvent) -> None:
        c = self.config
        if ev.data == "migrating":
            self.out(f"\nQMP migrate (max-bandwidth {c.max_bandwidth / MiB:g} MiB/s, "
                     f"downtime-limit {c.downtime_limit} ms). The guest keeps writing "
                     "memory and frames flow both ways while QEMU copies RAM.")
        elif ev.data in ("quiescing", "verifying", "after", "failed"):
            self.out(f"\n{ev.text[:1].upper()}{ev.text[1:]}.")
        elif ev.data == "warm-up":
            self.out(f"Warm-up: {ev.text}.")

    def on_messages(self, ev: ProgressEvent) -> None:
        self.records[ev.text].extend(ev.data)
        if ev.text == "source":
            self._source(ev.data)
        else:
            self._destination(ev.data)

    def _seed_step_of(self, record) -> int:
        """Which seed step a front-end request belongs to (0: none)."""
        payload = record.fields.get("payload") or {}
        if record.request == "SET_LOG_BASE":
            return 1
        if record.request == "SET_FEATURES" and _as_sent(record).get("value", 0) & VHOST_F_LOG_ALL:
            return 2
        if record.request == "SET_VRING_ADDR" and payload.get("log"):
            return 2
        if record.request == "SET_STATUS" and payload.get("value") == 0 and self.step >= 2:
            return 3      # the reset vhost_dev_stop sends (QEMU >= 7.2), before or after step 3
        return 3 if record.request == "GET_VRING_BASE" else 0

    def _source(self, records) -> None:
        if not self.source_started:
            self.source_started = True
            n = sum(r.direction == TO_BACKEND for r in records)
            self.out(f"Source QEMU connected to back-end A and, at DRIVER_OK, started the "
                     f"device: {n} messages (features, memory table, rings).")
        for r in records:
            if r.direction == TO_BACKEND:
                step = self._seed_step_of(r)
                self.pending = r.request if step else None
                if not step:
                    continue
                self.seed_step(step, STEP_NOTES.get(step, ""))
            elif r.request != self.pending:
                continue
            self.out(f"    {format_record(r)}")
            self.narrated.add(("source", r.seq))

    def _destination(self, records) -> None:
        if not self.destination_seen:
            self.destination_seen = True
            n = sum(r.direction == TO_BACKEND for r in records)
            self.out(f"Destination QEMU (-incoming) connected to back-end B: {n} messages, "
                     "no memory table and no rings yet; it waits for the migration stream.")
        bases = [r for r in records if r.request == "SET_VRING_BASE" and r.direction == TO_BACKEND]
        if self.step >= 3 and bases:
            self.explain_stop()
            self.out("\nThe destination QEMU starts its device with the source's ring "
                     "positions (vhost_virtqueue_start -> vhost_set_vring_base):")
            for r in bases:
                self.out(f"    [back-end B] {format_record(r)}")
                self.narrated.add(("destination", r.seq))

    def explain_stop(self) -> None:
        """The stop as QEMU sent it, beside the seed's, with the difference named."""
        if self.stop_explained:
            return
        try:
            stop = explain_stop(self.records["source"], self.qemu_version)
        except ValueError:
            return            # no GET_VRING_BASE yet; finish() reports it missing
        self.stop_explained = True
        self.out(f"  The stop as QEMU sent it: {', '.join(stop.observed)}")
        self.out(f"  The seed's vhost_dev_stop:  {', '.join(stop.seed)}")
        if not stop.as_seed:
            self.out(f"  {stop.text}")
        self.out(f"  \"{SEED_LOG_PUT}\" {LOG_PUT_NOTE}")

    def on_event(self, ev: ProgressEvent) -> None:
        stop, resume = ev.data
        when = time.strftime("%H:%M:%S", time.localtime(stop.timestamp))
        self.out(f"  QMP events: STOP from the source at {when}"
                 f".{int(stop.timestamp % 1 * 1e6):06d}, RESUME from the destination "
                 f"{(resume.timestamp - stop.timestamp) * 1000:.1f} ms later")

    def on_round(self, ev: ProgressEvent) -> None:
        s: PrecopyRound = ev.data
        if s.status != "active":
            return
        self.active_rounds += 1
        self.out(f"  dirty sync {s.dirty_sync_count} at {s.time:.2f} s: "
                 f"{s.transferred / MiB:.1f} MiB sent, {s.remaining / MiB:.2f} MiB to go; "
                 f"{self.logged} {s.pages_logged} pages "
                 f"({s.rx_frames} RX / {s.tx_frames} TX frames, guest wrote "
                 f"{s.guest_bytes_written / MiB:.1f} MiB)")

    def on_frames(self, ev: ProgressEvent) -> None:
        v = ev.data
        self.out(f"  RX frames the source back-end wrote and the guest had not read: "
                 f"{v.rx_expected}; in the destination's used ring: {v.rx_found}; "
                 f"byte for byte intact in the destination's RAM: {v.rx_intact}")
        for index, h in v.handoff.items():
            self.out(f"  vring {index}: GET_VRING_BASE returned {h['get_vring_base']}, "
                     f"SET_VRING_BASE carried {h['set_vring_base']}"
                     + ("" if h["ok"] else "  <-- MISMATCH"))
        for text in v.driver_errors:
            self.out(f"  driver: {text}")


    def expected(self) -> list[tuple[int, str, str, Callable]]:
        """(seed step, who, what, test on an incoming record) for each message the story needs."""
        rings = sorted({(r.fields.get("payload") or {}).get("index") for r in self.records["source"]
                        if r.direction == TO_BACKEND and r.request == "SET_VRING_NUM"}
                       - {None}) or [0, 1]

        def req(name, **want):
            def test(r):
                p = _as_sent(r)
                return r.request == name and all(
                    (p.get(k, 0) & v) if k in ("value", "flags") else p.get(k) == v
                    for k, v in want.items())
            return test
        items = [(1, "source", "SET_LOG_BASE", req("SET_LOG_BASE")),
                 (2, "source", "SET_FEATURES with VHOST_F_LOG_ALL",
                  req("SET_FEATURES", value=VHOST_F_LOG_ALL))]
        items += [(2, "source", f"SET_VRING_ADDR {i} with VHOST_VRING_F_LOG",
                   req("SET_VRING_ADDR", index=i, flags=1)) for i in rings]
        items += [(3, "source", f"GET_VRING_BASE {i}", req("GET_VRING_BASE", index=i)) for i in rings]
        items += [(3, "destination", f"SET_VRING_BASE {i}", req("SET_VRING_BASE", index=i))
                  for i in rings]
        return items

    def finish(self, completed: bool) -> list[str]:
        """Say what the story expected and did not show; returns what was missing."""
        missing = []
        for step, who, what, test in self.expected():
            found = [r for r in self.records[who] if r.direction == TO_BACKEND and test(r)]
            side = "A (source)" if who == "source" else "B (destination)"
            if not found:
                missing.append(what)
                self.out(f"  not seen: seed step {step} expects {what}, but back-end {side} "
                         "never received it")
            elif not any((who, r.seq) in self.narrated for r in found):
                self.out(f"  not narrated above, but in back-end {side}'s trace (seed step "
                         f"{step}): {format_record(found[-1])}")
        if completed and not self.active_rounds:
            missing.append("dirty sync")
            self.out("  not seen: no dirty-bitmap sync was reported while the migration was active")
        if completed:
            self.explain_stop()
        return missing


def _run(config: MigrationConfig, narrator: _QemuNarrator):
    events: queue.Queue = queue.Queue()
    migration = QemuMigration(config, on_progress=events.put).start()
    try:
        while True:
            try:
                narrator(events.get(timeout=0.5))
            except queue.Empty:
                if migration.progress().done:
                    break
        while not events.empty():
            narrator(events.get_nowait())
        result = migration.wait(config.timeout + 30)
        result.notes.extend(f"narration: {what} not seen"
                            for what in narrator.finish(result.status == "completed"))
        return result
    finally:
        migration.close()


def _failure_summary(config: MigrationConfig, error: str) -> dict:
    zero = {"sent": 0, "delivered": 0, "lost": 0, "corrupted": 0, "duplicated": 0}
    return {"frontend": "qemu", "backend": config.backend, "qemu_version": None,
            "migration": {"status": "failed", "rounds": 0, "error": error},
            "vhost_log": {"pages_logged": 0, "syncs": 0}, "frames": dict(zero),
            "frames_by_direction": {"to_guest": dict(zero), "from_guest": dict(zero)},
            "integrity": "not checked", "ops_called": [], "dirty_sync_count": 0,
            "total_time_ms": None, "downtime_ms": None,
            "break_logging": config.break_logging, "error": error}


def run_demo(as_json: bool = False, break_logging: bool = False,
             out: Callable[[str], None] = print,
             config: MigrationConfig | None = None,
             backend: str | None = None) -> tuple[dict, int]:
    """Migrate between two real QEMUs, narrating through ``out``; return (summary, exit code).

    Exit code 0 when every frame survived the migration intact, 3 when not
    (``break_logging`` must produce 3: the source back-end skips dirty
    logging; with DPDK the relay hides VHOST_F_LOG_ALL from it), 2 when QEMU
    (or DPDK) is missing or the migration could not be done. ``backend``:
    "vhostlab" or "dpdk" (default: the config's). With ``as_json`` only the
    closing lines are narrated (the caller prints the summary).
    """
    config = config or MigrationConfig(break_logging=break_logging)
    config = replace(config, break_logging=break_logging,
                     backend=backend or config.backend)
    try:
        info = require_qemu(config.qemu)
        if config.backend == "dpdk":
            from vhostlab.backend.dpdk import dpdk_usable
            usable, why = dpdk_usable()
            if not usable:
                raise QemuError(f"DPDK: {why}")
    except QemuError as exc:
        out(f"cannot run the QEMU demo: {exc}")
        return _failure_summary(config, str(exc)), EXIT_SETUP
    say = (lambda text: None) if as_json else out
    if config.backend == "dpdk":
        say(f"Two QEMU {info.version_string} (TCG, no guest OS: this process drives the "
            "guest's virtio-net over qtest), each with its own DPDK vhost back-end "
            "(dpdk-testpmd, net_vhost0, sending every frame back to the guest) behind a "
            "relay in this process that records every message."
            + (" The source relay removes VHOST_F_LOG_ALL from SET_FEATURES, so DPDK never "
               "logs." if break_logging else ""))
    else:
        say(f"Two QEMU {info.version_string} (TCG, no guest OS: this process drives the "
            "guest's virtio-net over qtest), each with its own vhostlab back-end in this "
            "process." + (" The source back-end is told to skip dirty logging."
                          if break_logging else ""))
    result = _run(config, _QemuNarrator(say, config, info.version))
    summary = result.summary()
    if result.error is not None or result.status != "completed":
        why = result.error or f"migration status {result.status}"
        out(f"the QEMU migration could not be done: {why}")
        return summary, EXIT_SETUP
    _report(summary, out)
    return summary, EXIT_OK if summary["integrity"] == "ok" else EXIT_CORRUPTED


def _report(summary: dict, out: Callable[[str], None]) -> None:
    log = summary["vhost_log"]
    res = summary["resources"]
    out("")
    dpdk = summary.get("backend") == "dpdk"
    marked = ("pages seen marked in the shared log (read through the relay)" if dpdk
              else "pages marked by the back-end")
    broken = (" (VHOST_F_LOG_ALL hidden from DPDK)" if dpdk else " (told to skip dirty logging)")
    out(f"migration {summary['migration']['status']}: dirty-sync-count "
        f"{summary['dirty_sync_count']}, total {summary['total_time_ms']} ms, downtime "
        f"{summary['downtime_ms']} ms; vhost log: {log['pages_logged']} {marked}"
        + (broken if summary["break_logging"] else ""))
    for name, d in summary["frames_by_direction"].items():
        out(f"frames {name.replace('_', ' ')}: sent {d['sent']}, delivered {d['delivered']}, "
            f"lost {d['lost']}, corrupted {d['corrupted']}, duplicated {d['duplicated']}")
    out(f"peak memory: QEMUs {sum(res['qemu_peak_rss_bytes'].values()) / MiB:.0f} MiB + "
        f"this process {res['python_peak_rss_bytes'] / MiB:.0f} MiB")
    for side, t in summary.get("dpdk_totals", {}).items():
        out(f"testpmd ({side}): {t['rx_packets']} frames taken from the guest, "
            f"{t['tx_packets']} written back, {t['tx_dropped']} dropped")
    for what, why in summary.get("unavailable", {}).items():
        out(f"not available with DPDK: {what}: {why}")
    for note in summary["notes"]:
        out(f"note: {note}")
    out(f"integrity: {summary['integrity']}")
