"""The peak memory of a process tree, measured from /proc while it runs.

The grader reports what each notebook cost: the runner, its kernel and
whatever the kernel started (QEMU in the migration exercises). No single
counter gives a tree's peak: a process's ``VmHWM`` is its own high-water
mark, ``ru_maxrss`` of a wait is one child's. So a sampler thread sums the
resident set of the tree a few times a second, and the figure reported is
the larger of that peak sum and the largest single high-water mark seen
(which catches a spike between two samples). Where /proc is missing (not
Linux) it reports 0.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
INTERVAL = 0.2  # seconds between samples: a kernel start-up alone takes longer


def parent_of(pid: int) -> int | None:
    """`pid`'s parent, or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _parents() -> dict[int, int]:
    """pid -> parent pid, for every process visible now."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            ppid = parent_of(int(entry.name))
            if ppid is not None:  # None: gone between listing and reading
                found[int(entry.name)] = ppid
    return found


def tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _status_kib(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    """Some ``/proc/PID/status`` fields in KiB (absent fields are left out)."""
    got = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return got
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            got[name] = int(value.split()[0])
    return got


class PeakRss:
    """Samples the resident memory of `pid`'s process tree until stopped.

        with PeakRss(proc.pid) as peak:
            proc.wait()
        peak.mib   # the tree's peak resident memory in MiB
    """

    def __init__(self, pid: int, interval: float = INTERVAL):
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"rss-{pid}", daemon=True)

    @property
    def mib(self) -> float:
        return self.peak_kib / 1024

    def sample(self) -> None:
        total, hwm = 0, 0
        for pid in tree(self.pid):
            kib = _status_kib(pid, ("VmRSS", "VmHWM"))
            total += kib.get("VmRSS", 0)
            hwm = max(hwm, kib.get("VmHWM", 0))
        self.peak_kib = max(self.peak_kib, total, hwm)

    def _loop(self) -> None:
        while True:
            try:
                self.sample()
            except OSError:
                return  # no /proc: nothing to measure
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakRss":
        if os.path.isdir("/proc"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
