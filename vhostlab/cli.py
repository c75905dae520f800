"""The `vhostlab` command: one subcommand per job a learner or instructor has.

Subcommands import their module lazily so that `vhostlab doctor` answers even
when numba or another heavy dependency is broken.
"""
from __future__ import annotations

import argparse
import sys


def _doctor(args: argparse.Namespace) -> int:
    from vhostlab import doctor
    return doctor.main(as_json=args.json)


def _demo(args: argparse.Namespace) -> int:
    from vhostlab import demo
    return demo.run(args)


def _bench(args: argparse.Namespace) -> int:
    from vhostlab import bench
    return bench.run(args)


def _lab(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path
    labs = Path(args.dir)
    os.execvp(sys.executable, [sys.executable, "-m", "jupyterlab", str(labs)])
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vhostlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="what this machine offers the labs")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=_doctor)

    p = sub.add_parser("demo", help="a narrated live migration showing the real vhost-user messages")
    p.add_argument("--frontend", choices=("auto", "builtin", "qemu", "recorded"), default="auto",
                   help="who plays QEMU's part (auto: real QEMU when present)")
    p.add_argument("--json", action="store_true", help="print one JSON summary instead of the narration")
    p.add_argument("--break-logging", action="store_true",
                   help="make the back-end skip dirty logging; the integrity check must then fail")
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", help="numba kernels against their Python twins")
    p.add_argument("--json", action="store_true", help="machine-readable results")
    p.add_argument("--peer", choices=("none", "dpdk"), default="none",
                   help="dpdk: DPDK's virtio-user transmits into this back-end and into DPDK's own")
    p.set_defaults(func=_bench)

    p = sub.add_parser("lab", help="open JupyterLab on the labs")
    p.add_argument("dir", nargs="?", default="labs")
    p.set_defaults(func=_lab)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
