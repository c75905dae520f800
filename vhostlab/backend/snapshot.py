"""A consistent, read-only picture of the device for the labs to draw while it runs.

`take_snapshot` runs under the server's lock and copies everything out:
no numpy view of guest memory or of the log escapes (a view would keep a
mapping alive and change under the reader's feet), only bytes, ints,
tuples and read-only mappings.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping

from vhostlab.backend.trace import TraceRecord, freeze
import numpy as np

from vhostlab.memory import GuestMemoryError
from vhostlab.protocol import Feature, ProtocolFeature, feature_names
from vhostlab.ring import VRING_DESC_DTYPE, vring_desc_size
from vhostlab.ring.packed_layout import VRING_PACKED_DESC_DTYPE

# How each ring format's descriptors are read for a snapshot.
_DESC_DTYPES = {"split": VRING_DESC_DTYPE, "packed": VRING_PACKED_DESC_DTYPE}


@dataclass(frozen=True)
class RegionSnapshot:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True)
class VringSnapshot:
    """One virtqueue: configuration, position, state, and optionally its descriptors."""

    index: int
    queue_pair: int
    kind: str                      # "rx" or "tx"
    num: int
    desc: int | None               # GPAs once mapped
    avail: int | None
    used: int | None
    log_guest_addr: int | None
    log_used: bool                 # VHOST_VRING_F_LOG
    last_avail_idx: int
    used_idx: int | None
    avail_idx: int | None          # the guest's avail->idx, read now
    state: str                     # vhostlab.ring.RingState's value: "started and enabled", ...
    enabled: bool
    started: bool
    kick: bool
    call: bool
    err: bool
    error: str | None
    frames: int
    bytes: int
    descriptors: tuple | None      # ((addr, len, flags, next), ...) when asked for;
                                   # packed: ((addr, len, id, flags), ...)
    # "split" or "packed" (vhostlab.ring.RING_FORMATS); a packed ring's avail and
    # used are its driver and device event areas, and it has no avail_idx.
    ring_format: str = "split"
    avail_wrap_counter: int | None = None    # packed rings: the device's wrap counters
    used_wrap_counter: int | None = None


@dataclass(frozen=True)
class LogSnapshot:
    """The dirty log as the back-end sees it: size, how many pages are dirty, a copy."""

    mmap_size: int
    pages: int
    dirty_pages: int
    bitmap: bytes


@dataclass(frozen=True)
class DeviceSnapshot:
    time: float
    socket_path: str
    mode: str
    wire: str
    connected: bool
    peer_pid: int | None
    features: int
    feature_names: tuple
    offered_features: int
    protocol_features: int
    protocol_feature_names: tuple
    hdr_len: int
    logging: bool
    break_logging: bool
    status: int
    mac: str
    mtu: int
    memory: tuple
    vrings: tuple
    log: LogSnapshot | None
    counters: Mapping
    trace: tuple[TraceRecord, ...]


def _mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _regions(dev) -> tuple:
    if dev.memory is None or dev.memory.closed:
        return ()
    return tuple(RegionSnapshot(*map(int, r)) for r in dev.memory.regions)


def _counters(dev) -> Mapping:
    c = dev.counters
    out = c.summary()
    out.update(calls=c.calls, kicks=c.kicks, rarp_sent=c.rarp_sent, connections=c.connections)
    return freeze(out)


def _read_u16(dev, gpa: int) -> int | None:
    try:
        return int.from_bytes(dev.memory.read(gpa, 2), "little")
    except (GuestMemoryError, AttributeError):
        return None


def vring_snapshot(dev, vring, descriptors: bool) -> VringSnapshot:
    vq = vring.ring
    mapped = vq is not None and dev.memory is not None and not dev.memory.closed
    fmt = vq.ring_format if vq is not None else dev.ring_format
    packed = fmt == "packed"
    descs = None
    if descriptors and mapped:
        try:
            raw = np.frombuffer(dev.memory.read(vq.desc, vring_desc_size(vq.num)),
                                _DESC_DTYPES[fmt])
            descs = tuple(tuple(int(x) for x in d) for d in raw)
        except GuestMemoryError:
            descs = None
    error = vring.error or (str(vq.error) if vq is not None and vq.broken else None)
    return VringSnapshot(
        index=vring.index, queue_pair=vring.queue_pair, kind="rx" if vring.is_rx else "tx",
        num=vring.num, desc=vq.desc if vq else None, avail=vq.avail if vq else None,
        used=vq.used if vq else None, log_guest_addr=vq.log_guest_addr if vq else None,
        log_used=bool(vq.flags & 1) if vq else False, last_avail_idx=vring.last_avail_idx,
        used_idx=vq.used_idx if vq else None,
        avail_idx=_read_u16(dev, vq.avail + 2) if mapped and not packed else None,
        state=vring.state.value, enabled=vring.enabled, started=vring.started, kick=vring.kick_fd >= 0,
        call=vring.call_fd >= 0, err=vring.err_fd >= 0, error=error,
        frames=vq.frames if vq else 0, bytes=vq.bytes if vq else 0, descriptors=descs,
        ring_format=fmt,
        avail_wrap_counter=int(vq.avail_wrap_counter) if vq is not None and packed else None,
        used_wrap_counter=int(vq.used_wrap_counter) if vq is not None and packed else None)


def log_snapshot(dev) -> LogSnapshot | None:
    log = dev.log
    if log is None or log.closed:
        return None
    bitmap = log.snapshot()
    return LogSnapshot(mmap_size=log.size, pages=log.pages,
                       dirty_pages=int(np.bitwise_count(bitmap).sum()),
                       bitmap=bitmap.tobytes())


def take_snapshot(server, descriptors: bool = False, trace: bool = True) -> DeviceSnapshot:
    """Copy the device's state (call with the server's lock held)."""
    dev = server.device
    return DeviceSnapshot(
        time=time.time(), socket_path=server.socket_path, mode=server.mode,
        wire=server.wire.name, connected=server.connected,
        peer_pid=server.peer.pid if server.peer else None,
        features=dev.features, feature_names=tuple(feature_names(dev.features, Feature)),
        offered_features=dev.offered_features, protocol_features=dev.protocol_features,
        protocol_feature_names=tuple(feature_names(dev.protocol_features, ProtocolFeature)),
        hdr_len=dev.hdr_len, logging=dev.logging, break_logging=dev.break_logging,
        status=dev.status, mac=_mac(dev.net.mac), mtu=dev.net.mtu, memory=_regions(dev),
        vrings=tuple(vring_snapshot(dev, v, descriptors) for v in dev.vrings),
        log=log_snapshot(dev), counters=_counters(dev),
        trace=server.trace.records() if trace else ())

