"""Test frames that check themselves, and the ledger that counts them.

One format for both front-ends (the built-in one and the real QEMU's driver
in ``vhostlab.qemu``). A frame is an Ethernet frame with the local
experimental ethertype ETH_P_802_EX1 (0x88B5). Its payload starts with a tag
(magic ``VHLB``, direction, sequence number, total length), and the rest is a
pseudo-random pattern seeded by direction and sequence number. So whoever
holds a frame can tell which one it claims to be and whether every byte is
right, with nothing else to compare against, and a frame seen twice is a
frame seen twice. The pattern is random-looking, not zeros, so the pages that
hold frames carry real data through a migration.
"""
from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

import numpy as np

__all__ = ["RX", "TX", "GUEST_MAC", "PEER_MAC", "ETH_P_802_EX1", "MIN_FRAME", "MAX_FRAME",
           "make_frame", "frame_tag", "frame_id", "frame_name", "FrameLedger"]

RX, TX = "to_guest", "from_guest"      # toward the guest / from the guest
_DIRECTIONS = (RX, TX)                 # the tag's direction byte is the index here
GUEST_MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("525400abcdef")
ETH_P_802_EX1 = 0x88B5                 # Linux's if_ether.h: local experimental ethertype 1
_TAG = struct.Struct("!4sBIH")         # magic, direction, seq, length
_MAGIC = b"VHLB"
_HEAD = 14 + _TAG.size
MIN_FRAME, MAX_FRAME = 60, 1514


def make_frame(direction: str, seq: int, length: int) -> bytes:
    """The frame ``seq`` going ``direction`` (RX or TX), ``length`` bytes (60..1514)."""
    if not MIN_FRAME <= length <= MAX_FRAME:
        raise ValueError(f"frame length {length} outside {MIN_FRAME}..{MAX_FRAME}")
    d = _DIRECTIONS.index(direction)
    dst, src = (GUEST_MAC, PEER_MAC) if direction == RX else (PEER_MAC, GUEST_MAC)
    head = dst + src + struct.pack("!H", ETH_P_802_EX1) + _TAG.pack(_MAGIC, d, seq, length)
    rng = np.random.default_rng((d << 32) | seq)
    return head + rng.integers(0, 256, length - _HEAD, dtype=np.uint8).tobytes()


def frame_tag(frame: bytes) -> tuple[str, int] | None:
    """``(direction, seq)`` a frame claims to be, or None if it carries no tag."""
    if len(frame) < _HEAD or frame[12:14] != struct.pack("!H", ETH_P_802_EX1):
        return None
    magic, d, seq, _ = _TAG.unpack_from(frame, 14)
    if magic != _MAGIC or d >= len(_DIRECTIONS):
        return None
    return _DIRECTIONS[d], seq


def frame_id(frame: bytes) -> tuple[str, int] | None:
    """``(direction, seq)`` if ``frame`` is exactly the frame it claims to be, else None."""
    tag = frame_tag(frame)
    if tag is None or _TAG.unpack_from(frame, 14)[3] != len(frame):
        return None
    return tag if make_frame(*tag, len(frame)) == frame else None


def frame_name(frame: bytes, intact: bool = True) -> str | None:
    """"RX #12" for a test frame (only an intact one with ``intact``), else None."""
    found = frame_id(frame) if intact else frame_tag(frame)
    return None if found is None else f"{'RX' if found[0] == RX else 'TX'} #{found[1]}"


@dataclass
class FrameLedger:
    """What was sent one way, and what arrived: lost, corrupted, duplicated.

    ``send(seq, length)`` or ``make(length)`` (the next seq) records a frame
    and returns it; ``arrive(frame)`` checks a frame that showed up at the
    other end. Thread-safe.
    """

    direction: str
    sent: dict[int, int] = field(default_factory=dict)     # seq -> length
    seen: dict[int, int] = field(default_factory=dict)     # seq -> times seen intact
    corrupted: int = 0
    _next: int = field(default=0, repr=False)              # the seq make() gives next
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def send(self, seq: int, length: int) -> bytes:
        """Record and return the frame ``seq``."""
        frame = make_frame(self.direction, seq, length)
        with self._lock:
            self.sent[seq] = length
            self._next = max(self._next, seq + 1)
        return frame

    def make(self, length: int) -> bytes:
        """A new frame of ``length`` bytes (60..1514), the next seq, recorded as sent."""
        with self._lock:
            seq = self._next
            frame = make_frame(self.direction, seq, length)
            self.sent[seq] = length
            self._next += 1
        return frame

    def withdraw(self, frames) -> None:
        """Forget frames recorded as sent that never entered the path under test
        (the caller says why); they count neither as sent nor as lost."""
        with self._lock:
            for frame in frames:
                fid = frame_id(frame)
                if fid is not None and fid[0] == self.direction:
                    self.sent.pop(fid[1], None)

    def arrive(self, frame: bytes) -> bool:
        """Check one received frame; True if it is intact and was sent this way."""
        fid = frame_id(frame)
        with self._lock:
            if fid is None or fid[0] != self.direction or self.sent.get(fid[1]) != len(frame):
                self.corrupted += 1
                return False
            self.seen[fid[1]] = self.seen.get(fid[1], 0) + 1
            return True

    def summary(self) -> dict:
        """sent, delivered (distinct, intact), lost, corrupted, duplicated."""
        with self._lock:
            delivered = sum(1 for s in self.sent if self.seen.get(s))
            return {"sent": len(self.sent), "delivered": delivered,
                    "lost": len(self.sent) - delivered, "corrupted": self.corrupted,
                    "duplicated": sum(n - 1 for n in self.seen.values() if n > 1)}
