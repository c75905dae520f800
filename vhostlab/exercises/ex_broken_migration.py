"""Exercise broken_migration: read the trace of a migration that went wrong.

The trace is not made up: :func:`broken_run` runs the kit's built-in live
migration with the back-ends' dirty logging switched off
(``BuiltinMigration(break_logging=True)``, the demo's negative control) and
keeps what the source back-end recorded. The messages all look right; the
numbers per round do not. The learner answers two questions whose answers
are checked: a letter, and the trace position of one message.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from vhostlab.exercises.checks import Case, Exercise, Mistake, Question
from vhostlab.frontend.migration import BuiltinMigration
from vhostlab.protocol import Feature

__all__ = ["EXERCISE", "SETUP", "BrokenRun", "broken_run", "CHOICES"]

SETUP = '''\
from vhostlab.exercises import bind
from vhostlab.exercises.ex_broken_migration import CHOICES, broken_run

ex = bind("broken_migration", globals())
run = broken_run()          # a real built-in migration, with dirty logging broken'''

CHOICES = {
    "A": "QEMU never sent SET_LOG_BASE, so the back-end had no log to write into.",
    "B": "The log was set up and logging switched on, but the back-end did not mark the "
         "pages it wrote: frames and used-ring updates it wrote into pages already copied "
         "never reached the destination.",
    "C": "GET_VRING_BASE returned the wrong index, so the destination resumed at the wrong "
         "place in the rings.",
    "D": "The destination back-end refused the memory table, so it wrote into the wrong "
         "memory.",
}
ANSWER = "B"
LOG_ALL = Feature.VHOST_F_LOG_ALL.name

SOLUTION_WHAT_WENT_WRONG = 'what_went_wrong = "B"'
SOLUTION_LOG_ALL_SEQ = '''\
log_all_seq = next(r.seq for r in run.source_trace
                   if r.direction == "in" and r.request == "SET_FEATURES"
                   and "VHOST_F_LOG_ALL" in r.fields["payload"]["names"])'''


@dataclass(frozen=True)
class BrokenRun:
    """What a broken migration left: its summary and both back-ends' traces."""

    summary: dict
    source_trace: tuple      # the source back-end's TraceRecords, in order
    destination_trace: tuple
    rounds: tuple            # the migration's RoundSnapshots

    def rounds_table(self) -> str:
        """Per round: pages copied, pages the guest and the vhost log reported, frames."""
        rows = ["round  phase           copied  by guest  from vhost log  RX frames after"]
        for snap in self.rounds:
            r = snap.summary()
            rows.append(f"{r['round']:5}  {r['phase']:14} {r['pages_copied']:7} "
                        f"{r['pages_dirtied_by_guest']:9} {r['pages_from_vhost_log']:15} "
                        f"{r['rx_frames_after_copy']:16}")
        return "\n".join(rows)


_RUN: BrokenRun | None = None


def broken_run() -> BrokenRun:
    """The broken migration, run once per process (the same trace every time asked)."""
    global _RUN
    if _RUN is None:
        migration = BuiltinMigration(break_logging=True)
        summary = migration.run()
        _RUN = BrokenRun(summary, tuple(migration.src.server.trace.records()),
                         tuple(migration.dst.server.trace.records()),
                         tuple(migration.snapshots))
    return _RUN


def _value(targets, args) -> Any:
    return targets[0]() if callable(targets[0]) else targets[0]


def _letter(targets, args) -> Any:
    value = _value(targets, args)
    return value.strip().upper() if isinstance(value, str) else value


def _nothing():
    @contextlib.contextmanager
    def setup():
        yield ()
    return setup


def _says(letter: str):
    return lambda got, want, args: got == letter


Q1 = Question(
    name="q1", title="what went wrong?", targets=("what_went_wrong",), kind="value",
    reference=ANSWER, run=_letter,
    cases=(Case("your answer", _nothing()),),
    mistakes=(
        Mistake(lambda got, want, args: got not in CHOICES,
                "answer with one letter, A, B, C or D, as a string: what_went_wrong = \"A\"."),
        Mistake(_says("A"), "look at the trace again: SET_LOG_BASE is there, with its fd, "
                            "and the back-end replied 0 (success)."),
        Mistake(_says("C"), "compare the source's GET_VRING_BASE replies with the "
                            "destination's SET_VRING_BASE requests (run.destination_trace): "
                            "the numbers are the same. Look at what the vhost log reported."),
        Mistake(_says("D"), "the destination's trace shows SET_MEM_TABLE answered 0 (success); "
                            "and the pages that differ are pages the source wrote."),
    ),
    hints=(
        "Every message in the trace was accepted. Look at the per-round table instead: "
        "how many pages did the vhost log report, and how many RX frames were written?",
        "Which pages can only the vhost log report? Not the guest's own writes.",
    ),
    solution=SOLUTION_WHAT_WENT_WRONG,
)


def _log_all_seq() -> int:
    return next(r.seq for r in broken_run().source_trace
                if r.direction == "in" and r.request == "SET_FEATURES"
                and LOG_ALL in r.fields["payload"]["names"])


def _seq_of(request: str, direction: str = "in", nth: int = 0):
    def when(got, want, args) -> bool:
        seqs = [r.seq for r in broken_run().source_trace
                if r.request == request and r.direction == direction]
        return len(seqs) > nth and got == seqs[nth]
    return when


Q2 = Question(
    name="q2", title="which message switched dirty logging on?", targets=("log_all_seq",),
    kind="value", reference=_log_all_seq, run=_value,
    cases=(Case("your answer", _nothing()),),
    mistakes=(
        Mistake(lambda got, want, args: not isinstance(got, int),
                "give the message's seq number from the trace, an int."),
        Mistake(_seq_of("SET_LOG_BASE"), "SET_LOG_BASE hands the back-end the log (an fd and a "
                                         "size) but does not switch logging on; the seed: "
                                         "'QEMU needs to notify vhost backend to start writing "
                                         "dirty page bitmap' through vhost_set_features."),
        Mistake(_seq_of("SET_FEATURES"), "that SET_FEATURES is the one from start-up: its "
                                         "payload has no VHOST_F_LOG_ALL (bit 26)."),
        Mistake(lambda got, want, args: got == want + 1,
                "that is the back-end's reply (direction out); give the request's seq."),
        Mistake(_seq_of("SET_VRING_ADDR", nth=2), "SET_VRING_ADDR with VHOST_VRING_F_LOG asks "
                                                  "for the used ring to be logged, once "
                                                  "logging is on; it is not what turns it on."),
    ),
    hints=(
        "The seed, step 2: vhost_log_global_start() -> ... -> vhost_dev_set_features() -> "
        "vhost_set_features().",
        "There are two SET_FEATURES in the source's trace; one of them has VHOST_F_LOG_ALL "
        "among its payload's names.",
    ),
    solution=SOLUTION_LOG_ALL_SEQ,
)

EXERCISE = Exercise(name="broken_migration", title="Read the trace of a broken migration",
                    questions=(Q1, Q2), setup=SETUP)
