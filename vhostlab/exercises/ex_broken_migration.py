"""Exercise broken_migration: read the trace of a migration that went wrong, your own.

The trace is not made up: :func:`broken_run` runs the kit's built-in live
migration with one fault switched on and keeps what the source back-end
recorded. Which fault depends on the student (:func:`student_id`, hashed):

    logging_skipped        the back-ends never mark the log (the demo's negative control)
    final_sync_skipped     the front-end leaves out vhost_log_put's last sync at the stop
    wrong_vring_base       the source answers GET_VRING_BASE for the RX ring 2 short
    used_ring_not_logged   the back-end ignores VHOST_VRING_F_LOG (its used-ring writes)
    f_log_not_sent         the front-end sends SET_VRING_ADDR without VHOST_VRING_F_LOG

The learner answers from the evidence (which frames, which page, which
message), each checked against that student's run; ``check()`` shows the
right answer only after ``VHOSTLAB_REVEAL_AFTER`` attempts (0, the default:
never). A written answer (graded by hand) says which step failed and why.

The student id is ``VHOSTLAB_STUDENT`` (``vhostlab grade`` sets it per
submission), else nbgrader's ``autograded/<student>/<assignment>/`` folder
the notebook runs in, else ``JUPYTERHUB_USER``, else the login name.
"""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vhostlab.backend import handlers
from vhostlab.exercises.checks import Case, Exercise, Mistake, Question
from vhostlab.protocol import TO_BACKEND, TO_FRONTEND, Message, Request, VringAddr, VringState

__all__ = ["EXERCISE", "SETUP", "BrokenRun", "FAULTS", "broken_run", "fault_for",
           "student_id", "reveal_after"]

SETUP = '''\
from vhostlab.exercises import bind
from vhostlab.exercises.ex_broken_migration import broken_run

ex = bind("broken_migration", globals())
run = broken_run()          # a real built-in migration, broken in a way that is yours
print(f"student {run.student!r}: integrity {run.summary['integrity']}")'''

FAULTS = ("logging_skipped", "final_sync_skipped", "wrong_vring_base",
          "used_ring_not_logged", "f_log_not_sent")
RX_QUEUE = 0
VRING_BASE_SHORT = 2

SOLUTION_FRAMES = '''\
lost_frames = sorted(f"RX #{seq}" for seq in run.rx_sent if run.rx_seen.get(seq, 0) != 1) \\
    + sorted(f"TX #{seq}" for seq in run.tx_sent if run.tx_seen.get(seq, 0) != 1)'''
SOLUTION_PAGE = '''\
final = run.dirty_rounds[-1]                  # the final sync, with the switch-over's check
bad_page = int(final.mismatched[0].page) if final.mismatched else None'''
SOLUTION_MESSAGE = '''\
first_wrong_message = None
for r in run.source_trace:
    if r.request == "GET_VRING_BASE" and r.direction == "back-end to front-end" \\
            and r.fields["payload"]["num"] != run.rings_at_stop.get(r.fields["payload"]["index"]):
        first_wrong_message = r.seq
        break
    if r.request == "SET_VRING_ADDR" and r.direction == "front-end to back-end" \\
            and run.logging_on_seq and r.seq > run.logging_on_seq \\
            and not r.fields["payload"]["flags"] & 1:
        first_wrong_message = r.seq
        break'''


def student_id() -> str:
    """Who this notebook belongs to (see the module docstring for the order)."""
    explicit = os.environ.get("VHOSTLAB_STUDENT", "").strip()
    if explicit:
        return explicit
    here = Path.cwd()
    if here.parent.parent.name == "autograded":    # nbgrader autograde's working folder
        return here.parent.name
    return os.environ.get("JUPYTERHUB_USER", "").strip() or getpass.getuser()


def fault_for(student: str) -> str:
    """The fault a student's migration carries: stable, spread over FAULTS.
    ``VHOSTLAB_FAULT_SALT`` (a course secret) changes the assignment per course."""
    salt = os.environ.get("VHOSTLAB_FAULT_SALT", "")
    digest = hashlib.sha256(f"{salt}:{student}".encode()).digest()
    return FAULTS[int.from_bytes(digest[:4], "big") % len(FAULTS)]


def reveal_after() -> int:
    """Attempts after which check() shows the right answer (0: never)."""
    try:
        return max(0, int(os.environ.get("VHOSTLAB_REVEAL_AFTER", "0")))
    except ValueError:
        return 0


# ---------------------------------------------------------------- the faults
def _short_rx_base(dev, msg, fds):
    state = handlers.get_vring_base(dev, msg, fds)
    if state.index != RX_QUEUE:
        return state
    return VringState(state.index, (state.num - VRING_BASE_SHORT) & 0xFFFF)


def _ignore_f_log(dev, msg, fds):
    addr = msg.payload
    if isinstance(addr, VringAddr) and addr.flags & 1:
        msg = Message.make(Request.SET_VRING_ADDR, VringAddr(
            addr.index, addr.flags & ~1, addr.desc_user_addr, addr.used_user_addr,
            addr.avail_user_addr, addr.log_guest_addr))
    return handlers.set_vring_addr(dev, msg, fds)


def _migration(fault: str):
    from vhostlab.frontend.migration import BuiltinMigration
    knobs: dict[str, Any] = {
        "logging_skipped": {"break_logging": True},
        "final_sync_skipped": {"skip_final_sync": True},
        "wrong_vring_base": {"backend_handlers": {Request.GET_VRING_BASE: _short_rx_base}},
        "used_ring_not_logged": {"backend_handlers": {Request.SET_VRING_ADDR: _ignore_f_log}},
        "f_log_not_sent": {"log_used_ring": False},
    }[fault]
    return BuiltinMigration(wait_timeout=3.0, **knobs)


@dataclass(frozen=True)
class BrokenRun:
    """What one student's broken migration left: summary, traces, rounds, frames."""

    student: str
    summary: dict
    source_trace: tuple      # the source back-end's TraceRecords, in order
    destination_trace: tuple
    rounds: tuple            # BuiltinRound per copy round
    dirty_rounds: tuple      # DirtyRound per sync; the last is the final sync
    rings_at_stop: dict      # ring index -> last_avail_idx when GET_VRING_BASE came
    rx_sent: tuple
    rx_seen: dict            # frame seq -> times the guest read it intact
    tx_sent: tuple
    tx_seen: dict
    logging_on_seq: int | None   # seq of the SET_FEATURES that carried VHOST_F_LOG_ALL
    fault: str               # not shown in the notebook; the grader's key

    def rounds_table(self) -> str:
        """Per round: pages copied, pages the guest and the vhost log reported, frames."""
        rows = ["round  phase           copied  by guest  from vhost log  RX frames after"]
        for snap in self.rounds:
            r = snap.summary()
            rows.append(f"{r['round']:5}  {r['phase']:14} {r['pages_copied']:7} "
                        f"{r['pages_dirtied_by_guest']:9} {r['pages_from_vhost_log']:15} "
                        f"{r['rx_frames_after_copy']:16}")
        return "\n".join(rows)

    def __repr__(self) -> str:
        return f"<BrokenRun of {self.student!r}: integrity {self.summary.get('integrity')}>"


_RUNS: dict[str, BrokenRun] = {}


def broken_run(student: str | None = None) -> BrokenRun:
    """This student's broken migration, run once per process."""
    student = student_id() if student is None else student
    if student not in _RUNS:
        fault = fault_for(student)
        migration = _migration(fault)
        summary = migration.run()
        trace = tuple(migration.src.server.trace.records())
        stops = {r.index: r.last_avail_idx for r in migration.switchover.taken("source")}
        log_on = next((r.seq for r in trace if r.direction == TO_BACKEND
                       and r.request == "SET_FEATURES"
                       and "VHOST_F_LOG_ALL" in r.fields["payload"].get("names", ())), None)
        _RUNS[student] = BrokenRun(
            student, summary, trace, tuple(migration.dst.server.trace.records()),
            tuple(migration.snapshots), tuple(migration.dirty_rounds), stops,
            tuple(migration.rx.sent), dict(migration.rx.seen),
            tuple(migration.tx.sent), dict(migration.tx.seen), log_on, fault)
    return _RUNS[student]


# ---------------------------------------------------------------- the right answers
def _frames(run: BrokenRun) -> list[str]:
    return sorted(f"RX #{s}" for s in run.rx_sent if run.rx_seen.get(s, 0) != 1) \
        + sorted(f"TX #{s}" for s in run.tx_sent if run.tx_seen.get(s, 0) != 1)


def _bad_pages(run: BrokenRun) -> set[int]:
    return {int(m.page) for m in run.dirty_rounds[-1].mismatched} if run.dirty_rounds else set()


def _wrong_message(run: BrokenRun) -> int | None:
    for r in run.source_trace:
        payload = r.fields.get("payload") or {}
        if r.request == "GET_VRING_BASE" and r.direction == TO_FRONTEND \
                and payload.get("num") != run.rings_at_stop.get(payload.get("index")):
            return r.seq
        if r.request == "SET_VRING_ADDR" and r.direction == TO_BACKEND and run.logging_on_seq \
                and r.seq > run.logging_on_seq and run.fault == "f_log_not_sent" \
                and not payload.get("flags", 0) & 1:
            return r.seq
    return None


class _Reference:
    """The right answer, computed from this student's run when a check needs it."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def value(self) -> Any:
        return self.fn(broken_run())


def _value(targets, args) -> Any:
    return targets[0].value() if isinstance(targets[0], _Reference) else targets[0]


def _nothing():
    @contextlib.contextmanager
    def setup():
        yield ()
    return setup


@dataclass
class _Attempts:
    n: int = 0


_TRIES: dict[str, _Attempts] = {}


def _revealing(question: str, how: str):
    """A Mistake that counts wrong attempts and, from the reveal_after()-th on,
    shows the right answer for this student's run and how to read it."""
    def when(got, want, args) -> bool:
        tries = _TRIES.setdefault(question, _Attempts())
        tries.n += 1
        limit = reveal_after()
        return bool(limit) and tries.n >= limit

    def say(got, want, args) -> str:
        shown = sorted(want) if isinstance(want, set) else want
        return f"after {_TRIES[question].n} attempts, the answer for your run: {shown!r}. {how}"
    return Mistake(when, say)


def _frames_ok(got, want) -> bool:
    try:
        return sorted(str(x).strip() for x in got) == want
    except TypeError:
        return False


Q1 = Question(
    name="q1", title="which frames went missing (or came twice)?", targets=("lost_frames",),
    kind="value", run=_value, reference=None,
    compare=_frames_ok,
    cases=(Case("your list of frames", _nothing()),),
    mistakes=(
        Mistake(lambda got, want, args: not isinstance(got, (list, tuple, set)),
                "give a list of frame names as strings, such as [\"RX #12\", \"RX #13\"]."),
        _revealing("q1", "Every RX and TX frame whose count in run.rx_seen / run.tx_seen "
                         "is not exactly 1."),
        Mistake(lambda got, want, args: True,
                "not the frames the guest lost or got twice in your run. Compare what was "
                "sent (run.rx_sent, run.tx_sent) with what the guest read (run.rx_seen, "
                "run.tx_seen: times each frame arrived intact)."),
    ),
    hints=("The summary's frames counts say how many; run.rx_seen says which.",
           "A frame read 0 times was lost; read twice, it came again after the switch-over."),
    solution=SOLUTION_FRAMES,
)

Q2 = Question(
    name="q2", title="which page differs at the destination?", targets=("bad_page",),
    kind="value", run=_value, reference=None,
    compare=lambda got, want: got == want if want is None or got is None else
    isinstance(got, int) and got in want,
    cases=(Case("your page", _nothing()),),
    mistakes=(
        Mistake(lambda got, want, args: got is not None and not isinstance(got, int),
                "give a page number (an int), or None if every page matched."),
        _revealing("q2", "The final DirtyRound (run.dirty_rounds[-1]) lists the mismatched "
                         "pages; any one of them is right, None when it lists none."),
        Mistake(lambda got, want, args: want is None,
                "in your run every page matched at the switch-over: the RAM was copied "
                "right, and what went wrong is elsewhere. Answer None."),
        Mistake(lambda got, want, args: True,
                "that page is the same at both ends in your run. The final sync's "
                "DirtyRound knows which pages differ."),
    ),
    hints=("run.dirty_rounds[-1] is the final sync, with the switch-over's page check.",
           "Each mismatched page comes with the frames that lived in it; and the bands say "
           "whether it is a ring or a buffer."),
    solution=SOLUTION_PAGE,
)

Q3 = Question(
    name="q3", title="which message was wrong?", targets=("first_wrong_message",),
    kind="value", run=_value, reference=None,
    cases=(Case("your seq", _nothing()),),
    mistakes=(
        Mistake(lambda got, want, args: got is not None and not isinstance(got, int),
                "give the seq (an int) of a message in run.source_trace, or None."),
        _revealing("q3", "Look for a GET_VRING_BASE reply whose num differs from "
                         "run.rings_at_stop, or a SET_VRING_ADDR after logging went on "
                         "whose flags lack VHOST_VRING_F_LOG (1); None if neither."),
        Mistake(lambda got, want, args: want is None,
                "in your run every message carried what the seed says it should: the fault "
                "is in what a side did (or did not do) with them. Answer None."),
        Mistake(lambda got, want, args: True,
                "that message carried what it should. Compare each message that matters to "
                "migration with what the seed expects of it at that point."),
    ),
    hints=("The messages that matter: SET_LOG_BASE, SET_FEATURES with VHOST_F_LOG_ALL, "
           "SET_VRING_ADDR with VHOST_VRING_F_LOG, GET_VRING_BASE's reply.",
           "run.rings_at_stop says where each ring really stood when GET_VRING_BASE came."),
    solution=SOLUTION_MESSAGE,
)


def _bind_reference(q: Question, fn) -> Question:
    from dataclasses import replace
    return replace(q, reference=_Reference(fn))


# The right answers come from this student's own run, made when first checked.
Q1 = _bind_reference(Q1, _frames)
Q2 = _bind_reference(Q2, lambda run: (_bad_pages(run) or None))
Q3 = _bind_reference(Q3, _wrong_message)

EXERCISE = Exercise(name="broken_migration", title="Read the trace of a broken migration",
                    questions=(Q1, Q2, Q3), setup=SETUP, solution_allowed=False)
