"""What is virtio-net in the back-end: config space, MTU, RARP, the TX/RX service, the wire.

The split follows rust-vmm's vhost-user-backend: its ``VhostUserHandler``
keeps the vhost-user rules (handlers.py, device.py, rings.py here) and calls
a ``VhostUserBackend`` for the device's own logic (its features, its config
space, ``handle_event`` to service a queue). :class:`NetDevice` is that
second half for a net device; the protocol half reaches it as ``dev.net``.

Data side (the server calls `service` on a kick, or on every turn in poll mode):

    TX ring  the ring's tx_burst copies guest frames into an arena (virtio-net
             header stripped), the wire takes them; a disabled ring's frames
             are taken and dropped ("must process and discard any TX
             packets", vhost-user.rst "Ring states").
    RX ring  frames for the guest (loopback wire, `inject`) wait in a bounded
             backlog per queue pair; the ring's rx_burst copies them into the
             buffers the guest posted, whenever the ring is started and
             enabled and has buffers.

After a burst the call eventfd is signalled if the ring decided the driver
wants an interrupt (VRING_AVAIL_F_NO_INTERRUPT, or EVENT_IDX's used_event).
While VHOST_F_LOG_ALL is on the bursts mark every page they write, and the
used ring at log_guest_addr when VHOST_VRING_F_LOG is set.

A guest that breaks a rule breaks only its ring: the ring raises a
RingError, the ring is BROKEN (no further access), the error is logged,
counted, and signalled on the err eventfd; every other ring runs on.
The rings are reached through `vhostlab.ring.DeviceRing` only.
"""
from __future__ import annotations

import logging
import os
import struct
from collections import deque

import numpy as np

from vhostlab.backend import overrides as _overrides
from vhostlab.backend.wire import rarp_frame
from vhostlab.protocol import Feature
from vhostlab.ring import FrameArena, RingError

logger = logging.getLogger("vhostlab.backend")

DEFAULT_MAC = bytes.fromhex("525400abcdef")     # QEMU's locally administered 52:54:00 prefix
DEFAULT_MTU = 1500
MIN_MTU, MAX_MTU = 68, 65535                    # virtio spec 5.1.4.1; DPDK checks the same
RX_BACKLOG_FRAMES = 4096                        # frames waiting for RX buffers, per pair
RX_BACKLOG_BYTES = 4 << 20                      # and their bytes, per pair

VIRTIO_NET_S_LINK_UP = 1
# struct virtio_net_config (virtio spec 5.1.4): mac[6], status, max_virtqueue_pairs,
# mtu, speed, duplex, rss_max_key_size, rss_max_indirection_table_length,
# supported_hash_types.
NET_CONFIG = struct.Struct("<6sHHHIBBHI")
NET_CONFIG_MAC = (0, 6)                         # the only field a driver may write

# What the ring layer implements, so the device may offer it.
RING_FEATURES = int(Feature.VIRTIO_RING_F_EVENT_IDX | Feature.VIRTIO_RING_F_INDIRECT_DESC
                    | Feature.VIRTIO_NET_F_MRG_RXBUF | Feature.VIRTIO_F_RING_PACKED)
TX_BURST = 256                     # chains per TX burst
TX_ARENA_BYTES = 1 << 20           # holds a 64 KiB GSO frame many times over
# One service's weight, as Linux's vhost-net (drivers/vhost/net.c): after this many
# bytes or frames, or descriptors walked, the ring is serviced again on the next turn
# of the loop (at once, without waiting for a kick), so that other rings, the
# socket and stop() get their turn in between.
VHOST_NET_WEIGHT = 0x80000         # bytes
VHOST_NET_PKT_WEIGHT = 256         # frames
VHOST_NET_DESC_WEIGHT = 0x20000    # descriptors (Linux caps chains at UIO_MAXIOV instead)
MAX_GSO_FRAME = 65535              # the largest frame a TX chain may carry, MTU permitting


def net_features(queue_pairs: int) -> int:
    """The virtio-net feature bits this device offers (with the ring's, RING_FEATURES)."""
    bits = (Feature.VIRTIO_NET_F_MTU | Feature.VIRTIO_NET_F_MAC | Feature.VIRTIO_NET_F_STATUS)
    if queue_pairs > 1:
        bits |= Feature.VIRTIO_NET_F_MQ
    return int(bits)


def signal(fd: int) -> None:
    """Write 1 to an eventfd (call, err, log call)."""
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass                                # the counter is saturated: already signalled


class NetDevice:
    """The virtio-net half of the device (rust-vmm's VhostUserBackend).

    ``dev`` is the vhost-user half (``VhostUserNetDevice``): negotiated
    features, guest memory, the log, the vrings and the counters.
    """

    def __init__(self, dev, queue_pairs: int, mac: bytes = DEFAULT_MAC,
                 mtu: int = DEFAULT_MTU):
        if len(mac) != 6:
            raise ValueError(f"mac must be 6 bytes, got {len(mac)}")
        self.dev = dev
        self.queue_pairs = queue_pairs
        self.initial_mac, self.initial_mtu = bytes(mac), mtu
        self.wire = None                  # set by the server
        self.tx_arena = None              # made on first use
        self.overrides = None       # backend.overrides.RingOverrides: Python-level decisions
        self.backlog: list[deque] = [deque() for _ in range(queue_pairs)]
        self.backlog_frames = [0] * queue_pairs
        self.backlog_bytes = [0] * queue_pairs
        self.busy: set[int] = set()       # rings a service left work on
        self.reset()

    def reset(self) -> None:
        """Initial config (MAC, MTU, link up); frames queued for the guest are dropped."""
        self.mac, self.mtu = self.initial_mac, self.initial_mtu
        self.link_status = VIRTIO_NET_S_LINK_UP
        self.dev.counters.dropped += sum(self.backlog_frames)   # frames nobody will take now
        for q in self.backlog:
            q.clear()
        self.backlog_frames = [0] * self.queue_pairs
        self.backlog_bytes = [0] * self.queue_pairs
        self.busy = set()

    # -- config space, MTU, RARP -----------------------------------------------------
    @property
    def hdr_len(self) -> int:
        """virtio-net header size: 12 with VERSION_1 or MRG_RXBUF, else 10 (virtio spec 5.1.6)."""
        return 12 if self.dev.features & _F_MODERN_HDR else 10

    def config_bytes(self) -> bytes:
        """struct virtio_net_config as the driver would read it."""
        return NET_CONFIG.pack(self.mac, self.link_status, self.queue_pairs, self.mtu,
                               0xFFFFFFFF, 0xFF, 0, 0, 0)   # speed, duplex unknown

    def set_config_bytes(self, blob: bytes) -> None:
        """A whole new config; raises ValueError (naming the field) for a bad MTU."""
        mac, status, _, mtu, *_ = NET_CONFIG.unpack(blob)
        self.check_mtu(mtu)
        self.mac, self.link_status, self.mtu = mac, status, mtu

    @staticmethod
    def check_mtu(mtu: int) -> None:
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"mtu = {mtu}: must be {MIN_MTU}..{MAX_MTU}")

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: announce the guest's MAC on the wire (after a migration)."""
        self.wire.send(FrameArena.from_frames([rarp_frame(mac)]), 0)
        self.dev.counters.rarp_sent += 1

    def max_chain(self) -> int:
        """The longest TX chain taken as a frame: max(MTU, 65535) plus the header."""
        return max(self.mtu, MAX_GSO_FRAME) + self.hdr_len

    # -- the service ------------------------------------------------------------------
    def _arena(self) -> FrameArena:
        """The TX arena (one per device: two back-ends in one process, as in the
        migration labs, run in two threads)."""
        if self.tx_arena is None:
            self.tx_arena = FrameArena(TX_ARENA_BYTES, TX_BURST)
        return self.tx_arena

    def runnable(self, vring) -> bool:
        dev = self.dev
        vq = vring.ring
        return (vring.started and vq is not None and not vq.broken and dev.memory is not None
                and not dev.memory.closed)

    def broken(self, vring, text: str, ring_broke: bool = False) -> None:
        """Record why a ring failed and signal its err eventfd; with ``ring_broke``
        the ring itself is BROKEN (a guest broke a rule in it)."""
        vring.error = text
        if ring_broke:
            vring.set_broken()
        self.dev.error(text)
        if vring.err_fd >= 0:                   # SET_VRING_ERR: "signal when error occurs"
            signal(vring.err_fd)

    def _call(self, vring) -> None:
        """Signal the call eventfd if the burst decided the driver wants an interrupt
        (or, when this device has an override, if the override decided so)."""
        hooks = self.overrides
        if hooks is not None and hooks.should_signal is not None \
                and _overrides.applies(vring.ring):
            need = _overrides.decide_call(self.dev, vring, hooks)
        else:
            need = vring.ring.take_call()
        if need and vring.call_fd >= 0:
            signal(vring.call_fd)
            self.dev.counters.calls += 1

    def service(self, vring) -> bool:
        """Run the ring's bursts up to one service's weight; True if work is left.

        The caller services the ring again at once when True comes back (Linux's
        vhost_poll_queue after vhost_exceeds_weight): with EVENT_IDX the driver
        does not kick for chains it already published.
        """
        try:
            if vring.is_rx:
                return self._service_rx(vring.queue_pair)
            if not self.runnable(vring):
                return False
            return self._service_tx(vring)
        except Exception as exc:        # a bug must cost one ring, not the server
            logger.exception("vring %d failed", vring.index)
            vring.stop()
            self.broken(vring, f"vring {vring.index}: internal error: "
                               f"{exc.__class__.__name__}: {exc}")
            return False
        finally:
            self.dev.check_shrunk()

    def poll_all(self) -> bool:
        """Service every started ring once (poll mode); True if any has work left."""
        more = False
        for vring in self.dev.vrings:
            if vring.started:
                more |= self.service(vring)
        return more

    def _service_tx(self, vring) -> bool:
        dev = self.dev
        vq, arena, log, hdr_len = vring.ring, self._arena(), dev.active_log, self.hdr_len
        counters = dev.counters
        vq.begin_service(VHOST_NET_DESC_WEIGHT, self.max_chain())
        logged0, oversized0 = vq.logged, vq.oversized
        frames = nbytes = 0
        error = None
        while True:
            bytes0 = vq.bytes
            try:
                n = vq.tx_burst(dev.memory, arena, log=log, hdr_len=hdr_len,
                                max_frames=TX_BURST)
            except RingError as exc:
                # Without its traceback: the frames it holds hold views of guest
                # memory, which would keep a closed memory table mapped until
                # the garbage collector finds the cycle through `error`.
                error, n = exc.with_traceback(None), exc.frames
            sent = vq.bytes - bytes0
            frames, nbytes = frames + n, nbytes + sent
            if n:
                counters.guest_tx_frames += n
                counters.guest_tx_bytes += sent
                if vring.enabled:
                    self.wire.send(arena, vring.queue_pair)
                else:
                    counters.dropped += n
            self._call(vring)
            if error is not None:
                self.broken(vring, str(error), ring_broke=True)
                break
            if not vq.avail_pending or frames >= VHOST_NET_PKT_WEIGHT \
                    or nbytes >= VHOST_NET_WEIGHT or vq.service_spent():
                break
        counters.pages_logged += vq.logged - logged0
        oversized = vq.oversized - oversized0
        if oversized:
            counters.dropped += oversized
            dev.error(f"vring {vring.index}: {oversized} TX chain(s) over the limit of "
                      f"{vq.max_chain} bytes (max(MTU {self.mtu}, {MAX_GSO_FRAME}) + "
                      f"{hdr_len}-byte header) dropped; the last, head {vq.oversized_head},"
                      f" was {vq.oversized_len} bytes or more")
        return self._leftover(vring, error is None and bool(vq.avail_pending))

    def deliver(self, arena: FrameArena, pair: int) -> None:
        """Queue frames for the guest's RX ring of `pair` and deliver what fits now.

        The backlog is bounded by frames (RX_BACKLOG_FRAMES) and by bytes
        (RX_BACKLOG_BYTES) per queue pair; what does not fit is dropped.
        """
        if arena.count == 0:
            return
        counters = self.dev.counters
        room = RX_BACKLOG_FRAMES - self.backlog_frames[pair]
        room_bytes = RX_BACKLOG_BYTES - self.backlog_bytes[pair]
        sizes = arena.lengths[:min(max(room, 0), arena.count)]
        fit = int(np.searchsorted(np.cumsum(sizes), room_bytes, side="right")) \
            if sizes.size else 0
        if fit <= 0:
            counters.dropped += arena.count
            return
        copy = _copy_arena(arena, fit)
        counters.dropped += arena.count - copy.count
        self.backlog[pair].append(copy)
        self.backlog_frames[pair] += copy.count
        self.backlog_bytes[pair] += copy.used_bytes
        if self.runnable(self.dev.vrings[2 * pair]):
            self._service_rx(pair)

    def _service_rx(self, pair: int) -> bool:
        backlog = self.backlog[pair]
        if not backlog:
            return False
        dev = self.dev
        vring = dev.vrings[2 * pair]
        if not vring.enabled or not self.runnable(vring):
            return False
        vq, log, hdr_len, counters = vring.ring, dev.active_log, self.hdr_len, dev.counters
        vq.begin_service(VHOST_NET_DESC_WEIGHT)
        logged0 = vq.logged
        mrg = dev.has_feature(Feature.VIRTIO_NET_F_MRG_RXBUF)
        hooks = self.overrides
        placed = hooks is not None and hooks.place_frame is not None and mrg \
            and _overrides.applies(vq)
        frames = nbytes = 0
        more = False
        while backlog:
            arena = backlog[0]
            frames0, bytes0, dropped0 = vq.frames, vq.bytes, vq.dropped
            error = None
            try:
                if placed:
                    done = _overrides.rx_burst_placed(dev, vq, arena, hdr_len, hooks, log=log)
                else:
                    done = vq.rx_burst(dev.memory, arena, log=log, hdr_len=hdr_len,
                                       mrg_rxbuf=mrg)
            except RingError as exc:
                error, done = exc.with_traceback(None), exc.frames     # (see _service_tx)
            counters.guest_rx_frames += vq.frames - frames0
            counters.guest_rx_bytes += vq.bytes - bytes0
            counters.dropped += vq.dropped - dropped0
            frames, nbytes = frames + done, nbytes + vq.bytes - bytes0
            self._call(vring)
            self.backlog_frames[pair] -= done
            self.backlog_bytes[pair] -= int(arena.lengths[:done].sum())
            if error is not None:
                arena.drop_front(done)
                self.broken(vring, str(error), ring_broke=True)
                break
            if done < arena.count:          # out of RX buffers, or the weight is spent:
                arena.drop_front(done)      # the rest waits (for a kick, or the next turn)
                more = vq.service_spent()
                break
            backlog.popleft()
            if frames >= VHOST_NET_PKT_WEIGHT or nbytes >= VHOST_NET_WEIGHT \
                    or vq.service_spent():
                more = bool(backlog)
                break
        counters.pages_logged += vq.logged - logged0
        return self._leftover(vring, bool(more))

    def _leftover(self, vring, more: bool) -> bool:
        """Remember in ``busy`` the rings a service left work on (the server
        services them again on its next turn, without waiting for a kick)."""
        more = more and self.runnable(vring)
        if more:
            self.busy.add(vring.index)
        else:
            self.busy.discard(vring.index)
        return more


_F_MODERN_HDR = int(Feature.VIRTIO_F_VERSION_1 | Feature.VIRTIO_NET_F_MRG_RXBUF)


def _copy_arena(arena: FrameArena, count: int) -> FrameArena:
    """The first `count` frames of `arena`, packed into a new arena of their own."""
    sizes = arena.lengths[:count]
    out = FrameArena(max(1, int(sizes.sum())), max(1, count))
    pos = 0
    for k in range(count):
        start, size = int(arena.offsets[k]), int(sizes[k])
        out.buf[pos:pos + size] = arena.buf[start:start + size]
        out.offsets[k], out.lengths[k] = pos, size
        pos += size
    out.count = count
    return out
