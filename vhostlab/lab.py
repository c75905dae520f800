"""`vhostlab lab`: open JupyterLab on the labs (what `make lab` runs)."""
from __future__ import annotations

import os
import sys


def add_arguments(parser) -> None:
    parser.add_argument("dir", nargs="?", default="labs", help="folder to open (default: labs)")


def run(args) -> int:
    """Replace this process with JupyterLab, so Ctrl-C stops it and nothing is left behind."""
    if not os.path.isdir(args.dir):
        print(f"vhostlab lab: no folder {args.dir!r}; run it from the repository's top level", file=sys.stderr)
        return 2
    os.execvp(sys.executable, [sys.executable, "-m", "jupyterlab", args.dir])
    return 0  # not reached
