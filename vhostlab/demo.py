"""`vhostlab demo`: a narrated live migration that shows the real vhost-user messages.

This module only chooses who plays QEMU's part and prints the summary; the
migrations themselves live with their front-ends:

- ``qemu``: two real QEMUs, each with its own back-end
  (:mod:`vhostlab.qemu.demo`);
- ``builtin``: the kit's Python front-end between two back-ends
  (:mod:`vhostlab.frontend.demo`);

either against vhostlab's back-ends or, with ``--backend dpdk``, DPDK's
(testpmd behind a recording relay);
- ``recorded``: no back-end at all, the start-up and migration sequence QEMU
  7.2 sent (:mod:`vhostlab.protocol.recorded`), decoded by the protocol layer
  and narrated here.

``--ring packed`` runs the guest's virtqueues packed (VIRTIO_F_RING_PACKED):
only the built-in front-end can, as QEMU's legacy virtio-net-pci (the labs'
QEMU device) cannot negotiate packed rings.

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
PACKED_FRONTENDS = ("builtin",)     # who can negotiate VIRTIO_F_RING_PACKED


def choose(frontend: str, ring: str = "split") -> str:
    """Resolve ``auto`` the way the labs do: real QEMU when present, else built-in
    (always built-in for packed rings, which the labs' QEMU device cannot run)."""
    if frontend != "auto":
        return frontend
    if ring == "packed":
        return "builtin"
    return doctor.choose_frontend(doctor.qemu_info())


def ring_refusal(frontend: str, ring: str) -> str | None:
    """Why ``frontend`` cannot run ``ring`` rings, or None when it can."""
    if ring == "split" or frontend in PACKED_FRONTENDS:
        return None
    if frontend == "qemu":
        return ("--ring packed: QEMU's legacy virtio-net-pci (disable-modern=on, the labs' "
                "device) cannot negotiate packed rings: its 32-bit legacy feature register "
                "cannot carry VIRTIO_F_RING_PACKED (bit 34); use --frontend builtin")
    return f"--ring packed: the {frontend} front-end has no rings; use --frontend builtin"


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
    parser.add_argument("--ring", choices=("split", "packed"), default="split",
                        help="the guest's virtqueues: split, or packed (VIRTIO_F_RING_PACKED; "
                             "built-in front-end only)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON summary on stdout (narration goes to stderr)")
    parser.add_argument("--break-logging", action="store_true",
                        help="make the back-end skip dirty logging; the integrity check must then fail")


def run(args) -> int:
    ring = getattr(args, "ring", "split")
    frontend = choose(args.frontend, ring)
    say = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    say(f"front-end: {frontend}" + (" (chosen automatically)" if args.frontend == "auto" else "")
        + f", back-end: {args.backend}" + (f", rings: {ring}" if ring != "split" else ""))
    kwargs = {} if args.backend == "vhostlab" else {"backend": args.backend}
    if ring != "split":
        kwargs["ring"] = ring
    refusal = ring_refusal(frontend, ring)
    if refusal:
        summary, code = {"frontend": frontend, "backend": args.backend, "error": refusal}, EXIT_SETUP
        say(refusal)
    elif args.backend != "vhostlab" and frontend == "recorded":
        summary, code = {"frontend": frontend, "backend": args.backend,
                         "error": "a recording has no back-end"}, EXIT_SETUP
        say("recorded: --backend needs a live back-end (use --frontend builtin or qemu)")
    else:
        summary, code = _runner(frontend)(as_json=args.json, break_logging=args.break_logging,
                                          out=say, **kwargs)
    summary.setdefault("backend", args.backend)
    summary.setdefault("ring", ring)
    if args.json:
        print(json.dumps(summary))
    return code
