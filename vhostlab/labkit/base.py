"""What every part of the lab kit shares: its error, the guest RAM size, and waiting."""
from __future__ import annotations

import os
import time
from typing import Any, Callable

from vhostlab.errors import VhostlabError

__all__ = ["RAM_SIZE", "LabSetupError", "child_processes", "wait_until"]

#: Guest RAM of every lab guest (QEMU's -m): small enough for Binder's 2 GB.
RAM_SIZE = 128 << 20


class LabSetupError(VhostlabError, RuntimeError):
    """The lab cannot be set up as asked (a bad VHOSTLAB_FRONTEND, QEMU missing, lab closed)."""


def child_processes(pid: int | None = None) -> list[int]:
    """Pids of the live (not zombie) children of ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    children = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace").rsplit(")", 1)[-1].split()
        except (OSError, ValueError):
            continue  # not a process, or it exited while we looked
        if len(stat) > 1 and stat[1] == str(pid) and stat[0] != "Z":
            children.append(int(entry))
    return sorted(children)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0,
               interval: float = 0.01) -> bool:
    """Sleep in short steps until ``predicate()`` is true; False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(interval, left))
    return True
