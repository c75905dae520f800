"""Wires: where the device sends the frames the guest transmits.

A real vhost-user-net back-end is a switch port; here the "wire" is one of:

* `SinkWire`     counts and drops every frame (benchmarks);
* `LoopbackWire` sends every frame back into the guest's RX queue of the
                 same queue pair (the device delivers them);
* `PcapWire`     writes every frame to a classic pcap file (linktype 1,
                 Ethernet) that Wireshark opens; the virtio-net header has
                 already been stripped by the TX path;
* `CaptureWire`  keeps every frame, for a migration's integrity check.

Frames travel as the ring layer's `FrameArena`: one uint8 buffer plus
offsets and lengths, which is what the numba TX kernel fills; nothing here
touches a frame byte by byte unless it has to (pcap writes each frame once).
"""
from __future__ import annotations

import struct
import threading
import time
from typing import Callable

from vhostlab.ring import FrameArena

PCAP_MAGIC = 0xA1B2C3D4          # classic pcap, microsecond timestamps
PCAP_LINKTYPE_ETHERNET = 1
PCAP_SNAPLEN = 262144
ETH_P_RARP = 0x8035              # Linux's if_ether.h; QEMU's net/announce.c sends it too


class Wire:
    """Base class: `send(arena, queue_pair)` takes the frames a guest transmitted."""

    name = "wire"

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0

    def send(self, arena: FrameArena, queue_pair: int) -> None:
        self.frames += arena.count
        self.bytes += int(arena.lengths[:arena.count].sum())

    def close(self) -> None:
        """Release what the wire holds (files); the device calls it once, at stop."""


class SinkWire(Wire):
    """Counts and drops every frame."""

    name = "sink"


class LoopbackWire(Wire):
    """Sends every frame back toward the guest, into the RX queue of the same pair.

    `deliver(arena, queue_pair)` is bound by the device when it takes the
    wire; frames that find no posted RX buffer wait in the device's bounded
    backlog or are counted as dropped.
    """

    name = "loopback"

    def __init__(self) -> None:
        super().__init__()
        self.deliver: Callable[[FrameArena, int], None] | None = None

    def send(self, arena: FrameArena, queue_pair: int) -> None:
        super().send(arena, queue_pair)
        if self.deliver is not None and arena.count:
            self.deliver(arena, queue_pair)


class CaptureWire(Wire):
    """Keeps every frame the guest transmitted, for the integrity check.

    ``captured`` holds the frames kept since the last ``take()``, oldest first.
    """

    name = "capture"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.captured: list[bytes] = []

    def send(self, arena: FrameArena, queue_pair: int) -> None:
        super().send(arena, queue_pair)
        with self._lock:
            self.captured.extend(arena.frames())

    def take(self) -> list[bytes]:
        """The frames captured since the last ``take()``, oldest first."""
        with self._lock:
            frames, self.captured = self.captured, []
        return frames


class PcapWire(Wire):
    """Writes every frame to a classic pcap file (Ethernet, virtio-net header stripped)."""

    name = "pcap"

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self._file = open(path, "wb")
        # pcap global header: magic, version 2.4, thiszone, sigfigs, snaplen, linktype.
        self._file.write(struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, PCAP_SNAPLEN,
                                     PCAP_LINKTYPE_ETHERNET))
        self._file.flush()

    def send(self, arena: FrameArena, queue_pair: int) -> None:
        super().send(arena, queue_pair)
        now = time.time()
        sec, usec = int(now), int((now % 1) * 1_000_000)
        for k in range(arena.count):
            frame = arena.frame(k).tobytes()
            kept = frame[:PCAP_SNAPLEN]
            self._file.write(struct.pack("<IIII", sec, usec, len(kept), len(frame)))
            self._file.write(kept)
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_pcap(path: str) -> list[bytes]:
    """The frames in a classic pcap file written by PcapWire (for tests and labs)."""
    with open(path, "rb") as f:
        blob = f.read()
    magic, major, minor, _, _, _, linktype = struct.unpack_from("<IHHiIII", blob, 0)
    if magic != PCAP_MAGIC or (major, minor) != (2, 4) or linktype != PCAP_LINKTYPE_ETHERNET:
        raise ValueError(f"{path}: not a classic Ethernet pcap (magic {magic:#x}, linktype {linktype})")
    frames, pos = [], 24
    while pos + 16 <= len(blob):
        _, _, incl, _ = struct.unpack_from("<IIII", blob, pos)
        frames.append(blob[pos + 16: pos + 16 + incl])
        pos += 16 + incl
    return frames


def make_wire(spec: str | Wire) -> Wire:
    """A wire from its command-line name: `sink`, `loopback` or `pcap:FILE`."""
    if isinstance(spec, Wire):
        return spec
    if spec == "sink":
        return SinkWire()
    if spec == "loopback":
        return LoopbackWire()
    if spec.startswith("pcap:") and len(spec) > 5:
        return PcapWire(spec[5:])
    raise ValueError(f"unknown wire {spec!r}: expected sink, loopback or pcap:FILE")


def rarp_frame(mac: bytes) -> bytes:
    """The fake RARP a migrated guest's port broadcasts so switches learn where its MAC went.

    Ethernet broadcast, ethertype ETH_P_RARP; RARP "reverse request" (op 3) with
    sender and target hardware address = `mac`, protocol addresses 0;
    padded to the 60-byte Ethernet minimum (as DPDK's make_rarp_packet does).
    """
    if len(mac) != 6:
        raise ValueError(f"a MAC address has 6 bytes, got {len(mac)}")
    eth = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_RARP)
    rarp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + mac + b"\0" * 4 + mac + b"\0" * 4
    return (eth + rarp).ljust(60, b"\0")


def is_rarp(frame: bytes) -> bool:
    """True for a RARP announcement (what a back-end sends on SEND_RARP), not guest traffic."""
    return len(frame) >= 14 and int.from_bytes(frame[12:14], "big") == ETH_P_RARP
