"""What the views of a real-QEMU migration need, recorded beside it.

QEMU keeps its own dirty bitmap and tells nobody which pages are in it, but
every write the kit's guest makes goes through qtest (QEMU tracks those
itself, as it tracks vCPU writes), so :class:`GuestWrites` learns the same
pages by watching the qtest connection. The bands say where the guest
driver put its rings, buffers and working set (its allocator's table), and
:func:`mismatched_pages` compares the two RAMs through the back-ends'
mappings after the switch-over, before the destination guest runs.
"""
from __future__ import annotations

import threading

import numpy as np

from vhostlab.dirtylog import GuestBand
from vhostlab.frontend.frames import frame_name as _frame_name
from vhostlab.memory import TARGET_PAGE_SIZE

__all__ = ["GuestWrites", "qemu_bands", "mismatched_pages", "frame_name"]

_NAMES = {"queue 0 ring": "RX ring", "queue 1 ring": "TX ring",
          "queue 0 buffers": "RX buffers", "queue 1 buffers": "TX buffers",
          "dirtier working set": "guest working set"}


class GuestWrites:
    """The pages the guest wrote through qtest since the last :meth:`take`."""

    def __init__(self) -> None:
        self._pages: set[int] = set()
        self._lock = threading.Lock()

    def record(self, gpa: int, length: int) -> None:
        """The qtest connection's ``on_write`` hook: [gpa, gpa + length) was written."""
        if length <= 0:
            return
        with self._lock:
            self._pages.update(range(gpa // TARGET_PAGE_SIZE,
                                     (gpa + length - 1) // TARGET_PAGE_SIZE + 1))

    def take(self) -> np.ndarray:
        """The pages written since the last call (sorted), and forget them."""
        with self._lock:
            pages, self._pages = self._pages, set()
        return np.array(sorted(pages), dtype=np.int64)


def qemu_bands(guest) -> tuple[GuestBand, ...]:
    """The guest driver's allocations (rings, buffers, working set) as named bands."""
    return tuple(GuestBand(_NAMES.get(what, what), gpa // TARGET_PAGE_SIZE,
                           -(-size // TARGET_PAGE_SIZE))
                 for what, gpa, size in guest.allocator.allocations)


def mismatched_pages(src_server, dst_server, first_page: int, end_page: int) -> np.ndarray:
    """Pages in [first_page, end_page) whose bytes differ between the two back-ends'
    mappings of guest RAM (source and destination)."""
    gpa, n = first_page * TARGET_PAGE_SIZE, (end_page - first_page) * TARGET_PAGE_SIZE
    with src_server.lock:
        a = np.frombuffer(src_server.device.memory.read(gpa, n), np.uint8)
    with dst_server.lock:
        b = np.frombuffer(dst_server.device.memory.read(gpa, n), np.uint8)
    differ = (a.reshape(-1, TARGET_PAGE_SIZE) != b.reshape(-1, TARGET_PAGE_SIZE)).any(axis=1)
    return np.flatnonzero(differ) + first_page


def frame_name(frame: bytes) -> str | None:
    """"RX #12" for a frame the kit sent to the guest, "TX #3" for one it sent."""
    return _frame_name(frame, intact=False)
