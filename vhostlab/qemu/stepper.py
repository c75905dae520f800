"""Step a real QEMU one guest or QMP action at a time, and see which VhostOps each caused.

Theory of operation. Every op QEMU calls has a cause the kit controls: a
write of the guest's virtio-net driver or a QMP command. The causes are the
steps, written down as data in :mod:`vhostlab.qemu.steps` (what each does,
what to expect, the requests it makes QEMU send, release by release); this
module runs them.

:class:`QemuStepper` owns everything it starts: a vhostlab back-end (in this
process) with a QEMU plugged into it, the test process as that QEMU's guest
driver over qtest, and later a second back-end and QEMU as a migration
destination. ``step()`` runs the next step; ``run("DRIVER_OK")`` runs up to
and including a named one. After each action the stepper waits until the
back-ends' traces have been quiet for a short while (each trace wakes a
condition variable when it records a message: no polling), and keeps the
messages recorded since the step began, as a :class:`StepResult`. From those
it infers the VhostOps calls (``attribute_ops``, by hw/virtio/vhost-user.c
``user_ops``) and the vhost.c functions that made them (``infer_calls``, by
hw/virtio/vhost.c's calling sequences, for the sequences of QEMU 5.2 to
10.0), shown as a ``CallTimelineView`` marked as inferred: QEMU never says
which function sent a message.

The steps' names (``STEPS``, ``step_named``, ``coverage_column``, ...) are
importable from here too, as the labs do.
"""
from __future__ import annotations

import html
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from vhostlab.backend import BackendServer, CaptureWire, TraceRecord
from vhostlab.backend.trace import MessageTrace
from vhostlab.protocol import TO_BACKEND

from .guest import (RX_QUEUE, TX_QUEUE, VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, QTestVirtioNetGuest)
from .inference import attribute_ops, infer_calls
from .launcher import DEFAULT_RAM_SIZE, QemuInstance, require_qemu, vhost_user_netdev
from .sink import MigrationSink, cancel_migration, migrate_to_sink
from .steps import (HOST_MTU, NOT_CALLABLE_HERE, SLOW, STEPS, Step, coverage,
                    coverage_column, step_named)

__all__ = ["Step", "StepResult", "QemuStepper", "STEPS", "NOT_CALLABLE_HERE", "HOST_MTU",
           "attribute_ops", "infer_calls", "coverage", "coverage_column", "step_named"]

_QUIET = 0.5              # s without a message that ends a step (a ring's first start
                          # in the back-end can take a fifth of that)
_DEST_QUIET = 1.0         # after a migration: QEMU's announce rounds are 50, 150, 250 ms apart


# -- waiting for a quiet trace ------------------------------------------------------------
class _Quiet:
    """A condition every watched trace notifies when it records a message."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.count = 0

    def bump(self) -> None:
        with self.cond:
            self.count += 1
            self.cond.notify_all()

    def wait(self, quiet: float, timeout: float) -> bool:
        """Sleep until no message came for ``quiet`` s; False when ``timeout`` ran out first."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                seen = self.count
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if not self.cond.wait_for(lambda: self.count != seen, min(quiet, left)):
                    return True


class _WatchedTrace(MessageTrace):
    """A back-end's message trace that wakes the stepper at every record."""

    def __init__(self, quiet: _Quiet, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._quiet = quiet

    def record(self, *args: Any, **kwargs: Any) -> TraceRecord:
        rec = super().record(*args, **kwargs)
        self._quiet.bump()
        return rec


@dataclass
class _Host:
    """One back-end and the QEMU plugged into it (the stepper's own, closed with it)."""

    name: str
    server: BackendServer
    qemu: QemuInstance | None = None
    guest: QTestVirtioNetGuest | None = None
    sink: MigrationSink | None = None      # an outgoing migration's, while one runs

    def last_seq(self) -> int:
        recs = self.server.trace.records()
        return recs[-1].seq if recs else 0

    def close(self) -> None:
        for closer in (lambda: self.qemu and self.qemu.close(), self.server.stop,
                       lambda: self.sink and self.sink.close()):
            try:
                closer()
            except Exception:  # clean-up goes on; each part is independent
                pass


class _StepperParts:
    """Everything a stepper started; closed by a finalizer that holds no reference to it."""

    def __init__(self) -> None:
        self.hosts: dict[str, _Host] = {}

    def close(self) -> None:
        for host in reversed(list(self.hosts.values())):
            host.close()


# -- one step's outcome -------------------------------------------------------------------
@dataclass
class StepResult:
    """What one step did: the messages it caused on each host and the ops inferred from them."""

    index: int
    step: Step
    version: tuple[int, ...]
    records: dict[str, tuple[TraceRecord, ...]]       # host -> the step's records (in and out)
    ops: dict[str, list[tuple[TraceRecord, str]]]     # host -> (request, op) of the step
    timelines: dict[str, list[dict]]                  # host -> inferred timeline entries
    detail: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    timeline_view: Any = None                         # e.g. vhostlab.viz.CallTimelineView

    @property
    def requests(self) -> list[str]:
        """The front-end requests the step caused, every host, in time order."""
        recs = sorted((r for rs in self.records.values() for r in rs if r.direction == TO_BACKEND),
                      key=lambda r: r.time)
        return [r.request for r in recs]

    def requests_on(self, host: str) -> list[str]:
        return [r.request for r in self.records.get(host, ()) if r.direction == TO_BACKEND]

    @property
    def ops_called(self) -> list[str]:
        """Distinct VhostOps the step caused, first call first."""
        seen: dict[str, None] = {}
        for pairs in self.ops.values():
            for _rec, op in pairs:
                seen.setdefault(op, None)
        return list(seen)

    def check(self) -> list[str]:
        """What differs from the step's expectation on this QEMU version (empty: as expected)."""
        msgs, absent, _note = self.step.expected(self.version)
        problems = []
        got = self.requests_on(self.step.on) if self.step.name != "migrate" else self.requests
        it = iter(got)
        missing = [m for m in msgs if not any(g == m for g in it)]
        if missing:
            problems.append(f"expected {list(msgs)} in order; missing from {missing[0]} on, "
                            f"got {got}")
        for a in absent:
            if a in got:
                problems.append(f"{a} was not expected, got {got}")
        return problems

    def views(self) -> list:
        """One inferred timeline view per host that received messages.

        Drawn by ``timeline_view`` (the stepper's, e.g. ``CallTimelineView``:
        the viz layer sits above this one); empty when there is none.
        """
        if self.timeline_view is None:
            return []
        note = ("Inferred: QEMU does not report which vhost.c function sent a message; "
                "this nesting is read from the message sequence by hw/virtio/vhost.c's "
                "calling sequences.")
        return [self.timeline_view(entries, title=f"{host}: calls and messages (inferred)",
                                   note=note)
                for host, entries in self.timelines.items() if entries]

    def to_html(self) -> str:
        msgs, absent, note = self.step.expected(self.version)
        v = ".".join(map(str, self.version[:2]))
        esc = html.escape
        ops = ", ".join(f"<code>{esc(o)}</code>" for o in self.ops_called) or "none"
        lines = [f"<h4>step {self.index + 1}: {esc(self.step.name)}</h4>",
                 f"<div><b>action</b> ({esc(self.step.kind)}): {esc(self.step.action)}</div>",
                 f"<div><b>expect</b>: {esc(self.step.expect)}</div>"]
        if note:
            lines.append(f"<div><b>QEMU {v}</b>: {esc(note)}</div>")
        got = self.requests
        lines.append(f"<div><b>messages</b> ({len(got)}): {esc(' '.join(got)) or 'none'}</div>")
        lines.append(f"<div><b>VhostOps (inferred)</b>: {ops}</div>")
        for k, val in self.detail.items():
            lines.append(f"<div><b>{esc(k)}</b>: {esc(str(val))}</div>")
        problems = self.check()
        if problems:
            lines.append("<div style='color:#b00'>" + esc("; ".join(problems)) + "</div>")
        body = "".join(lines) + "".join(view.to_html() for view in self.views())
        return f"<div data-view='qemu-step'>{body}</div>"

    def _repr_html_(self) -> str:
        return self.to_html()

    def __repr__(self) -> str:
        return (f"<StepResult {self.index + 1} {self.step.name!r}: {len(self.requests)} "
                f"messages, ops {self.ops_called}>")


def _slice_timeline(entries: list[dict], seqs: set[int]) -> list[dict]:
    """The entries of one step's messages, with the calls they sit in (re-opened if needed)."""
    out: list[dict] = []
    stack: list[dict] = []          # the open calls, by depth
    opened: set[int] = set()        # depths whose call is already in ``out``
    for e in entries:
        depth = e["depth"]
        if e["kind"] == "call":
            del stack[depth:]
            stack.append(e)
            opened = {d for d in opened if d < depth}
            continue
        rec = e.get("record")
        if rec is None or getattr(rec, "seq", None) not in seqs:
            if e["kind"] == "event" and out:
                out.append(e)
            continue
        for d, call in enumerate(stack[:depth]):
            if d not in opened:
                out.append(call)
                opened.add(d)
        out.append(e)
    return out


# -- the stepper ----------------------------------------------------------------------------
class QemuStepper:
    """A real QEMU, one named guest or QMP action at a time (see the module's docstring).

    ``qemu``: the QEMU binary (default: $VHOSTLAB_QEMU or PATH). ``quiet``: how
    long the traces must stay silent to end a step. ``timeline_view``: what
    draws a step's inferred calls (``vhostlab.viz.CallTimelineView``, which
    ``lab.qemu_stepper()`` passes); without it a step shows its messages only.
    Use as a context manager, or call ``close()`` (also run by a finalizer and
    at interpreter exit).
    """

    def __init__(self, *, qemu: str | None = None, ram_size: int = DEFAULT_RAM_SIZE,
                 quiet: float = _QUIET, timeout: float = 15.0,
                 timeline_view: Any = None) -> None:
        self.info = require_qemu(qemu)
        self.timeline_view = timeline_view
        self.version = self.info.version
        self.ram_size, self.quiet, self.timeout = ram_size, quiet, timeout
        self.steps = STEPS
        self.results: list[StepResult] = []
        self._quiet = _Quiet()
        self._own = _StepperParts()
        self._finalizer = weakref.finalize(self, self._own.close)

    # -- life cycle ---------------------------------------------------------------
    def close(self) -> None:
        """Stop every QEMU and back-end the stepper started. Idempotent."""
        if self._finalizer.alive:
            self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def alive(self) -> bool:
        """True while any QEMU or back-end of the stepper runs."""
        return any((h.qemu is not None and h.qemu.alive()) or h.server.running
                   for h in self._own.hosts.values())

    def __enter__(self) -> "QemuStepper":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- stepping -------------------------------------------------------------------
    @property
    def position(self) -> int:
        """How many steps ran."""
        return len(self.results)

    @property
    def done(self) -> bool:
        return self.position >= len(self.steps)

    def next_step(self) -> Step | None:
        return None if self.done else self.steps[self.position]

    def step(self) -> StepResult:
        """Run the next step; returns its :class:`StepResult` (displayable)."""
        if self.closed:
            raise RuntimeError("this stepper is closed")
        if self.done:
            raise RuntimeError(f"all {len(self.steps)} steps ran")
        step = self.steps[self.position]
        marks = {name: h.last_seq() for name, h in self._own.hosts.items()}
        t0 = time.monotonic()
        detail = getattr(self, "_do_" + _key(step.name))() or {}
        quiet = _DEST_QUIET if step.name == "migrate" else self.quiet
        if not self._quiet.wait(quiet, self.timeout):
            detail["note"] = f"messages still arriving after {self.timeout:g} s"
        result = self._result(step, marks, detail, time.monotonic() - t0)
        self.results.append(result)
        return result

    def run(self, until: str | None = None) -> list[StepResult]:
        """Run the steps up to and including ``until`` (default: all that are left).

        A step that already ran is not run again: ``run("DRIVER_OK")`` after the
        "next" button went past it returns an empty list.
        """
        if until is not None:
            step_named(until)
            if any(r.step.name == until for r in self.results):
                return []
        out = []
        while not self.done:
            out.append(self.step())
            if until is not None and out[-1].step.name == until:
                break
        return out

    def _result(self, step: Step, marks: dict[str, int], detail: dict,
                seconds: float) -> StepResult:
        records, ops, timelines = {}, {}, {}
        for name, host in self._own.hosts.items():
            full = host.server.trace.records()
            mine = tuple(r for r in full if r.seq > marks.get(name, 0))
            if not mine:
                continue
            seqs = {r.seq for r in mine}
            records[name] = mine
            ops[name] = [(r, op) for r, op in attribute_ops(full) if r.seq in seqs]
            timelines[name] = _slice_timeline(infer_calls(full), seqs)
        return StepResult(self.position, step, self.version, records, ops, timelines,
                          detail, seconds, self.timeline_view)

    # -- what the stepper found -----------------------------------------------------------
    def ops_seen(self) -> dict[str, list[str]]:
        """Each VhostOps entry inferred so far -> the steps that caused it."""
        out: dict[str, list[str]] = {}
        for r in self.results:
            for op in r.ops_called:
                out.setdefault(op, [])
                if r.step.name not in out[op]:
                    out[op].append(r.step.name)
        return out

    def coverage_column(self) -> dict[str, str]:
        """The lab's column from this run: op -> the steps that made QEMU call it, or why not."""
        return coverage_column(self.ops_seen())

    def summary_html(self) -> str:
        """One line per step: its messages and ops."""
        rows = "".join(
            f"<tr><td>{r.index + 1}</td><td>{html.escape(r.step.name)}</td>"
            f"<td>{len(r.requests)}</td><td>{html.escape(', '.join(r.ops_called))}</td></tr>"
            for r in self.results)
        v = self.info.version_string
        return (f"<div data-view='qemu-steps'><b>QEMU {v}: {len(self.ops_seen())} distinct "
                "VhostOps inferred from its messages</b><table><tr><th>#</th><th>step</th>"
                f"<th>messages</th><th>VhostOps (inferred)</th></tr>{rows}</table></div>")

    def widget(self):
        """A "next" button that runs one step and shows its result below it."""
        import ipywidgets as w
        from IPython.display import display
        button = w.Button(description="next", tooltip="run the next step")
        label = w.HTML()
        out = w.Output()

        def refresh() -> None:
            nxt = self.next_step()
            label.value = (f"next: <b>{html.escape(nxt.name)}</b> ({html.escape(nxt.action)})"
                           if nxt else "all steps ran")
            button.disabled = nxt is None or self.closed

        def click(_b: Any) -> None:
            button.disabled = True
            try:
                result = self.step()
                out.clear_output()
                with out:
                    display(result)
            finally:
                refresh()

        button.on_click(click)
        refresh()
        return w.VBox([w.HBox([button, label]), out])

    # -- hosts --------------------------------------------------------------------------
    def _start_host(self, name: str, incoming: bool) -> _Host:
        server = BackendServer(wire=CaptureWire())
        server.trace = _WatchedTrace(self._quiet)
        host = _Host(name, server)
        self._own.hosts[name] = host
        server.start()
        netdev = vhost_user_netdev(server.socket_path, host_mtu=HOST_MTU)
        host.qemu = QemuInstance(netdev, ram_size=self.ram_size, incoming=incoming,
                                 qemu=self.info, name=f"stepper-{name}", timeout=self.timeout)
        host.qemu.start()
        return host

    @property
    def source(self) -> _Host:
        return self._own.hosts["source"]

    @property
    def guest(self) -> QTestVirtioNetGuest:
        g = self.source.guest
        if g is None:
            raise RuntimeError("the guest driver is not set up yet (step 'find the device')")
        return g

    # -- the actions, one per step (``_do_`` + the step's name) -----------------------------
    def _do_start_qemu(self) -> dict:
        host = self._start_host("source", incoming=False)
        return {"QEMU": f"{self.info.version_string} (pid {host.qemu.pid})"}

    def _do_find_the_device(self) -> dict:
        host = self.source
        host.guest = QTestVirtioNetGuest(host.qemu.qtest, ram_size=self.ram_size,
                                         features=1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_MTU,
                                         init=False)
        slot = host.guest.probe()
        host.guest.set_status(0)
        return {"PCI slot": slot, "BAR0": hex(host.guest.io_base)}

    def _do_acknowledge(self) -> dict:
        self.guest.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
        return {"status": hex(self.guest.status())}

    def _do_driver(self) -> dict:
        self.guest.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        return {"status": hex(self.guest.status())}

    def _do_features(self) -> dict:
        g = self.guest
        acked = g.negotiate_features()
        offered = bool(g.host_features >> VIRTIO_NET_F_MTU & 1)
        out = {"host features": hex(g.host_features), "acked": hex(acked),
               "device offers VIRTIO_NET_F_MTU": offered}
        if offered:
            out["config mtu"] = g.config_mtu()
        return out

    def _do_features_ok(self) -> dict:
        return {"legacy": "no FEATURES_OK bit to write (virtio 1.0 added it)"}

    def _do_queue_addresses(self) -> dict:
        g = self.guest
        out = {}
        for q in (RX_QUEUE, TX_QUEUE):
            gpas = g.setup_queue(q)
            out[f"queue {q}"] = f"size {g.queues[q].num}, ring at GPA {gpas.desc:#x}"
        return out

    def _do_driver_ok(self) -> dict:
        return {"status": hex(self.guest.driver_ok())}

    def _do_kick(self) -> dict:
        g = self.guest
        before = self.source.server.snapshot(trace=False).counters
        g.transmit([bytes.fromhex("ffffffffffff525400123456") + b"\x08\x00" + bytes(50)])
        g.wait_used(TX_QUEUE, 1, timeout=self.timeout)
        after = self.source.server.snapshot(trace=False).counters
        return {"back-end guest_tx_frames": f"{before['guest_tx_frames']} -> "
                                            f"{after['guest_tx_frames']}"}

    def _set_link(self, up: bool) -> dict:
        self.source.qemu.qmp.execute("set_link", name="net0", up=up)
        return {}

    def _do_set_link_off(self) -> dict:
        return self._set_link(False)

    def _do_set_link_on(self) -> dict:
        return self._set_link(True)

    def _do_stop(self) -> dict:
        qmp = self.source.qemu.qmp
        qmp.stop()
        qmp.wait_event("STOP", self.timeout)
        return {"run state": qmp.query_status()["status"]}

    def _do_cont(self) -> dict:
        qmp = self.source.qemu.qmp
        qmp.cont()
        qmp.wait_event("RESUME", self.timeout)
        return {"run state": qmp.query_status()["status"]}

    def _do_migrate_to_a_sink(self) -> dict:
        qmp = self.source.qemu.qmp
        qmp.migrate_set_capabilities(events=True)
        self.source.sink = migrate_to_sink(self.source.qemu, SLOW)
        qmp.wait_event("MIGRATION", self.timeout, status="active")
        return {"migration": qmp.query_migrate().get("status")}

    def _do_migrate_cancel(self) -> dict:
        sink, self.source.sink = self.source.sink, None
        return {"migration": cancel_migration(self.source.qemu, sink, self.timeout)}

    def _do_start_a_destination(self) -> dict:
        host = self._start_host("destination", incoming=True)
        return {"QEMU": f"{self.info.version_string} (pid {host.qemu.pid}), waiting at "
                        "-incoming"}

    def _do_migrate(self) -> dict:
        dest = self._own.hosts["destination"]
        src, dst = self.source.qemu.qmp, dest.qemu.qmp
        src.migrate_set_parameters(max_bandwidth=1 << 30)
        src.migrate(dest.qemu.migration_uri)
        src.wait_event("MIGRATION", 60.0, status="completed")
        dst.wait_event("RESUME", self.timeout)
        # The driver's bookkeeping lives in this process, not in guest RAM: hand it over.
        dest.guest = QTestVirtioNetGuest.resume(dest.qemu.qtest, self.guest.export_state())
        return {"source": src.query_status()["status"],
                "destination": dst.query_status()["status"]}

    def _do_reset(self) -> dict:
        guest = self._own.hosts["destination"].guest
        guest.reset()
        return {"destination status": hex(guest.status())}

    def __repr__(self) -> str:
        nxt = self.next_step()
        return (f"<QemuStepper QEMU {self.info.version_string}: {self.position}/"
                f"{len(self.steps)} steps, next {nxt.name if nxt else None!r}>")


def _key(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")

