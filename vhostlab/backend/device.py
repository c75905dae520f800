"""The vhost-user-net device's state: libvhost-user's VuDev and VuVirtq, in Python.

Theory of operation
-------------------
One `VhostUserNetDevice` lives as long as the server; a front-end
connection configures it and, when the connection ends, `release()` gives
everything back (mappings, fds, rings) so the next front-end finds a clean
device. Counters and the message trace span connections.

A virtio-net device with N queue pairs has 2N virtqueues: RX of pair p is
vring 2p, TX is vring 2p+1 (virtio spec 5.1.2). Each `Vring` holds what the
front-end told us about it (size, addresses, base, kick/call/err fds) and,
once it can be mapped, the ring layer's `Virtqueue` over guest memory.

Ring states (vhost-user.rst "Ring states"):

    stopped                  no kick fd yet, or stopped by GET_VRING_BASE:
                             the back-end must not touch the ring
    started but disabled     kick fd given; TX frames are taken and dropped,
                             no RX frames are supplied
    started and enabled      the datapath runs

"If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated, the ring starts
directly in the enabled state. If [it] has been negotiated, the ring is
initialized in a disabled state and is enabled by VHOST_USER_SET_VRING_ENABLE
with parameter 1."
"""
from __future__ import annotations

import fcntl
import logging
import os
import struct
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

from vhostlab.backend.transport import close_fds
from vhostlab.protocol import Feature, ProtocolFeature, VringAddr
from vhostlab.ring.layout import VIRTQUEUE_MAX_SIZE

log = logging.getLogger("vhostlab.backend")

DEFAULT_MAC = bytes.fromhex("525400abcdef")     # QEMU's locally administered 52:54:00 prefix
DEFAULT_MTU = 1500
MIN_MTU, MAX_MTU = 68, 65535                    # virtio spec 5.1.4.1; DPDK checks the same
MAX_QUEUE_PAIRS = 128                           # 2 * 128 vrings fit the 8-bit vring index
RX_BACKLOG_FRAMES = 4096                        # frames waiting for RX buffers, per pair
RX_BACKLOG_BYTES = 4 << 20                      # and their bytes, per pair
ERRORS_KEPT = 200

VIRTIO_NET_S_LINK_UP = 1
# struct virtio_net_config (virtio spec 5.1.4): mac[6], status, max_virtqueue_pairs,
# mtu, speed, duplex, rss_max_key_size, rss_max_indirection_table_length,
# supported_hash_types.
NET_CONFIG = struct.Struct("<6sHHHIBBHI")
NET_CONFIG_MAC = (0, 6)                         # the only field a driver may write

# Plain-int masks for the datapath: IntFlag arithmetic costs microseconds a burst.
F_LOG_ALL = int(Feature.VHOST_F_LOG_ALL)
F_MODERN_HDR = int(Feature.VIRTIO_F_VERSION_1 | Feature.VIRTIO_NET_F_MRG_RXBUF)

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
    """One virtqueue as the front-end configured it (libvhost-user's VuVirtq)."""

    index: int
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0                   # SET_VRING_BASE, until the ring object holds it
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    enabled: bool = False
    started: bool = False
    ring: object | None = None      # vhostlab.ring Virtqueue once mapped
    error: str | None = None        # why the ring is broken (device needs reset)

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


def set_nonblocking(fd: int) -> None:
    """O_NONBLOCK on an eventfd we read or write, so no peer can make us block.

    The flag lives on the open file description the front-end shares; QEMU
    and DPDK create their eventfds non-blocking already (EFD_NONBLOCK).
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


class VhostUserNetDevice:
    """A vhost-user-net device: negotiated state, memory, log, vrings, config, counters.

    `watch(fd, vring)` / `unwatch(fd)` are how the server learns which kick
    eventfds to wait on; the device calls `unwatch` before it closes a kick
    fd, so a recycled fd number can never be confused with the old one.
    """

    def __init__(self, queue_pairs: int = 1, *, mac: bytes = DEFAULT_MAC, mtu: int = DEFAULT_MTU,
                 break_logging: bool = False, ring_features: int = 0):
        if not 1 <= queue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queue_pairs={queue_pairs}: must be 1..{MAX_QUEUE_PAIRS}")
        if len(mac) != 6:
            raise ValueError(f"mac must be 6 bytes, got {len(mac)}")
        self.queue_pairs = queue_pairs
        self.initial_mac, self.initial_mtu = bytes(mac), mtu
        self.break_logging = break_logging
        self.offered_features = self._offer(ring_features, queue_pairs)
        self.offered_protocol_features = int(OFFERED_PROTOCOL_FEATURES)
        self.counters = Counters()
        self.wire = None                                  # set by the server
        self.watch: Callable[[int, Vring], None] = lambda fd, vring: None
        self.unwatch: Callable[[int], None] = lambda fd: None
        self.tx_arena = None                              # made by the datapath on first use
        self.overrides = None       # backend.overrides.RingOverrides: Python-level decisions
        self.backlog: list[deque] = [deque() for _ in range(queue_pairs)]
        self.backlog_frames = [0] * queue_pairs
        self.backlog_bytes = [0] * queue_pairs
        self._init_session()

    @staticmethod
    def _offer(ring_features: int, queue_pairs: int) -> int:
        """Feature bits this device offers in GET_FEATURES."""
        bits = (Feature.VHOST_F_LOG_ALL | Feature.VHOST_USER_F_PROTOCOL_FEATURES
                | Feature.VIRTIO_F_VERSION_1 | Feature.VIRTIO_F_ANY_LAYOUT
                | Feature.VIRTIO_NET_F_MTU | Feature.VIRTIO_NET_F_MAC
                | Feature.VIRTIO_NET_F_STATUS)
        if queue_pairs > 1:
            bits |= Feature.VIRTIO_NET_F_MQ
        return int(bits) | ring_features

    def _init_session(self) -> None:
        """The state a fresh front-end connection finds."""
        self.owner = False
        self.features = 0
        self.protocol_features = 0
        self.memory = None
        self.memory_faults_seen = 0        # SIGBUS faults already reported (rings.check_shrunk)
        self.log = None
        self.log_call_fd = -1
        self.status = 0
        self.mac, self.mtu = self.initial_mac, self.initial_mtu
        self.link_status = VIRTIO_NET_S_LINK_UP
        self.vrings = [Vring(i) for i in range(2 * self.queue_pairs)]
        self.busy: set[int] = set()        # rings a service left work on (rings.service)

    def reset(self) -> None:
        """RESET_DEVICE: the device's own state back to its initial values (rings
        stopped and disabled, queued frames dropped, features, status, MAC, MTU,
        link); what the front-end's session set up stays (ownership, protocol
        features, memory table, log)."""
        for vring in self.vrings:
            self.stop_vring(vring)
            vring.enabled = False
            vring.base = 0
        self.counters.dropped += sum(self.backlog_frames)   # frames nobody will take now
        for q in self.backlog:
            q.clear()
        self.backlog_frames = [0] * self.queue_pairs
        self.backlog_bytes = [0] * self.queue_pairs
        self.features = 0
        self.status = 0
        self.mac, self.mtu = self.initial_mac, self.initial_mtu
        self.link_status = VIRTIO_NET_S_LINK_UP

    # -- negotiated state -------------------------------------------------------
    def has_feature(self, bit: int) -> bool:
        return bool(self.features & int(bit))

    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self.protocol_features & int(bit))

    @property
    def hdr_len(self) -> int:
        """virtio-net header size: 12 with VERSION_1 or MRG_RXBUF, else 10 (virtio spec 5.1.6)."""
        return 12 if self.features & F_MODERN_HDR else 10

    @property
    def logging(self) -> bool:
        """Whether writes must be logged: VHOST_F_LOG_ALL negotiated and a log mapped."""
        return bool(self.features & F_LOG_ALL) and self.log is not None \
            and not self.break_logging

    def config_bytes(self) -> bytes:
        """struct virtio_net_config as the driver would read it."""
        return NET_CONFIG.pack(self.mac, self.link_status, self.queue_pairs, self.mtu,
                               0xFFFFFFFF, 0xFF, 0, 0, 0)   # speed, duplex unknown

    def set_config_bytes(self, blob: bytes) -> None:
        mac, status, _, mtu, *_ = NET_CONFIG.unpack(blob)
        self.mac, self.link_status, self.mtu = mac, status, mtu

    def error(self, text: str) -> None:
        """Remember and log an error (the labs and `serve`'s summary show them)."""
        self.counters.errors.append(text)
        log.warning("%s", text)

    # -- releasing --------------------------------------------------------------
    def stop_vring(self, vring: Vring) -> None:
        """Stop a ring (GET_VRING_BASE): drop kick and call fds, keep the position.

        As DPDK's vhost_user_get_vring_base and libvhost-user close both fds,
        and as DPDK (and Linux's vhost_vq_init_access) forget the last signalled
        used index: after a restart the first used buffer always interrupts, so
        a stale EVENT_IDX decision cannot leave the driver waiting.
        """
        if vring.ring is not None:
            vring.base = vring.last_avail_idx
            vring.ring.state[0]["signalled_used_valid"] = 0
        vring.started = False
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
        self.counters.dropped += sum(self.backlog_frames)   # frames nobody will take now
        for q in self.backlog:
            q.clear()
        self.backlog_frames = [0] * self.queue_pairs
        self.backlog_bytes = [0] * self.queue_pairs
        self._init_session()
