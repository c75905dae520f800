"""A back-end we cannot look inside, pictured from what its front-end told it.

vhostlab's own back-end hands the labs a :class:`~.snapshot.DeviceSnapshot`
of its state. DPDK's keeps its state in testpmd's memory. But everything a
vhost-user back-end knows, it was told on the socket: the features acked,
the memory table (with the fds of guest RAM), the log (with its fd), each
ring's size, addresses and base, its kick and call fds. The relay
(:mod:`.relay`) sees all of it, and :class:`ObservedDevice`, its observer,
keeps it: it maps the same guest RAM and the same log from the same fds, and
reads the rings' indices where the back-end writes them, in guest memory.

So the picture is the same kind of snapshot, with these differences, which
the snapshot's ``mode`` names and the labs say:

- ``last_avail_idx`` is the back-end's private counter until GET_VRING_BASE
  reveals it. Between bursts DPDK has returned every chain it took (it writes
  the used ring in the same burst), so it equals ``used->idx``, which is what
  the picture shows; after GET_VRING_BASE, the answer itself.
- ``pages_logged`` counts the pages seen marked in the log, read at each
  snapshot (DPDK keeps no such count, and a front-end's sync clears marks).
- ``errors`` are the back-end's refusals as seen on the socket (it closed the
  connection), and the relay's parse errors.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from vhostlab.dirtylog import DirtyLog
from vhostlab.memory import GuestMemory, GuestMemoryError, GuestMemoryRegion
from vhostlab.protocol import (TO_BACKEND, VHOST_VRING_F_LOG, Feature, Message, ProtocolFeature,
                               Request, feature_names)

from .snapshot import DeviceSnapshot, LogSnapshot, RegionSnapshot, VringSnapshot
from .trace import freeze

__all__ = ["ObservedDevice", "ObservedVring"]

QUEUES_SHOWN = 2        # RX and TX of one queue pair, listed even before they are configured


@dataclass
class ObservedVring:
    """One ring as the front-end configured it."""

    index: int
    num: int = 0
    addr: tuple | None = None          # (desc, avail, used) user addresses, flags, log addr
    base: int = 0                      # the last SET_VRING_BASE
    answered: int | None = None        # the last GET_VRING_BASE answer
    kick: bool = False
    call: bool = False
    enabled: bool = False
    started: bool = False


@dataclass
class ObservedDevice:
    """What a front-end told a back-end (fed by a relay's ``observer`` hook).

    ``name``: the back-end, for the snapshot's ``mode``; ``wire``: what its
    wire is called. ``snapshot()`` gives a DeviceSnapshot the views draw.
    ``lock`` guards the mappings: hold it to read ``memory`` or ``log`` from
    another thread (the relay's replaces them).
    """

    name: str = "dpdk"
    wire: str = ""
    socket_path: str = ""
    features: int = 0
    offered_features: int = 0
    protocol_features: int = 0
    status: int = 0
    memory: GuestMemory | None = None
    log: DirtyLog | None = None
    vrings: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    seen_logged: set = field(default_factory=set)
    connected: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    # -- the relay's hook ---------------------------------------------------------
    def __call__(self, direction: str, msg: Message, fds: list[int]) -> None:
        """Keep what ``msg`` tells the back-end. Never raises: whatever the front-end
        sends (a log fd that cannot be mapped, say), the relay goes on, and the
        failure is kept in ``errors``."""
        with self.lock:
            try:
                self._observe(direction, msg, fds)
            except Exception as exc:
                self.errors.append(f"relay observer: {msg.request.name}: {exc}")

    def _vring(self, index: int) -> ObservedVring:
        return self.vrings.setdefault(index, ObservedVring(index))

    def _observe(self, direction: str, msg: Message, fds: list[int]) -> None:
        req, payload = msg.request, msg.payload
        if direction != TO_BACKEND:
            if req == Request.GET_FEATURES:
                self.offered_features = payload.value
            elif req == Request.GET_VRING_BASE:
                ring = self._vring(payload.index)
                ring.answered, ring.started = payload.num, False
            return
        if req == Request.SET_FEATURES:
            self.features = payload.value
            if not self.features & Feature.VHOST_USER_F_PROTOCOL_FEATURES:
                for ring in self.vrings.values():
                    ring.enabled = True
        elif req == Request.SET_PROTOCOL_FEATURES:
            self.protocol_features = payload.value
        elif req == Request.SET_STATUS:
            self.status = payload.value
        elif req == Request.SET_MEM_TABLE:
            self._map_memory(msg, fds)
        elif req == Request.SET_LOG_BASE and fds:
            self._replace(log=DirtyLog.from_fd(fds[0], payload.mmap_size, payload.mmap_offset))
            self.seen_logged = set()
        elif req == Request.SET_VRING_NUM:
            self._vring(payload.index).num = payload.num
        elif req == Request.SET_VRING_BASE:
            self._vring(payload.index).base = payload.num
        elif req == Request.SET_VRING_ADDR:
            p = payload
            self._vring(p.index).addr = (p.desc_user_addr, p.avail_user_addr,
                                         p.used_user_addr, p.flags, p.log_guest_addr)
        elif req == Request.SET_VRING_KICK:
            ring = self._vring(payload.vring_index)
            ring.kick = ring.started = bool(fds)
        elif req == Request.SET_VRING_CALL:
            self._vring(payload.vring_index).call = bool(fds)
        elif req == Request.SET_VRING_ENABLE:
            self._vring(payload.index).enabled = bool(payload.num)

    def _map_memory(self, msg: Message, fds: list[int]) -> None:
        regions = [(GuestMemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                      r.mmap_offset), fd)
                   for r, fd in zip(msg.payload.regions, fds)]
        try:
            memory = GuestMemory.from_table(regions)
        except GuestMemoryError as exc:
            self.errors.append(f"relay observer: SET_MEM_TABLE: could not map it: {exc}")
            memory = None
        self._replace(memory=memory)

    def _replace(self, **new) -> None:
        for name, value in new.items():
            old = getattr(self, name)
            setattr(self, name, value)
            if old is not None:
                old.close()

    # -- reading ------------------------------------------------------------------
    def ring_at(self, index: int) -> tuple[int, dict, int] | None:
        """(num, GPAs of desc/avail/used, last SET_VRING_BASE) of ring ``index``, or
        None while it is not mapped."""
        ring = self.vrings.get(index)
        if ring is None or ring.addr is None or not ring.num or self.memory is None:
            return None
        gpas = dict(zip(("desc", "avail", "used"), map(self._gpa, ring.addr[:3])))
        if None in gpas.values():
            return None
        return ring.num, gpas, ring.base

    def _gpa(self, uva: int) -> int | None:
        try:
            return self.memory.uva_to_gpa(uva)
        except (GuestMemoryError, AttributeError):
            return None

    def _u16(self, gpa: int | None) -> int | None:
        if gpa is None or self.memory is None:
            return None
        try:
            return int.from_bytes(self.memory.read(gpa, 2), "little")
        except GuestMemoryError:
            return None

    def _vring_snapshot(self, ring: ObservedVring) -> VringSnapshot:
        desc = avail = used = log_addr = None
        flags = 0
        if ring.addr is not None:
            d, a, u, flags, log_addr = ring.addr
            desc, avail, used = self._gpa(d), self._gpa(a), self._gpa(u)
        packed = bool(self.features & Feature.VIRTIO_F_RING_PACKED)
        # A packed ring keeps no index in memory: DPDK's positions stay its own.
        used_idx = None if packed else self._u16(None if used is None else used + 2)
        if ring.answered is not None and not ring.started:
            last_avail = ring.answered
        else:
            last_avail = used_idx if used_idx is not None else ring.base
        state = ("started and enabled" if ring.started and ring.enabled else
                 "started but disabled" if ring.started else
                 "stopped (enabled once started)" if ring.enabled else "stopped")
        return VringSnapshot(
            index=ring.index, queue_pair=ring.index // 2,
            kind="rx" if ring.index % 2 == 0 else "tx", num=ring.num, desc=desc, avail=avail,
            used=used, log_guest_addr=log_addr, log_used=bool(flags & VHOST_VRING_F_LOG),
            last_avail_idx=last_avail, used_idx=used_idx,
            avail_idx=None if packed else self._u16(None if avail is None else avail + 2),
            state=state, enabled=ring.enabled, started=ring.started, kick=ring.kick,
            call=ring.call, err=False, error=None, frames=0, bytes=0, descriptors=None,
            ring_format="packed" if packed else "split")

    def _log_snapshot(self) -> LogSnapshot | None:
        if self.log is None or self.log.closed:
            return None
        bitmap = self.log.snapshot()
        pages = np.flatnonzero(np.unpackbits(bitmap, bitorder="little"))
        self.seen_logged.update(pages.tolist())
        return LogSnapshot(mmap_size=self.log.size, pages=self.log.pages,
                           dirty_pages=int(pages.size), bitmap=bitmap.tobytes())

    def snapshot(self, trace: tuple = (), counters: dict | None = None) -> DeviceSnapshot:
        """The device as the front-end configured it, with the rings' indices and the
        log read from guest memory now. ``counters`` are added to the observed ones."""
        with self.lock:
            memory = () if self.memory is None or self.memory.closed else tuple(
                RegionSnapshot(*map(int, r)) for r in self.memory.regions)
            # Every ring of the device, configured or not, as vhostlab's back-end lists them.
            count = max([QUEUES_SHOWN - 1, *self.vrings]) + 1
            vrings = tuple(self._vring_snapshot(self.vrings.get(i) or ObservedVring(i))
                           for i in range(count))
            log = self._log_snapshot()
            logging = bool(self.features & Feature.VHOST_F_LOG_ALL) and log is not None
            out = {"pages_logged": len(self.seen_logged), "errors": tuple(self.errors)}
            out.update(counters or {})
            return DeviceSnapshot(
                time=time.time(), socket_path=self.socket_path, mode=self.name, wire=self.wire,
                connected=self.connected, peer_pid=None, features=self.features,
                feature_names=tuple(feature_names(self.features, Feature)),
                offered_features=self.offered_features,
                protocol_features=self.protocol_features,
                protocol_feature_names=tuple(feature_names(self.protocol_features,
                                                           ProtocolFeature)),
                hdr_len=12 if self.features & (Feature.VIRTIO_F_VERSION_1
                                               | Feature.VIRTIO_NET_F_MRG_RXBUF) else 10,
                logging=logging, break_logging=False, status=self.status, mac="", mtu=0,
                memory=memory, vrings=vrings, log=log, counters=freeze(out), trace=trace)

    def close(self) -> None:
        """Unmap guest RAM and the log."""
        with self.lock:
            self._replace(memory=None, log=None)
