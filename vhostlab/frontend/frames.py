"""Test frames that check themselves: every byte follows from (direction, seq).

A frame is an Ethernet frame with the local-experimental ethertype 0x88B5.
Its payload starts with a tag (magic ``VHLB``, direction, sequence number,
total length), and the rest is a pseudo-random pattern seeded by direction
and sequence number. So whoever holds a frame can tell which one it claims to
be and whether every byte is right, with nothing else to compare against,
and a frame seen twice is a frame seen twice.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

__all__ = ["RX", "TX", "GUEST_MAC", "PEER_MAC", "make_frame", "frame_id", "FrameLedger"]

RX, TX = 0, 1          # toward the guest / from the guest
GUEST_MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("525400abcdef")
ETHERTYPE = 0x88B5
_TAG = struct.Struct("!4sBIH")
_MAGIC = b"VHLB"
_HEAD = 14 + _TAG.size
MIN_LEN, MAX_LEN = 60, 1514


def make_frame(direction: int, seq: int, length: int) -> bytes:
    """The frame ``seq`` going ``direction`` (RX or TX), ``length`` bytes (60..1514)."""
    if not MIN_LEN <= length <= MAX_LEN:
        raise ValueError(f"frame length {length} outside [{MIN_LEN}, {MAX_LEN}]")
    dst, src = (GUEST_MAC, PEER_MAC) if direction == RX else (PEER_MAC, GUEST_MAC)
    head = dst + src + struct.pack("!H", ETHERTYPE) + _TAG.pack(_MAGIC, direction, seq, length)
    rng = np.random.default_rng((direction << 32) | seq)
    return head + rng.integers(0, 256, length - _HEAD, dtype=np.uint8).tobytes()


def frame_id(frame: bytes) -> tuple[int, int] | None:
    """``(direction, seq)`` if ``frame`` is exactly the frame it claims to be, else None."""
    if len(frame) < _HEAD or frame[12:14] != struct.pack("!H", ETHERTYPE):
        return None
    magic, direction, seq, length = _TAG.unpack_from(frame, 14)
    if magic != _MAGIC or direction not in (RX, TX) or length != len(frame):
        return None
    return (direction, seq) if make_frame(direction, seq, length) == frame else None


@dataclass
class FrameLedger:
    """What was sent one way, and what arrived: lost, corrupted, duplicated."""

    direction: int
    sent: dict[int, int]          # seq -> length
    seen: dict[int, int]          # seq -> times seen intact
    corrupted: int = 0

    @classmethod
    def new(cls, direction: int) -> "FrameLedger":
        return cls(direction, {}, {})

    def send(self, seq: int, length: int) -> bytes:
        """Record and return the frame ``seq``."""
        self.sent[seq] = length
        return make_frame(self.direction, seq, length)

    def arrive(self, frame: bytes) -> bool:
        """Check one received frame; True if it is intact and was sent this way."""
        fid = frame_id(frame)
        if fid is None or fid[0] != self.direction or fid[1] not in self.sent:
            self.corrupted += 1
            return False
        self.seen[fid[1]] = self.seen.get(fid[1], 0) + 1
        return True

    def summary(self) -> dict:
        """sent, delivered (distinct, intact), lost, corrupted, duplicated."""
        delivered = sum(1 for s in self.sent if self.seen.get(s))
        dup = sum(n - 1 for n in self.seen.values() if n > 1)
        return {"sent": len(self.sent), "delivered": delivered,
                "lost": len(self.sent) - delivered, "corrupted": self.corrupted,
                "duplicated": dup}
