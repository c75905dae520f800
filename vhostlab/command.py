"""A subcommand's module run on its own, as ``python -m vhostlab.backend.serve``.

Each subcommand of the `vhostlab` command (cli.py) lives in a module that
defines ``add_arguments(parser)`` and ``run(args) -> int``. ``standalone``
makes that module's ``main(argv)`` with the same options, so both ways of
starting it behave alike. It imports nothing from the kit, so any layer's
subcommand can use it.
"""
from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["standalone"]


def standalone(name: str, doc: str | None,
               add_arguments: Callable[[argparse.ArgumentParser], None],
               run: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """``main(argv=None) -> int`` for subcommand ``name``: parse ``argv`` (default
    sys.argv[1:]) with ``add_arguments``' options, then ``run`` them. The first
    line of ``doc`` (the module's docstring) is the description."""
    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(prog=f"vhostlab {name}",
                                         description=doc.splitlines()[0] if doc else None)
        add_arguments(parser)
        return run(parser.parse_args(argv))

    main.__doc__ = f"`vhostlab {name}` on its own: parse argv, run, return the exit status."
    return main
