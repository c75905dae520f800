"""The vhost-user-net device's state: libvhost-user's VuDev and VuVirtq, in Python.

Theory of operation
-------------------
One `VhostUserNetDevice` lives as long as the server; a front-end
connection configures it and, when the connection ends, `release()` gives
everything back (mappings, fds, rings) so the next front-end finds a clean
device. Counters and the message trace span connections. The virtio-net
half (config space, MTU, RARP, the TX/RX service, the wire) is
`net_device.NetDevice`, reached as ``dev.net``.

A virtio-net device with N queue pairs has 2N virtqueues: RX of pair p is
vring 2p, TX is vring 2p+1 (virtio spec 5.1.2). Each `Vring` holds what the
front-end told us about it (size, addresses, base, kick/call/err fds) and,
once it can be mapped, the ring layer's `Virtqueue` over guest memory.

Ring states (vhost-user.rst "Ring states"), one `RingState` value per `Vring`:

    stopped                  no kick fd yet, or stopped by GET_VRING_BASE:
                             the back-end must not touch the ring (whether it is
                             enabled is still tracked: STOPPED_ENABLED)
    started but disabled     kick fd given; TX frames are taken and dropped,
                             no RX frames are supplied
    started and enabled      the datapath runs
    broken                   the guest broke a rule in the ring: not touched
                             until SET_VRING_BASE or SET_VRING_NUM

"If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated, the ring starts
directly in the enabled state. If [it] has been negotiated, the ring is
initialized in a disabled state and is enabled by VHOST_USER_SET_VRING_ENABLE
with parameter 1."
"""
from __future__ import annotations

import fcntl
import logging
import os
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

from vhostlab.backend.net_device import (DEFAULT_MAC, DEFAULT_MTU, NetDevice, net_features,
                                         signal)
from vhostlab.backend.transport import close_fds
from vhostlab.protocol import Feature, ProtocolFeature, VringAddr
from vhostlab.ring import RingState
from vhostlab.ring.layout import VIRTQUEUE_MAX_SIZE

log = logging.getLogger("vhostlab.backend")
MAX_QUEUE_PAIRS = 128                           # 2 * 128 vrings fit the 8-bit vring index
ERRORS_KEPT = 200

# A plain-int mask for the datapath: IntFlag arithmetic costs microseconds a burst.
F_LOG_ALL = int(Feature.VHOST_F_LOG_ALL)

OFFERED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ | ProtocolFeature.LOG_SHMFD | ProtocolFeature.RARP
    | ProtocolFeature.REPLY_ACK | ProtocolFeature.NET_MTU | ProtocolFeature.CONFIG
    | ProtocolFeature.RESET_DEVICE | ProtocolFeature.CONFIGURE_MEM_SLOTS
    | ProtocolFeature.STATUS)


@dataclass
class Counters:
    """What the device did, summed over all connections."""

    guest_tx_frames: int = 0
    guest_tx_bytes: int = 0
    guest_rx_frames: int = 0
    guest_rx_bytes: int = 0
    dropped: int = 0
    pages_logged: int = 0
    calls: int = 0
    kicks: int = 0
    rarp_sent: int = 0
    connections: int = 0
    slowest_service_ms: float = 0.0     # the longest a ring service held the lock
    closed_with_error: int = 0          # connections closed by the device, reason in errors
    messages: Counter = field(default_factory=Counter)
    errors: deque = field(default_factory=lambda: deque(maxlen=ERRORS_KEPT))

    def summary(self) -> dict:
        """The JSON summary `vhostlab serve` prints at exit."""
        return {"guest_tx_frames": self.guest_tx_frames, "guest_tx_bytes": self.guest_tx_bytes,
                "guest_rx_frames": self.guest_rx_frames, "guest_rx_bytes": self.guest_rx_bytes,
                "dropped": self.dropped, "pages_logged": self.pages_logged,
                "slowest_service_ms": round(self.slowest_service_ms, 3),
                "messages": dict(sorted(self.messages.items())), "errors": list(self.errors)}


@dataclass
class Vring:
    """One virtqueue as the front-end configured it (libvhost-user's VuVirtq).

    ``state`` is the ring's one state value (`vhostlab.ring.RingState`);
    ``started`` and ``enabled`` are read from it. ``ring`` is the ring
    layer's `DeviceRing` once the ring can be mapped.
    """

    index: int
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0                   # SET_VRING_BASE, until the ring object holds it
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    state: RingState = RingState.STOPPED
    ring: object | None = None      # a vhostlab.ring DeviceRing once mapped
    error: str | None = None        # the last error on this ring, until SET_VRING_BASE

    started = property(lambda self: self.state.started)
    enabled = property(lambda self: self.state.enabled)

    def start(self) -> None:
        self.state = self.state.start()

    def stop(self) -> None:
        self.state = self.state.stop()

    def enable(self, on: bool) -> None:
        self.state = self.state.enable(on)

    def set_broken(self) -> None:
        self.state = RingState.BROKEN

    def configure_afresh(self) -> None:
        """SET_VRING_BASE or SET_VRING_NUM on a broken ring: it starts over, stopped."""
        if self.state is RingState.BROKEN:
            self.state = RingState.STOPPED

    @property
    def is_rx(self) -> bool:
        return self.index % 2 == 0

    @property
    def queue_pair(self) -> int:
        return self.index // 2

    @property
    def last_avail_idx(self) -> int:
        ring = self.ring
        return int(ring.last_avail_idx) if ring is not None else self.base

    @property
    def vring_base(self) -> int:
        """What GET_VRING_BASE answers: the ring's base in its format's encoding
        (a packed ring's carries the wrap counters), or what SET_VRING_BASE said."""
        ring = self.ring
        return int(ring.get_base()) if ring is not None else self.base

    def __repr__(self) -> str:
        kind = "rx" if self.is_rx else "tx"
        return (f"<Vring {self.index} ({kind}) num={self.num} last_avail_idx="
                f"{self.last_avail_idx} {self.state}>")


def set_nonblocking(fd: int) -> None:
    """O_NONBLOCK on an eventfd we read or write, so no peer can make us block.

    The flag lives on the open file description the front-end shares; QEMU
    and DPDK create their eventfds non-blocking already (EFD_NONBLOCK).
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


class VhostUserNetDevice:
    """A vhost-user-net device: negotiated state, memory, log, vrings, counters;
    the virtio-net half is ``net`` (`NetDevice`).

    `watch(fd, vring)` / `unwatch(fd)` are how the server learns which kick
    eventfds to wait on; the device calls `unwatch` before it closes a kick
    fd, so a recycled fd number can never be confused with the old one.
    """

    def __init__(self, queue_pairs: int = 1, *, mac: bytes = DEFAULT_MAC, mtu: int = DEFAULT_MTU,
                 break_logging: bool = False, ring_features: int = 0, ring_format: str = "split"):
        if not 1 <= queue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queue_pairs={queue_pairs}: must be 1..{MAX_QUEUE_PAIRS}")
        self.queue_pairs = queue_pairs
        self.break_logging = break_logging
        # vhostlab.ring.RING_FORMATS: "packed" once SET_FEATURES acks
        # VIRTIO_F_RING_PACKED (rings.apply_features), else this one.
        self.unpacked_ring_format = ring_format
        self.ring_format = ring_format
        self.offered_features = self._offer(ring_features, queue_pairs)
        self.offered_protocol_features = int(OFFERED_PROTOCOL_FEATURES)
        self.counters = Counters()
        self.watch: Callable[[int, Vring], None] = lambda fd, vring: None
        self.unwatch: Callable[[int], None] = lambda fd: None
        self.features = 0
        self.net = NetDevice(self, queue_pairs, mac, mtu)
        self._init_session()

    @staticmethod
    def _offer(ring_features: int, queue_pairs: int) -> int:
        """Feature bits this device offers in GET_FEATURES."""
        bits = (Feature.VHOST_F_LOG_ALL | Feature.VHOST_USER_F_PROTOCOL_FEATURES
                | Feature.VIRTIO_F_VERSION_1 | Feature.VIRTIO_F_ANY_LAYOUT)
        return int(bits) | net_features(queue_pairs) | ring_features

    def _init_session(self) -> None:
        """The state a fresh front-end connection finds."""
        self.owner = False
        self.features = 0
        self.ring_format = self.unpacked_ring_format
        self.protocol_features = 0
        self.memory = None
        self.memory_faults_seen = 0        # SIGBUS faults already reported (check_shrunk)
        self.log = None
        self.log_call_fd = -1
        self.status = 0
        self.vrings = [Vring(i) for i in range(2 * self.queue_pairs)]
        self.net.reset()

    def reset(self) -> None:
        """RESET_DEVICE: the device's own state back to its initial values (rings
        stopped and disabled, queued frames dropped, features, status, MAC, MTU,
        link); what the front-end's session set up stays (ownership, protocol
        features, memory table, log)."""
        for vring in self.vrings:
            self.stop_vring(vring)
            broken = vring.ring is not None and vring.ring.broken
            vring.state = RingState.BROKEN if broken else RingState.STOPPED
            vring.base = 0
        self.features = 0
        self.ring_format = self.unpacked_ring_format
        self.status = 0
        self.net.reset()

    # -- the virtio-net half, where older code looks for it ----------------------------
    mac = property(lambda self: self.net.mac)
    mtu = property(lambda self: self.net.mtu)
    wire = property(lambda self: self.net.wire)
    busy = property(lambda self: self.net.busy)
    overrides = property(lambda self: self.net.overrides,
                         lambda self, hooks: setattr(self.net, "overrides", hooks))

    # -- negotiated state -------------------------------------------------------
    def has_feature(self, bit: int) -> bool:
        return bool(self.features & int(bit))

    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self.protocol_features & int(bit))

    @property
    def hdr_len(self) -> int:
        return self.net.hdr_len

    @property
    def logging(self) -> bool:
        """Whether writes must be logged: VHOST_F_LOG_ALL negotiated and a log mapped."""
        return bool(self.features & F_LOG_ALL) and self.log is not None \
            and not self.break_logging

    @property
    def active_log(self):
        """The log the rings' bursts mark, or None while not logging."""
        return self.log if self.logging else None

    def error(self, text: str) -> None:
        """Remember and log an error (the labs and `serve`'s summary show them)."""
        self.counters.errors.append(text)
        log.warning("%s", text)

    def check_shrunk(self) -> None:
        """Report (once) a front-end that shrank the file behind guest memory or the log.

        The SIGBUS guard (vhostlab.sigbus) kept the process alive and put zero
        pages where the file's pages were; what the rings read there is
        meaningless, so every ring stops until the front-end configures it again,
        and a shrunk log is dropped until the next SET_LOG_BASE.
        """
        memory = self.memory
        if memory is not None and not memory.closed and \
                memory.sigbus_faults != self.memory_faults_seen:
            self.memory_faults_seen = memory.sigbus_faults
            text = (f"guest memory shrank under {memory.shrunk_region()}: the front-end "
                    "truncated the file behind it after SET_MEM_TABLE/ADD_MEM_REG "
                    "(mmap_offset + memory_size now lie past its end); every ring stopped")
            self.error(text)
            for vring in self.vrings:
                if vring.started:
                    vring.stop()
                    vring.error = text
                    if vring.err_fd >= 0:
                        signal(vring.err_fd)
        if self.log is not None and self.log.shrunk:
            self.error(f"SET_LOG_BASE: the dirty log shrank under the back-end (the front-end "
                       f"truncated its file below mmap_size {self.log.size:#x}); logging "
                       "stopped until the next SET_LOG_BASE")
            self.log.close()
            self.log = None

    # -- releasing --------------------------------------------------------------
    def stop_vring(self, vring: Vring) -> None:
        """Stop a ring (GET_VRING_BASE): drop kick and call fds, keep the position.

        As DPDK's vhost_user_get_vring_base and libvhost-user close both fds,
        and as DPDK (and Linux's vhost_vq_init_access) forget the last signalled
        used index: after a restart the first used buffer always interrupts, so
        a stale EVENT_IDX decision cannot leave the driver waiting.
        """
        if vring.ring is not None:
            vring.base = vring.vring_base
            vring.ring.stop()
        vring.stop()
        self.replace_kick_fd(vring, -1)
        self.replace_fd(vring, "call_fd", -1)

    def replace_kick_fd(self, vring: Vring, fd: int) -> None:
        if vring.kick_fd >= 0:
            self.unwatch(vring.kick_fd)
            close_fds([vring.kick_fd])
        vring.kick_fd = fd

    @staticmethod
    def replace_fd(vring: Vring, name: str, fd: int) -> None:
        old = getattr(vring, name)
        if old >= 0:
            close_fds([old])
        setattr(vring, name, fd)

    def release_vring(self, vring: Vring) -> None:
        """Forget a ring entirely: fds closed, ring views dropped."""
        self.stop_vring(vring)
        self.replace_fd(vring, "err_fd", -1)
        vring.ring = None

    def release(self) -> None:
        """Give back everything the session holds: rings, fds, log, memory."""
        for vring in self.vrings:
            self.release_vring(vring)
        if self.log_call_fd >= 0:
            close_fds([self.log_call_fd])
        if self.log is not None:
            self.log.close()
        if self.memory is not None:
            self.memory.close()
        self._init_session()
