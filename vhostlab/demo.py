"""`vhostlab demo`: a narrated live migration that shows the real vhost-user messages.

This module only chooses who plays QEMU's part and prints the summary; the
migrations themselves live with their front-ends:

- ``qemu``: two real QEMUs, each with its own vhostlab back-end
  (:mod:`vhostlab.qemu.demo`);
- ``builtin``: the kit's Python front-end between two back-ends
  (:mod:`vhostlab.frontend.demo`);
- ``recorded``: no back-end at all, the start-up and migration sequence QEMU
  7.2 sent (:mod:`vhostlab.protocol.recorded`), decoded by the protocol layer
  and narrated here.

Exit codes: 0 when the integrity check passed, 3 when frames were lost or
corrupted (``--break-logging`` must produce that), 2 for a set-up failure.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Callable

from vhostlab import doctor
from vhostlab.protocol import format_message
from vhostlab.protocol.recorded import QEMU_7_2_PHASES, QEMU_7_2_SEQUENCE, RecordedMessage

EXIT_OK, EXIT_SETUP, EXIT_CORRUPTED = 0, 2, 3


def choose(frontend: str) -> str:
    """Resolve ``auto`` the way the labs do: real QEMU when present, else built-in."""
    if frontend != "auto":
        return frontend
    return doctor.choose_frontend(doctor.qemu_info())


def _runner(frontend: str):
    if frontend == "qemu":
        from vhostlab.qemu.demo import run_demo
        return run_demo
    if frontend == "builtin":
        from vhostlab.frontend.demo import run_demo
        return run_demo
    return run_recorded


def narrate(entry: RecordedMessage) -> str:
    """One line for a recorded message, as every narration prints a message."""
    fields = entry.message.fields()
    return format_message(entry.direction, fields["request"], fields, entry.nfds)


def run_recorded(as_json: bool = False, break_logging: bool = False,
                 out: Callable[..., Any] = print) -> tuple[dict, int]:
    """Narrate QEMU 7.2's recorded conversation phase by phase; no back-end runs.

    Returns (summary, exit code): 0, or 2 with ``break_logging``, which
    needs a live back-end whose logging can be broken.
    """
    summary: dict[str, Any] = {"frontend": "recorded", "qemu": "7.2",
                               "phases": {p: len(e) for p, e in QEMU_7_2_PHASES},
                               "messages": len(QEMU_7_2_SEQUENCE)}
    if break_logging:
        summary["error"] = "--break-logging needs a live back-end"
        out("recorded: --break-logging needs a live back-end (use --frontend builtin or qemu)")
        return summary, EXIT_SETUP
    for phase, entries in QEMU_7_2_PHASES:
        out(f"== {phase}")
        for entry in entries:
            out("  " + narrate(entry))
    out(f"{len(QEMU_7_2_SEQUENCE)} messages. Values marked as examples in "
        "vhostlab.protocol.recorded are illustrative; the order is QEMU's.")
    summary["integrity"] = "not applicable (a recording moves no frames)"
    return summary, EXIT_OK


def add_arguments(parser) -> None:
    parser.add_argument("--frontend", choices=("auto", "builtin", "qemu", "recorded"), default="auto",
                        help="who plays QEMU's part (auto: real QEMU when present, else built-in)")
    parser.add_argument("--backend", choices=("vhostlab", "dpdk"), default="vhostlab",
                        help="whose back-ends serve the two hosts: this kit's, or DPDK's "
                             "vhost back-end (dpdk-testpmd)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON summary on stdout (narration goes to stderr)")
    parser.add_argument("--break-logging", action="store_true",
                        help="make the back-end skip dirty logging; the integrity check must then fail")


def run(args) -> int:
    frontend = choose(args.frontend)
    say = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    say(f"front-end: {frontend}" + (" (chosen automatically)" if args.frontend == "auto" else "")
        + f", back-end: {args.backend}")
    kwargs = {} if args.backend == "vhostlab" else {"backend": args.backend}
    if kwargs and frontend == "recorded":
        summary, code = {"frontend": frontend, "backend": args.backend,
                         "error": "a recording has no back-end"}, EXIT_SETUP
        say("recorded: --backend needs a live back-end (use --frontend builtin or qemu)")
    else:
        summary, code = _runner(frontend)(as_json=args.json, break_logging=args.break_logging,
                                          out=say, **kwargs)
    summary.setdefault("backend", args.backend)
    if args.json:
        print(json.dumps(summary))
    return code
