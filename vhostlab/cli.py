"""The `vhostlab` command: one subcommand per job a learner or instructor has.

Each subcommand lives in its own module, which defines ``add_arguments(parser)``
and ``run(args) -> int``. Only the chosen subcommand's module is imported, so
`vhostlab doctor` answers even when numba or another heavy layer is broken,
and `vhostlab --help` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: name -> (module, one-line help)
SUBCOMMANDS = {
    "doctor": ("vhostlab.doctor", "what this machine offers the labs, and how to get what is missing"),
    "demo": ("vhostlab.demo", "a narrated live migration showing the real vhost-user messages"),
    "serve": ("vhostlab.backend.serve", "run the vhost-user-net back-end on a unix socket"),
    "bench": ("vhostlab.bench", "numba kernels against their Python twins (--peer dpdk: against DPDK)"),
    "lab": ("vhostlab.lab", "open JupyterLab on the labs"),
    "assign": ("vhostlab.exercises.assign", "make student notebooks from instructor sources"),
    "grade": ("vhostlab.exercises.grade", "grade a class's submitted notebooks"),
}


def _chosen(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """A parser whose chosen subcommand (if any) has its full set of options."""
    parser = argparse.ArgumentParser(prog="vhostlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv)
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
