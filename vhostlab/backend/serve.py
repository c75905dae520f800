"""`vhostlab serve`: run the vhost-user-net back-end as a process.

    vhostlab serve --socket PATH [--client] [--queues N]
                   [--wire sink|loopback|pcap:FILE] [--mode event|poll]
                   [--once] [--trace FILE]

It exits 0 on SIGINT or SIGTERM (the spec's "Backend program conventions":
"The back-end program must end (as quickly and cleanly as possible) when
the SIGTERM signal is received"), or with --once when the front-end
leaves, and prints exactly one JSON line on stdout: guest_tx_frames,
guest_tx_bytes, guest_rx_frames, guest_rx_bytes, dropped, pages_logged,
messages (name -> count) and errors. Logs go to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from vhostlab.backend.errors import BackendError
from vhostlab.backend.server import BackendServer
from vhostlab.command import standalone


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `serve`'s options to `parser`."""
    parser.add_argument("--socket", required=True, metavar="PATH",
                        help="unix socket path; its directory must be private (mode 0700)")
    parser.add_argument("--client", action="store_true",
                        help="connect to a front-end that listens at PATH (QEMU server=on)")
    parser.add_argument("--queues", type=int, default=1, metavar="N",
                        help="number of RX/TX queue pairs (default 1)")
    parser.add_argument("--wire", default="sink", metavar="sink|loopback|pcap:FILE",
                        help="where guest TX frames go (default sink)")
    parser.add_argument("--mode", choices=("event", "poll"), default="event",
                        help="event: sleep until kicked (default); poll: busy-poll for benchmarks")
    parser.add_argument("--once", action="store_true",
                        help="exit when the first front-end disconnects")
    parser.add_argument("--trace", metavar="FILE",
                        help="append every message in and out to FILE as JSON lines")
    parser.add_argument("--break-logging", action="store_true",
                        help="skip dirty logging (a migration demo's negative control)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")


def run(args: argparse.Namespace) -> int:
    """Serve until a signal (or, with --once, the front-end leaves); print the JSON summary."""
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.INFO,
                        format="vhostlab serve: %(message)s")
    try:
        server = BackendServer(args.socket, client=args.client, queue_pairs=args.queues,
                               wire=args.wire, mode=args.mode, once=args.once,
                               break_logging=args.break_logging, trace_path=args.trace)
    except (BackendError, ValueError, OSError) as exc:
        print(f"vhostlab serve: {exc}", file=sys.stderr)
        return 2
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda signum, frame: server.stop())
    try:
        server.run()
    except (BackendError, OSError) as exc:
        print(f"vhostlab serve: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(json.dumps(server.summary()), flush=True)
    return 0


main = standalone("serve", __doc__, add_arguments, run)


if __name__ == "__main__":
    sys.exit(main())
