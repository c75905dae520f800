"""The IPython kernel the grader starts: ipykernel, tied to its runner.

What differs from a plain ``python -m ipykernel_launcher``:

* the kernel asks Linux to kill it when the process that started it dies
  (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), so a runner cut off by the
  notebook time limit takes its kernel along;
* it applies the address-space limit named by ``VHOSTLAB_KERNEL_AS_BYTES``
  (the runner passed its own limit down already; this makes it explicit),
  and makes guest memory's address-space reservation fit under it;
* it writes no core files.
"""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask for SIGKILL when the parent goes; a no-op where prctl is missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def limit_address_space(limit: int) -> None:
    """Cap this process's virtual memory at `limit` bytes (0: leave as is).

    Soft and hard limit both, so code in the kernel cannot raise it again.
    """
    if limit > 0:
        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def fit_guest_memory_reservations(limit: int) -> None:
    """Make GuestMemory's default address-space reservation fit under `limit`.

    A GuestMemory reserves 64 GiB of (uncommitted) address space by default
    so that any memory table fits, but RLIMIT_AS counts reserved space too:
    under a grader's limit not one instance could be made, and a migration
    makes four. Under a limit the default becomes an eighth of it (the
    exercises' guest RAM is a few MiB); an explicit ``reserve=`` still wins.
    """
    if limit <= 0:
        return
    from vhostlab.memory import GuestMemory
    defaults = GuestMemory.__init__.__kwdefaults__
    if defaults and defaults.get("reserve", 0) > limit // 8:
        defaults["reserve"] = limit // 8


def main() -> None:
    die_with_parent()
    # a learner's segfault is a graded event, not a core file on the grader's disk
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    limit = int(os.environ.get("VHOSTLAB_KERNEL_AS_BYTES", "0") or 0)
    limit_address_space(limit)
    fit_guest_memory_reservations(limit)
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]  # as ipykernel_launcher: the notebook's folder is not a package root
    from ipykernel import kernelapp
    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
