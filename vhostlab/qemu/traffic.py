"""Traffic for the real-QEMU migration: frames that can be checked, a wire that keeps them,
and a guest that dirties memory with real data.

Frames. Every frame is an Ethernet frame (ethertype 0x88B5, "local
experimental") whose payload starts with a tag: magic ``VHLQ``, direction,
sequence number, length. The rest is random. A :class:`FrameLedger` keeps
each frame it made, byte for byte, so an arrival is either that frame
exactly (delivered; a second arrival is a duplicate) or something else
(corrupted). What never arrives is lost.

The wire. :class:`CaptureWire` is a back-end wire (``vhostlab.backend.Wire``)
that keeps every frame the guest transmitted, so the ledger can check them.
RARP frames (ethertype 0x8035) are the back-end's SEND_RARP announcement
after a migration, not guest traffic; they are counted apart.

Dirtying. :class:`GuestDirtier` is the guest's "page cache": a working set
of guest RAM that it rewrites with random, non-zero data through qtest (so
QEMU's own dirty tracking sees it), at a chosen rate. A guest that writes
nothing, or only zeros, migrates in a fraction of a second: zero pages cost
QEMU almost nothing to send. Real data, rewritten faster than the
migration's bandwidth cap can send it, keeps QEMU copying round after round.
"""
from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass, field

from vhostlab.backend import Wire

from .guest import QTestVirtioNetGuest

__all__ = ["TO_GUEST", "FROM_GUEST", "GUEST_MAC", "PEER_MAC", "RARP_ETHERTYPE",
           "FrameLedger", "CaptureWire", "GuestDirtier", "frame_tag", "is_rarp"]

TO_GUEST, FROM_GUEST = "to_guest", "from_guest"
GUEST_MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("525400abcdef")
ETHERTYPE = 0x88B5
RARP_ETHERTYPE = 0x8035
_TAG = struct.Struct("!4sBIH")          # magic, direction, seq, length
_MAGIC = b"VHLQ"
_HEAD = 14 + _TAG.size
MIN_FRAME, MAX_FRAME = 60, 1514
_DIRECTIONS = (TO_GUEST, FROM_GUEST)


def frame_tag(frame: bytes) -> tuple[str, int] | None:
    """``(direction, seq)`` a frame claims to be, or None if it carries no tag."""
    if len(frame) < _HEAD or frame[12:14] != struct.pack("!H", ETHERTYPE):
        return None
    magic, direction, seq, _ = _TAG.unpack_from(frame, 14)
    if magic != _MAGIC or direction >= len(_DIRECTIONS):
        return None
    return _DIRECTIONS[direction], seq


def is_rarp(frame: bytes) -> bool:
    """True for the RARP announcement a back-end sends on SEND_RARP."""
    return len(frame) >= 14 and frame[12:14] == struct.pack("!H", RARP_ETHERTYPE)


@dataclass
class FrameLedger:
    """The frames sent one way, byte for byte, and what became of them.

    ``make(length)`` creates and records a frame; ``arrive(frame)`` checks a
    frame that showed up at the other end. Thread-safe.
    """

    direction: str
    sent: dict[int, bytes] = field(default_factory=dict)
    seen: dict[int, int] = field(default_factory=dict)
    corrupted: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def make(self, length: int) -> bytes:
        """A new frame of ``length`` bytes (60..1514), recorded as sent."""
        if not MIN_FRAME <= length <= MAX_FRAME:
            raise ValueError(f"frame length {length} outside {MIN_FRAME}..{MAX_FRAME}")
        dst, src = (GUEST_MAC, PEER_MAC) if self.direction == TO_GUEST else (PEER_MAC, GUEST_MAC)
        with self._lock:
            seq = len(self.sent)
            head = dst + src + struct.pack("!H", ETHERTYPE) + _TAG.pack(
                _MAGIC, _DIRECTIONS.index(self.direction), seq, length)
            frame = head + os.urandom(length - _HEAD)
            self.sent[seq] = frame
        return frame

    def forget(self, frame: bytes) -> None:
        """Take back a frame that was made but never handed to anyone."""
        tag = frame_tag(frame)
        with self._lock:
            if tag and tag[0] == self.direction and self.sent.get(tag[1]) == frame:
                del self.sent[tag[1]]

    def arrive(self, frame: bytes) -> bool:
        """Check one arrival; True when it is, byte for byte, a frame sent this way."""
        tag = frame_tag(frame)
        with self._lock:
            if tag is None or tag[0] != self.direction or self.sent.get(tag[1]) != frame:
                self.corrupted += 1
                return False
            self.seen[tag[1]] = self.seen.get(tag[1], 0) + 1
            return True

    def summary(self) -> dict:
        """sent, delivered (distinct and intact), lost, corrupted, duplicated."""
        with self._lock:
            delivered = sum(1 for s in self.sent if self.seen.get(s))
            return {"sent": len(self.sent), "delivered": delivered,
                    "lost": len(self.sent) - delivered, "corrupted": self.corrupted,
                    "duplicated": sum(n - 1 for n in self.seen.values() if n > 1)}


class CaptureWire(Wire):
    """A back-end wire that keeps every frame the guest transmitted."""

    name = "capture"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._frames: list[bytes] = []

    def send(self, arena, queue_pair: int) -> None:
        super().send(arena, queue_pair)
        with self._lock:
            self._frames.extend(arena.frames())

    def take(self) -> list[bytes]:
        """The frames captured since the last ``take()``, oldest first."""
        with self._lock:
            frames, self._frames = self._frames, []
        return frames


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
