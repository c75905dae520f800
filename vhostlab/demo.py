"""`vhostlab demo`: a narrated live migration that shows the real vhost-user messages.

This module only chooses who plays QEMU's part and prints the summary; the
migrations themselves live with their front-ends:

- ``qemu``: two real QEMUs, each with its own vhostlab back-end
  (:mod:`vhostlab.qemu.demo`);
- ``builtin``: the kit's Python front-end between two back-ends
  (:mod:`vhostlab.frontend.demo`);
- ``recorded``: no back-end at all, the start-up and migration sequence QEMU
  7.2 sent, decoded by the protocol layer.

Exit codes: 0 when the integrity check passed, 3 when frames were lost or
corrupted (``--break-logging`` must produce that), 2 for a set-up failure.
"""
from __future__ import annotations

import json
import sys

from vhostlab import doctor

EXIT_OK, EXIT_SETUP, EXIT_CORRUPTED = 0, 2, 3


def choose(frontend: str) -> str:
    """Resolve ``auto`` the way the labs do: real QEMU when present, else built-in."""
    if frontend != "auto":
        return frontend
    return doctor.choose_frontend(doctor.qemu_info())


def _runner(frontend: str):
    if frontend == "qemu":
        from vhostlab.qemu.demo import run_demo
    elif frontend == "builtin":
        from vhostlab.frontend.demo import run_demo
    else:
        from vhostlab.protocol.recorded import run_demo
    return run_demo


def add_arguments(parser) -> None:
    parser.add_argument("--frontend", choices=("auto", "builtin", "qemu", "recorded"), default="auto",
                        help="who plays QEMU's part (auto: real QEMU when present, else built-in)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON summary on stdout (narration goes to stderr)")
    parser.add_argument("--break-logging", action="store_true",
                        help="make the back-end skip dirty logging; the integrity check must then fail")


def run(args) -> int:
    frontend = choose(args.frontend)
    say = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    say(f"front-end: {frontend}" + (" (chosen automatically)" if args.frontend == "auto" else ""))
    summary, code = _runner(frontend)(as_json=args.json, break_logging=args.break_logging, out=say)
    if args.json:
        print(json.dumps(summary))
    return code
