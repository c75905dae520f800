"""Step a real QEMU one guest or QMP action at a time, and see which VhostOps each caused.

Theory of operation. QEMU cannot be asked to call one VhostOps entry, but
every op it calls has a cause the kit controls: a write of the guest's
virtio-net driver (device status, queue address, a kick, the features it
acks) or a QMP command (stop, cont, migrate, migrate_cancel, set_link). Each
cause is one :class:`Step`, written down as data: its name, what it does,
what a learner should expect, and the vhost-user requests it makes QEMU
send, release by release where they differ (``by_version``).

:class:`QemuStepper` owns everything it starts: a vhostlab back-end (in this
process) with a QEMU plugged into it, the test process as that QEMU's guest
driver over qtest, and later a second back-end and QEMU as a migration
destination. ``step()`` runs the next step; ``run("DRIVER_OK")`` runs up to
and including a named one. After each action the stepper waits until the
back-ends' traces have been quiet for a short while (each trace wakes a
condition variable when it records a message: no polling), and keeps the
messages recorded since the step began. From those it infers the VhostOps
calls (``attribute_ops``, by hw/virtio/vhost-user.c ``user_ops``) and the
vhost.c functions that made them (``infer_calls``, by hw/virtio/vhost.c's
calling sequences, for the sequences of QEMU 5.2 to 10.0), shown as a
``CallTimelineView`` marked as inferred: QEMU never says which function sent
a message.

:func:`coverage` turns the steps' data into the lab's "called by real QEMU
here, by which action" column, and :data:`NOT_CALLABLE_HERE` says in one line
why each remaining op of the seed's table cannot be made to run on this
machine. Tests hold the step data against real QEMU 5.2, 7.2 and 10.0.
"""
from __future__ import annotations

import html
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from vhostlab.backend import BackendServer, CaptureWire, TraceRecord
from vhostlab.backend.trace import MessageTrace
from vhostlab.protocol import TO_BACKEND

from .guest import (RX_QUEUE, TX_QUEUE, VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MTU, QTestVirtioNetGuest)
from .inference import attribute_ops, infer_calls
from .launcher import (CI_QEMU_RELEASES, DEFAULT_RAM_SIZE, QemuInstance, require_qemu,
                       vhost_user_netdev)

__all__ = ["Step", "StepResult", "QemuStepper", "STEPS", "NOT_CALLABLE_HERE", "HOST_MTU",
           "attribute_ops", "infer_calls", "coverage", "coverage_column", "step_named"]

#: The device property the stepper starts QEMU with (the guest acks VIRTIO_NET_F_MTU).
HOST_MTU = 1400
_SINK = "exec:cat > /dev/null"
_SLOW = 16 << 10          # bytes/s: a migration into the sink that stays in progress
_QUIET = 0.5              # s without a message that ends a step (a ring's first start
                          # in the back-end can take a fifth of that)
_DEST_QUIET = 1.0         # after a migration: QEMU's announce rounds are 50, 150, 250 ms apart


# -- the steps as data ---------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One action of the guest driver or of QMP, and what it makes QEMU send.

    ``messages`` are the front-end requests the step must cause, in order (other
    requests may sit between them); ``absent`` must not appear. ``by_version``
    holds ``(first_release, messages, absent, note)`` for releases that differ:
    the last entry whose release is not newer than the QEMU under test wins.
    """

    name: str
    kind: str                   # "guest", "qmp" or "host"
    action: str                 # what is done, in the guest's or QMP's words
    expect: str                 # what a learner should expect to see
    messages: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    by_version: tuple[tuple[tuple[int, int], tuple[str, ...], tuple[str, ...], str], ...] = ()
    on: str = "source"          # the host whose QEMU acts

    def expected(self, version: Sequence[int] | None = None) -> tuple[tuple[str, ...],
                                                                        tuple[str, ...], str]:
        """``(messages, absent, note)`` for QEMU ``version`` (None: the step's defaults)."""
        found = (self.messages, self.absent, "")
        if version is not None:
            for since, msgs, absent, note in self.by_version:
                if tuple(version[:2]) >= since:
                    found = (msgs, absent, note)
        return found

    @property
    def differs(self) -> bool:
        return bool(self.by_version)


# The requests seen from QEMU 5.2, 7.2 and 10.0 (CI's releases). The back-end offers
# CONFIGURE_MEM_SLOTS, so the memory table arrives as ADD_MEM_REG, one region each.
_INIT = ("GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM",
         "GET_MAX_MEM_SLOTS", "SET_OWNER", "GET_FEATURES")
_RINGS = ("SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
          "SET_VRING_CALL") * 2
_ENABLE = ("SET_VRING_ENABLE", "SET_VRING_ENABLE")
_GVB = ("GET_VRING_BASE", "GET_VRING_BASE")
_STATUS_START = ("SET_FEATURES", "GET_STATUS", "SET_STATUS")
_V52, _V72, _V81, _V10 = (5, 0), (7, 2), (8, 1), (10, 0)


def _start_up(on: str = "source") -> dict:
    return dict(
        messages=(*_INIT, "SET_VRING_CALL", "SET_VRING_CALL"), on=on,
        by_version=(
            (_V52, (*_INIT, "SET_VRING_CALL", "SET_VRING_CALL"),
             ("SET_VRING_ERR", "SET_VRING_ENABLE"),
             "5.2 sends no SET_VRING_ERR and enables no ring at start-up"),
            (_V72, (*_INIT, "SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_CALL",
                    "SET_VRING_ERR", *_ENABLE), ("RESET_DEVICE",),
             "7.2 adds an error fd per ring (SET_VRING_ERR, an op newer than the seed's "
             "list) and enables both rings"),
            (_V10, (*_INIT, "SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_CALL",
                    "SET_VRING_ERR", "RESET_DEVICE", *_ENABLE), (),
             "10.0 also resets the back-end (RESET_DEVICE: vhost_reset_device) when "
             "virtio-net resets at machine start"),
        ))


def _dev_start(mem: bool, mtu: bool = True) -> dict:
    table = ("ADD_MEM_REG",) if mem else ()
    first = ("NET_SET_MTU",) if mtu else ()
    return dict(
        messages=(*first, "SET_FEATURES", *table, *_RINGS),
        absent=() if mem else ("ADD_MEM_REG", "SET_MEM_TABLE"),
        by_version=(
            (_V52, (*first, "SET_FEATURES", *table, *_RINGS, *_ENABLE), ("SET_STATUS",),
             "5.2: no STATUS protocol feature; the rings are enabled after they start"),
            (_V72, (*first, *_ENABLE, *_STATUS_START, *table, *_RINGS, "GET_STATUS",
                    "SET_STATUS"), (),
             "7.2 and later: the rings are enabled first; with protocol feature STATUS "
             "SET_FEATURES is followed by SET_STATUS FEATURES_OK and the start ends with "
             "SET_STATUS DRIVER_OK (vhost_dev_start, an op newer than the seed's list)"),
        ))


def _dev_stop(extra_72: tuple[str, ...] = (), extra_10: tuple[str, ...] = ()) -> dict:
    last = ("8.1 and later: SET_STATUS 0 (vhost_reset_status) comes AFTER the "
            "GET_VRING_BASEs, so the reset cannot lose the ring positions QEMU saves")
    newest = ((_V10, (*_GVB, "SET_STATUS", *extra_10), (),
               last + "; 10.0 then sends RESET_DEVICE (vhost_reset_device) and re-enables "
               "the rings"),) if extra_10 else ()
    return dict(
        messages=_GVB,
        by_version=(
            (_V52, _GVB, ("SET_STATUS",), "5.2: only GET_VRING_BASE per ring, as in the seed"),
            (_V72, ("SET_STATUS", *_GVB, *extra_72), ("RESET_DEVICE",),
             "7.2: SET_STATUS 0 (vhost_dev_start(dev, false)) comes BEFORE the "
             "GET_VRING_BASEs: the device is reset before QEMU asks where its rings stopped"),
            (_V81, (*_GVB, "SET_STATUS"), (), last),
            *newest,
        ))


_NOTHING = ("the guest's register write stays inside QEMU's virtio-net model: "
            "the vhost device is not started yet, so no message")

STEPS: tuple[Step, ...] = (
    Step("start QEMU", "host",
         f"start the back-end, then QEMU with -device virtio-net-pci,host_mtu={HOST_MTU} "
         "on a vhost-user netdev",
         "vhost_dev_init -> vhost_backend_init: features and protocol features are "
         "negotiated, SET_OWNER claims the back-end, then a call fd per ring",
         **_start_up()),
    Step("find the device", "guest",
         "PCI config: find 1af4:1000, program BAR0, enable I/O and bus mastering; "
         "then status 0 (the driver resets the device first)",
         "no message starts or stops a ring: the device was never started",
         absent=("GET_VRING_BASE", "SET_FEATURES"),
         by_version=((_V52, (), ("SET_VRING_ENABLE",), "5.2: nothing at all"),
                     (_V72, _ENABLE, (), "7.2: the reset re-enables both rings "
                      "(SET_VRING_ENABLE)"),
                     (_V10, ("RESET_DEVICE", *_ENABLE), (),
                      "10.0: the reset reaches the back-end as RESET_DEVICE, then both "
                      "rings are enabled")),
         ),
    Step("ACKNOWLEDGE", "guest", "outb BAR0+0x12 1 (status ACKNOWLEDGE)",
         "nothing: " + _NOTHING, absent=("SET_FEATURES", "SET_VRING_ENABLE")),
    Step("DRIVER", "guest", "outb BAR0+0x12 3 (status ACKNOWLEDGE|DRIVER)",
         "nothing: " + _NOTHING, absent=("SET_FEATURES", "SET_VRING_ENABLE")),
    Step("features", "guest",
         "inl BAR0+0x00 (host features), outl BAR0+0x04 MAC|MTU (the guest acks "
         "VIRTIO_NET_F_MTU)",
         "no SET_FEATURES yet (vhost_net_ack_features only records the acked bits; they "
         "reach the back-end at DRIVER_OK), but virtio_net_set_features -> "
         "virtio_net_set_queue_pairs attaches the queue pair: SET_VRING_ENABLE per ring",
         _ENABLE, absent=("SET_FEATURES",)),
    Step("FEATURES_OK", "guest", "none: the legacy interface has no FEATURES_OK",
         "nothing: FEATURES_OK (status 8) is virtio 1.0's; a legacy driver's features "
         "are final when it writes DRIVER_OK", absent=("SET_FEATURES", "SET_STATUS")),
    Step("queue addresses", "guest",
         "per queue: outw BAR0+0x0e Q (select), inw BAR0+0x0c (size), "
         "outl BAR0+0x08 PFN (ring address)",
         "nothing: QEMU notes the ring address; it sends it (as its own virtual "
         "address) in SET_VRING_ADDR at DRIVER_OK", absent=("SET_VRING_ADDR",),
         by_version=((_V52, (), ("SET_VRING_ADDR",),
                      "5.2 and 7.2: each legacy queue has 256 entries"),
                     (_V10, (), ("SET_VRING_ADDR",),
                      "10.0: each legacy queue has 1024 entries (256 up to 7.2); the size "
                      "comes from QEMU, so SET_VRING_NUM says 1024 at DRIVER_OK"))),
    Step("DRIVER_OK", "guest", "outb BAR0+0x12 7 (status DRIVER_OK)",
         "virtio_net_set_status -> vhost_net_set_mtu (NET_SET_MTU: the guest acked MTU) "
         "-> vhost_net_start -> vhost_dev_start: SET_FEATURES, the memory table "
         "(ADD_MEM_REG per region), and per ring NUM, BASE, ADDR, KICK, CALL; the rings "
         "are enabled", **_dev_start(mem=True)),
    Step("kick", "guest", "one frame on TX, then outw BAR0+0x10 1 (QUEUE_NOTIFY)",
         "no vhost-user message: the kick is a write to the ring's kick eventfd, "
         "straight from QEMU's ioeventfd to the back-end, which takes the frame",
         absent=("SET_VRING_KICK", "SET_FEATURES")),
    Step("set_link off", "qmp", "QMP set_link name=net0 up=false",
         "virtio_net_set_link_status -> virtio_net_vhost_status: the link is down, so "
         "vhost_net_stop -> vhost_dev_stop: GET_VRING_BASE per ring", **_dev_stop()),
    Step("set_link on", "qmp", "QMP set_link name=net0 up=true",
         "vhost_net_start again, as at DRIVER_OK (NET_SET_MTU included) but without the "
         "memory table: the back-end still has it", **_dev_start(mem=False)),
    Step("stop", "qmp", "QMP stop (the VM pauses)",
         "the VM state change stops the device: vhost_dev_stop -> GET_VRING_BASE per ring",
         **_dev_stop()),
    Step("cont", "qmp", "QMP cont (the VM runs again)",
         "vhost_dev_start again: NET_SET_MTU, features, every ring, enable; no memory table "
         "(with CONFIGURE_MEM_SLOTS QEMU sends only regions that changed: none)",
         **_dev_start(mem=False)),
    Step("migrate to a sink", "qmp",
         f"QMP migrate uri={_SINK!r} at {_SLOW // 1024} KiB/s (it stays in progress)",
         "vhost_log_global_start -> vhost_migration_log -> vhost_dev_set_log: SET_LOG_BASE "
         "(the log memfd), SET_FEATURES with VHOST_F_LOG_ALL, SET_VRING_ADDR with "
         "VHOST_VRING_F_LOG per ring",
         ("SET_LOG_BASE", "SET_FEATURES", "SET_VRING_ADDR", "SET_VRING_ADDR"),
         absent=("GET_VRING_BASE",)),
    Step("migrate_cancel", "qmp", "QMP migrate_cancel",
         "vhost_log_global_stop: SET_FEATURES without VHOST_F_LOG_ALL, SET_VRING_ADDR "
         "without VHOST_VRING_F_LOG (the log is dropped without a message)",
         ("SET_FEATURES", "SET_VRING_ADDR", "SET_VRING_ADDR"), absent=("GET_VRING_BASE",)),
    Step("start a destination", "host",
         "a second back-end, and a second QEMU with the same command line plus -incoming",
         "the destination's vhost_dev_init: the same start-up messages, on the second "
         "back-end", **_start_up("destination")),
    Step("migrate", "qmp", "QMP migrate to the destination (full speed)",
         "source: logging on, then at switch-over vhost_dev_stop (GET_VRING_BASE per "
         "ring); destination: vhost_dev_start with SET_VRING_BASE = the source's "
         "last_avail_idx, and vhost_migration_done: SEND_RARP (QEMU's announce rounds), "
         "because the guest did not ack VIRTIO_NET_F_GUEST_ANNOUNCE",
         ("SET_LOG_BASE", "SET_FEATURES", "SET_VRING_ADDR", "GET_VRING_BASE", "SET_VRING_BASE",
          "SEND_RARP")),
    Step("reset", "guest",
         "on the destination, the migrated driver writes outb BAR0+0x12 0 (status 0: "
         "device reset)",
         "virtio_net_set_status(0) -> vhost_net_stop -> vhost_dev_stop: GET_VRING_BASE "
         "per ring", on="destination",
         **_dev_stop(extra_10=("RESET_DEVICE", *_ENABLE), extra_72=_ENABLE)),
)


def step_named(name: str) -> Step:
    """The step called ``name`` (KeyError naming the steps when there is none)."""
    for s in STEPS:
        if s.name == name:
            return s
    raise KeyError(f"no step {name!r}; the steps are {[s.name for s in STEPS]}")


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

    def last_seq(self) -> int:
        recs = self.server.trace.records()
        return recs[-1].seq if recs else 0

    def close(self) -> None:
        for closer in (lambda: self.qemu and self.qemu.close(), self.server.stop):
            try:
                closer()
            except Exception:  # clean-up goes on; each part is independent
                pass


class _Owned:
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
        self._own = _Owned()
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
        qmp.migrate_set_parameters(max_bandwidth=_SLOW)
        qmp.migrate(_SINK)
        qmp.wait_event("MIGRATION", self.timeout, status="active")
        return {"migration": qmp.query_migrate().get("status")}

    def _do_migrate_cancel(self) -> dict:
        qmp = self.source.qemu.qmp
        qmp.execute("migrate_cancel")
        qmp.wait_event("MIGRATION", self.timeout, status="cancelled")
        return {"migration": qmp.query_migrate().get("status")}

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


# -- coverage: which op which step makes QEMU call ------------------------------------------
#: Ops of the seed's table no step can make QEMU call here, and why (one line each).
NOT_CALLABLE_HERE: Mapping[str, str] = {
    "vhost_net_set_backend": "vhost-kernel only (an ioctl); this kernel has no vhost-net",
    "vhost_scsi_set_endpoint": "vhost-kernel scsi only; no vhost-scsi device here",
    "vhost_scsi_clear_endpoint": "vhost-kernel scsi only; no vhost-scsi device here",
    "vhost_scsi_get_abi_version": "vhost-kernel scsi only; no vhost-scsi device here",
    "vhost_set_vring_busyloop_timeout": "vhost-kernel only (user_ops leaves it NULL)",
    "vhost_vsock_set_guest_cid": "vhost-kernel vsock only; no vhost-vsock device here",
    "vhost_vsock_set_running": "vhost-kernel vsock only; no vhost-vsock device here",
    "vhost_crypto_create_session": "vhost-user-crypto devices only, not virtio-net",
    "vhost_crypto_close_session": "vhost-user-crypto devices only, not virtio-net",
    "vhost_send_device_iotlb_msg": "needs VIRTIO_F_IOMMU_PLATFORM and a vIOMMU; the legacy "
                                   "device without one never has an IOTLB",
    "vhost_set_iotlb_callback": "runs (a no-op for vhost-user) only with a vIOMMU, and sends "
                                "nothing",
    "vhost_set_vring_endian": "only a cross-endian legacy guest needs it (big-endian guest "
                              "on this little-endian host)",
    "vhost_get_config": "virtio-net reads vhost config only for vhost-vdpa peers",
    "vhost_set_config": "virtio-net writes vhost config only for vhost-vdpa peers",
    "vhost_reset_device": "QEMU 5.2 and 7.2 never reset a vhost-user-net back-end "
                          "(RESET_DEVICE); 10.0 does, at a device reset",
    "vhost_backend_cleanup": "called when QEMU drops the device, but sends no message",
    "vhost_backend_memslots_limit": "called at every memory change, but answered locally",
    "vhost_get_vq_index": "called for every ring, but answered locally",
    "vhost_requires_shm_log": "called when logging starts, but answered locally",
    "vhost_backend_can_merge": "called while building the memory table, but answered locally",
}


def coverage(version: Sequence[int] | None = (7, 2),
             steps: Sequence[Step] = STEPS) -> dict[str, list[str]]:
    """op -> the steps whose expected messages make QEMU ``version`` call it (from the data).

    The same attribution as a live run (:func:`attribute_ops`) applied to each
    step's expected requests, so the lab's column needs no QEMU; tests hold
    the expectations against real QEMUs.
    """
    out: dict[str, list[str]] = {}
    conn = {"source": 1, "destination": 2}
    owned: list[TraceRecord] = []
    for step in steps:
        msgs, _absent, _note = step.expected(version)
        records = [TraceRecord(len(owned) + i + 1, 0.0, conn[step.on], TO_BACKEND, m,
                               _recorded_fields(msgs, i), b"", 0)
                   for i, m in enumerate(msgs)]
        pairs = attribute_ops(owned + records)
        owned += records
        for _rec, op in pairs[len(pairs) - len(records):]:
            out.setdefault(op, [])
            if step.name not in out[op]:
                out[op].append(step.name)
    return out


def _recorded_fields(msgs: Sequence[str], i: int) -> dict:
    # The data names requests only: a SET_STATUS beside GET_VRING_BASE is the reset (0).
    if msgs[i] != "SET_STATUS":
        return {}
    near = msgs[max(i - 1, 0):i + 2]
    return {"payload": {"value": 0 if "GET_VRING_BASE" in near else 0xF}}


def coverage_column(seen: Mapping[str, Sequence[str]] | None = None,
                    version: Sequence[int] | None = None) -> dict[str, str]:
    """op -> "called by real QEMU here, by which action": the steps, or why not.

    ``seen`` is a live run's ``QemuStepper.ops_seen()``. Without it the column
    comes from the steps' recorded expectations (:func:`coverage`): for
    ``version``, or when that is None merged over the releases CI runs, with
    the releases named where they differ, e.g. ``"start QEMU (10.0)"``.
    """
    if seen is None and version is not None:
        seen = coverage(version)
    if seen is not None:
        out = {op: "yes: " + ", ".join(steps) for op, steps in seen.items()}
    else:
        per = {rel: coverage(rel) for rel in CI_QEMU_RELEASES}
        ops: dict[str, dict[str, list[str]]] = {}
        for rel, cov in per.items():
            for op, steps in cov.items():
                for st in steps:
                    ops.setdefault(op, {}).setdefault(st, []).append(".".join(map(str, rel)))
        out = {}
        for op, by_step in ops.items():
            order = [st.name for st in STEPS if st.name in by_step]
            parts = [name if len(by_step[name]) == len(per)
                     else f"{name} ({', '.join(by_step[name])})" for name in order]
            out[op] = "yes: " + ", ".join(parts)
    for op, why in NOT_CALLABLE_HERE.items():
        out.setdefault(op, "no: " + why)
    return out
