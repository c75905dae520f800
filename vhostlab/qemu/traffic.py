"""Traffic for the real-QEMU migration: checked frames, a wire that keeps them,
and a guest that dirties memory with real data.

Frames are the kit's self-checking test frames (``vhostlab.frontend.frames``,
the same format and :class:`FrameLedger` the built-in migration uses); the
wire is the back-end's :class:`~vhostlab.backend.CaptureWire`. RARP frames
(ETH_P_RARP) are the back-end's SEND_RARP announcement after a migration, not
guest traffic; :func:`is_rarp` tells them apart.

Dirtying. :class:`GuestDirtier` is the guest's "page cache": a working set
of guest RAM that it rewrites with random, non-zero data through qtest (so
QEMU's own dirty tracking sees it), at a chosen rate. A guest that writes
nothing, or only zeros, migrates in a fraction of a second: zero pages cost
QEMU almost nothing to send. Real data, rewritten faster than the
migration's bandwidth cap can send it, keeps QEMU copying round after round.
"""
from __future__ import annotations

import os
import time

from vhostlab.backend import CaptureWire, is_rarp
from vhostlab.frontend.frames import GUEST_MAC, PEER_MAC, RX, TX, FrameLedger, frame_tag

from .guest import QTestVirtioNetGuest

__all__ = ["TO_GUEST", "FROM_GUEST", "GUEST_MAC", "PEER_MAC",
           "FrameLedger", "CaptureWire", "GuestDirtier", "frame_tag", "is_rarp"]

TO_GUEST, FROM_GUEST = RX, TX       # the names this package's callers know them by


class GuestDirtier:
    """Rewrites a working set of guest RAM with random data through qtest, at ``rate`` bytes/s.

    The working set is ``size`` bytes taken from the guest driver's
    allocator (so it is part of the state the driver exports on migration).
    ``catch_up()`` writes what the rate owes since the last call, in
    ``chunk``-byte qtest writes, cycling through the working set; it writes
    at most one working set per call, so a late call never floods QEMU.
    """

    def __init__(self, guest: QTestVirtioNetGuest, size: int = 1 << 20, rate: int = 3 << 20,
                 chunk: int = 64 << 10):
        if size <= 0 or size % chunk or chunk % 4096:
            raise ValueError(f"size={size}, chunk={chunk}: want whole 4 KiB pages, "
                             "size a multiple of chunk")
        self.guest, self.size, self.rate, self.chunk = guest, size, rate, chunk
        self.base = guest.allocator.alloc(size, "dirtier working set")
        self.offset = 0
        self.written = 0
        self._clock: float | None = None
        self._owed = 0.0

    @property
    def pages(self) -> range:
        """Page numbers of the working set."""
        return range(self.base // 4096, (self.base + self.size) // 4096)

    def fill(self) -> None:
        """Write the whole working set once (its pages hold data from then on)."""
        for _ in range(self.size // self.chunk):
            self._write_chunk()

    def _write_chunk(self) -> None:
        self.guest.qtest.write(self.base + self.offset, os.urandom(self.chunk))
        self.offset = (self.offset + self.chunk) % self.size
        self.written += self.chunk

    def catch_up(self) -> int:
        """Write what ``rate`` owes since the previous call; returns bytes written."""
        now = time.monotonic()
        if self._clock is None:
            self._clock = now
        self._owed = min(self._owed + (now - self._clock) * self.rate, float(self.size))
        self._clock = now
        n = 0
        while self._owed >= self.chunk:
            self._write_chunk()
            self._owed -= self.chunk
            n += self.chunk
        return n

    def pause(self) -> None:
        """Forget the time since the last call (nothing is owed for a pause)."""
        self._clock, self._owed = None, 0.0
