"""A legacy virtio-net driver that runs in the test process and acts through qtest.

Theory of operation. QEMU's vCPU sits halted in the halt firmware, so there
is no guest kernel; :class:`QTestVirtioNetGuest` does what the guest's
virtio-net driver would do, by port I/O and guest-memory writes over qtest:

1. the PCI and legacy virtio-pci steps (``virtio_pci.LegacyVirtioPci``):
   find the device (vendor 0x1af4, device 0x1000: legacy virtio-net), BAR0,
   bus mastering, the interrupt route;
2. the legacy initialisation (virtio 1.1 section 3.1.2 "Legacy Interface:
   Device Initialization"): status 0 (reset), ACKNOWLEDGE, DRIVER, read the
   host features, write the guest features, per queue select it, read its
   size, write the page frame number of a 4 KiB aligned ring, then DRIVER_OK;
3. run the split rings (virtio 1.1 section 2.6) with the ring layer's
   :class:`~vhostlab.ring.driver.VirtqueueDriver` over qtest
   (``qtest.QTestRingMemory``): descriptors, avail ring, ``avail->idx``, the
   *kick* (QUEUE_NOTIFY) when the device wants one, the used ring.

Queue 0 is RX, queue 1 is TX. Every frame is preceded by a ``virtio_net_hdr``:
10 bytes, or 12 when VIRTIO_NET_F_MRG_RXBUF is negotiated (the legacy
interface never has VERSION_1).

Every guest write goes through qtest, never through a mapping of the memfd:
QEMU's migration dirty tracking only sees writes made through QEMU. Guest
memory for rings and buffers comes from a small bump allocator above 16 MiB.
Anything the device writes (indices, ids, lengths) is checked before use.
"""
from __future__ import annotations

import copy
import struct
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from vhostlab.ring.driver import GuestDriverError, UsedElem, VirtqueueDriver
from vhostlab.ring.layout import (
    VIRTIO_NET_HDR_LEN, VIRTIO_NET_HDR_MRG_LEN, VRING_DESC_DTYPE,
    VRING_USED_ELEM_DTYPE, VringLayout, vring_layout,
)

from .qtest import QTest, QTestRingMemory
from .virtio_pci import (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                         VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
                         VIRTIO_CONFIG_S_NEEDS_RESET, LegacyVirtioPci)

__all__ = [
    "QTestVirtioNetGuest", "QTestRingSnapshot", "UsedElem", "GuestAllocator",
    "RX_QUEUE", "TX_QUEUE", "DEFAULT_FEATURES", "SUPPORTED_FEATURES",
    "VIRTIO_NET_F_MTU", "VIRTIO_NET_F_MAC", "VIRTIO_NET_F_MRG_RXBUF", "VIRTIO_NET_F_STATUS",
    "VIRTIO_RING_F_EVENT_IDX", "VIRTIO_F_NOTIFY_ON_EMPTY", "VIRTIO_F_ANY_LAYOUT",
    "VIRTIO_CONFIG_S_ACKNOWLEDGE", "VIRTIO_CONFIG_S_DRIVER", "VIRTIO_CONFIG_S_DRIVER_OK",
    "VIRTIO_CONFIG_S_FAILED",
]

VIRTIO_NET_LEGACY_DEVICE_ID = 0x1000

VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_EVENT_IDX = 29

RX_QUEUE, TX_QUEUE = 0, 1
DEFAULT_FEATURES = 1 << VIRTIO_NET_F_MAC
#: The features this driver implements; offloads (CSUM, GSO ...) are not among them.
SUPPORTED_FEATURES = sum(1 << b for b in (VIRTIO_NET_F_MTU, VIRTIO_NET_F_MAC,
                                          VIRTIO_NET_F_MRG_RXBUF,
                                          VIRTIO_NET_F_STATUS, VIRTIO_F_NOTIFY_ON_EMPTY,
                                          VIRTIO_F_ANY_LAYOUT, VIRTIO_RING_F_EVENT_IDX))
MAX_FRAME = 1514  # Ethernet header + 1500 bytes MTU, no FCS
RING_BASE = 0x1000000  # 16 MiB: clear of the legacy holes below 1 MiB


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


@dataclass
class QTestRingSnapshot:
    """A snapshot of one split ring, read from guest memory, plus the driver's view."""

    queue: int
    gpas: VringLayout
    avail_flags: int
    avail_idx: int
    used_event: int
    used_flags: int
    used_idx: int
    avail_event: int
    last_used_idx: int
    desc: np.ndarray
    avail_ring: np.ndarray
    used_ring: np.ndarray
    free_descriptors: int
    in_flight: tuple[int, ...]


class GuestAllocator:
    """Bump allocator for guest-physical memory in ``[start, end)``, 4 KiB aligned."""

    def __init__(self, start: int, end: int):
        self.start, self.end, self.next = start, end, start
        self.allocations: list[tuple[str, int, int]] = []

    def alloc(self, size: int, what: str) -> int:
        """Reserve ``size`` bytes for ``what``; return the GPA. Raises GuestDriverError if full."""
        gpa = _align(self.next, 4096)
        if size <= 0 or gpa + size > self.end:
            raise GuestDriverError(
                f"guest RAM allocator: {what} needs {size:#x} bytes at {gpa:#x}, "
                f"but guest memory for the driver ends at {self.end:#x}",
                hint="use a smaller buffer_size or a larger ram_size")
        self.next = gpa + size
        self.allocations.append((what, gpa, size))
        return gpa


@dataclass
class _Queue:
    index: int
    num: int
    gpas: VringLayout
    buffers: int               # GPA of num slots of buffer_size bytes; slot i <-> descriptor i
    driver: VirtqueueDriver
    sizes: dict[int, int] = field(default_factory=dict)   # posted RX buffer sizes by head
    notifications: int = 0
    suppressed: int = 0


class QTestVirtioNetGuest(LegacyVirtioPci):
    """The guest side of a legacy virtio-net-pci device in a real QEMU, driven over ``qtest``.

    ``features`` are the feature bits the driver asks for (only those the
    device offers are written; see :attr:`guest_features`). ``buffer_size`` is
    the size of each descriptor's buffer slot. ``interrupts=True`` routes the
    device's INTx to IOAPIC input ``irq_line`` and intercepts it over qtest,
    so :meth:`wait_used` sleeps until the device signals (no polling).
    Initialises the device at once; raises GuestDriverError if it cannot.
    ``init=False`` leaves every step to the caller, one at a time:
    :meth:`probe`, :meth:`set_status`, :meth:`negotiate_features`,
    :meth:`setup_queue` per queue, :meth:`driver_ok`.
    """

    def __init__(self, qtest: QTest, *, ram_size: int, features: int = DEFAULT_FEATURES,
                 buffer_size: int = 2048, io_base: int = 0xC000, irq_line: int = 11,
                 interrupts: bool = True, ring_base: int = RING_BASE, init: bool = True):
        unsupported = features & ~SUPPORTED_FEATURES
        if unsupported:
            bits = [b for b in range(64) if unsupported >> b & 1]
            raise ValueError(f"features {unsupported:#x} (bits {bits}) are not implemented "
                             f"by this driver; supported: {SUPPORTED_FEATURES:#x}")
        if not 64 <= buffer_size <= 65536 or buffer_size % 64:
            raise ValueError(f"buffer_size={buffer_size}: want a multiple of 64 in 64..65536")
        super().__init__(qtest, VIRTIO_NET_LEGACY_DEVICE_ID, "virtio-net", io_base=io_base,
                         irq_line=irq_line if interrupts else None)
        self.ram = QTestRingMemory(qtest)
        self.requested_features = features
        self.buffer_size = buffer_size
        self.allocator = GuestAllocator(ring_base, min(ram_size, 0xE0000000))
        self.queues: dict[int, _Queue] = {}
        self.host_features = self.guest_features = 0
        self.mac: str | None = None
        self.rx_buffer_size = 0
        self._lock = threading.RLock()
        if init:
            with self._lock:
                self._init_device()

    @property
    def hdr_len(self) -> int:
        """Length of the virtio_net_hdr: 12 with MRG_RXBUF, else 10 (legacy)."""
        if self.guest_features >> VIRTIO_NET_F_MRG_RXBUF & 1:
            return VIRTIO_NET_HDR_MRG_LEN
        return VIRTIO_NET_HDR_LEN

    def has_feature(self, bit: int) -> bool:
        """True if feature ``bit`` was negotiated."""
        return bool(self.guest_features >> bit & 1)

    # -- initialisation ---------------------------------------------------------
    def _init_device(self) -> None:
        self.probe()
        self.set_status(0)
        self.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
        self.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        self.negotiate_features()
        for q in (RX_QUEUE, TX_QUEUE):
            self._setup_queue(q)
        self.driver_ok()

    def negotiate_features(self) -> int:
        """Read the host features, write the requested ones the device offers; returns them."""
        self.host_features = self.read_host_features()
        self.guest_features = self.requested_features & self.host_features
        self.write_guest_features(self.guest_features)
        for q in self.queues.values():
            q.driver.event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX)
        return self.guest_features

    def setup_queue(self, index: int) -> VringLayout:
        """Select queue ``index``, read its size, place its ring and write the PFN."""
        with self._lock:
            self._setup_queue(index)
            return self.queues[index].gpas

    def driver_ok(self) -> int:
        """Write DRIVER_OK (with vhost, QEMU starts the back-end); returns the status read back."""
        self.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
                        | VIRTIO_CONFIG_S_DRIVER_OK)
        status = self.status()
        if status & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET) or \
                not status & VIRTIO_CONFIG_S_DRIVER_OK:
            raise GuestDriverError(f"device status {status:#x} after DRIVER_OK: the device "
                                   "(or its vhost back-end) refused to start")
        if self.has_feature(VIRTIO_NET_F_MAC):
            # struct virtio_net_config starts with mac[6].
            self.mac = ":".join(f"{self.config_read(i):02x}" for i in range(6))
        return status

    def config_mtu(self) -> int:
        """The ``mtu`` field of virtio_net_config (offset 10; meaningful with VIRTIO_NET_F_MTU)."""
        return self.config_read(10, 2)

    def _driver(self, index: int, num: int, gpas: VringLayout, clear: bool) -> VirtqueueDriver:
        return VirtqueueDriver(self.ram, num, gpas.desc, gpas.avail, gpas.used, queue=index,
                               event_idx=self.has_feature(VIRTIO_RING_F_EVENT_IDX),
                               clear=clear)

    def _setup_queue(self, index: int) -> None:
        num = self.queue_size(index)
        if not num or num & (num - 1) or num > 32768:
            raise GuestDriverError(f"queue {index}: device reports size {num}; "
                                   "want a power of two in 1..32768")
        # Legacy layout (virtio 1.1 2.6.2): desc table, avail ring, used ring
        # aligned to 4096, in one block whose page frame number the device gets.
        base = self.allocator.alloc(vring_layout(0, num).size, f"queue {index} ring")
        gpas = vring_layout(base, num)
        buffers = self.allocator.alloc(num * self.buffer_size, f"queue {index} buffers")
        self.queues[index] = _Queue(index, num, gpas, buffers,
                                    self._driver(index, num, gpas, clear=True))
        self.set_queue_ring(index, base)

    # -- migration -------------------------------------------------------------------
    def export_state(self) -> dict:
        """The driver's bookkeeping (free descriptors, chains, indices, allocator).

        In a real guest this lives in guest RAM and migrates with it; here it
        lives in Python, so hand it to :meth:`resume` on the destination.
        """
        with self._lock:
            keep = ("slot", "io_base", "irq_line", "buffer_size", "host_features",
                    "guest_features", "requested_features", "mac", "rx_buffer_size")
            state = {k: getattr(self, k) for k in keep}
            a = self.allocator
            state["allocator"] = (a.start, a.end, a.next, list(a.allocations))
            state["queues"] = {i: {"index": q.index, "num": q.num, "gpas": tuple(q.gpas),
                                   "buffers": q.buffers, "sizes": q.sizes,
                                   "notifications": q.notifications,
                                   "suppressed": q.suppressed,
                                   "driver": q.driver.export_state()}
                               for i, q in self.queues.items()}
            return copy.deepcopy(state)

    @classmethod
    def resume(cls, qtest: QTest, state: dict) -> "QTestVirtioNetGuest":
        """Adopt a running device from ``export_state()``, e.g. on a migration destination.

        Checks that the device is at DRIVER_OK with the same rings; raises
        GuestDriverError if not. Does not reset or re-initialise anything.
        """
        state = copy.deepcopy(state)
        self = cls(qtest, ram_size=state["allocator"][1], buffer_size=state["buffer_size"],
                   io_base=state["io_base"], irq_line=state["irq_line"] or 0,
                   interrupts=state["irq_line"] is not None, init=False)
        start, end, nxt, allocations = state.pop("allocator")
        self.allocator = GuestAllocator(start, end)
        self.allocator.next, self.allocator.allocations = nxt, allocations
        queues = state.pop("queues")
        self.__dict__.update(state)
        for i, d in queues.items():
            gpas = VringLayout(*d["gpas"])
            q = _Queue(d["index"], d["num"], gpas, d["buffers"],
                       self._driver(d["index"], d["num"], gpas, clear=False), sizes=d["sizes"],
                       notifications=d["notifications"], suppressed=d["suppressed"])
            q.driver.restore_state(d["driver"])
            self.queues[int(i)] = q
        if not self.status() & VIRTIO_CONFIG_S_DRIVER_OK:
            raise GuestDriverError(f"resume: device status {self.status():#x} lacks DRIVER_OK")
        for i, q in self.queues.items():
            self.check_queue_ring(i, q.gpas.desc, "resume")
        if self.irq_line is not None:
            # PIIX3 routing migrated with the machine; the qtest intercept did not.
            self.qtest.irq_intercept_in("ioapic")
        return self

    def reset(self) -> None:
        """Write status 0: the device resets (with vhost, QEMU stops the back-end's rings)."""
        with self._lock:
            self.set_status(0)
            self.queues.clear()

    # -- ring plumbing ------------------------------------------------------------
    def _queue(self, queue: int) -> _Queue:
        try:
            return self.queues[queue]
        except KeyError:
            raise GuestDriverError(f"queue {queue} is not set up (have {sorted(self.queues)})") \
                from None

    def _slot(self, q: _Queue, desc: int) -> int:
        return q.buffers + desc * self.buffer_size

    def _publish(self, q: _Queue) -> bool:
        """Publish avail->idx, then notify the device unless it asked not to be
        (virtio 1.1 2.6.10, 2.6.13.4)."""
        q.driver.publish()
        if q.driver.kick_needed():
            self._notify(q)
            return True
        q.suppressed += 1
        return False

    def _notify(self, q: _Queue) -> None:
        self.queue_notify(q.index)
        q.notifications += 1

    def notify(self, queue: int) -> None:
        """Kick ``queue`` unconditionally (write its number to QUEUE_NOTIFY)."""
        with self._lock:
            self._notify(self._queue(queue))

    def used_idx(self, queue: int) -> int:
        """Read ``used->idx`` of ``queue`` from guest memory."""
        return self._queue(queue).driver.used_idx()

    def reap_used(self, queue: int) -> list[UsedElem]:
        """Take completed buffers off ``queue``'s used ring: ``[(id, len), ...]``.

        Their descriptors become free again. On the RX queue use
        :meth:`receive` instead, which also reads the frames.
        """
        with self._lock:
            return self._queue(queue).driver.get_used()

    def wait_used(self, queue: int, count: int = 1, timeout: float = 5.0) -> int:
        """Wait until ``queue`` has ``count`` used entries not yet reaped; return how many.

        Sleeps on the device's interrupt (the *call*) when interrupts are
        routed, else re-reads used->idx at growing intervals. Returns early
        with fewer than ``count`` when ``timeout`` passes.
        """
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            with self._lock:
                ready = self._queue(queue).driver.pending_used()
            left = deadline - time.monotonic()
            if ready >= count or left <= 0:
                return ready
            if self.irq_line is not None:
                if self.qtest.wait_irq(self.irq_line, left):
                    self.read_isr()  # acknowledge: lowers the level-triggered line
            else:
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.05)

    # -- RX and TX ----------------------------------------------------------------
    def _header(self) -> bytes:
        # virtio_net_hdr: flags=0, gso_type=VIRTIO_NET_HDR_GSO_NONE, hdr_len,
        # gso_size, csum_start, csum_offset all 0 (+ num_buffers=0 with MRG_RXBUF).
        return bytes(self.hdr_len)

    def transmit(self, frames: list[bytes], *, split_header: bool = False) -> list[int]:
        """Queue ``frames`` on the TX queue and kick it; returns their descriptor heads.

        Each frame gets a zeroed virtio_net_hdr in front, in the same buffer,
        or with ``split_header=True`` in a descriptor of its own chained (NEXT)
        to the frame's. Completed TX buffers are reaped first. Raises
        GuestDriverError when a frame does not fit a buffer or the ring is full.
        """
        with self._lock:
            q = self._queue(TX_QUEUE)
            q.driver.get_used()
            frames = [bytes(f) for f in frames]
            limit = self.buffer_size - (0 if split_header else self.hdr_len)
            for i, f in enumerate(frames):
                if len(f) > limit:
                    raise GuestDriverError(f"transmit: frame {i} is {len(f)} bytes; a "
                                           f"buffer holds {limit} (buffer_size "
                                           f"{self.buffer_size}, header {self.hdr_len})")
            if not frames:
                return []
            per = 2 if split_header else 1
            ids = q.driver.next_free(per * len(frames), what=f"transmit of {len(frames)} frames ")
            chains = []
            for i, frame in enumerate(frames):
                chain = ids[per * i:per * i + per]
                if split_header:
                    h, d = chain
                    self.qtest.write(self._slot(q, h), self._header())
                    self.qtest.write(self._slot(q, d), frame)
                    chains.append([(self._slot(q, h), self.hdr_len, False),
                                   (self._slot(q, d), len(frame), False)])
                else:
                    self.qtest.write(self._slot(q, chain[0]), self._header() + frame)
                    chains.append([(self._slot(q, chain[0]), self.hdr_len + len(frame), False)])
            heads = q.driver.add_buffers(chains)
            self._publish(q)
            return heads

    def post_rx_buffers(self, n: int | None = None, size: int | None = None) -> list[int]:
        """Give the device ``n`` (default: all free) receive buffers of ``size`` bytes; kick RX.

        Without MRG_RXBUF each buffer must hold a header and a full frame
        (``hdr_len + 1514``). Returns the descriptor ids posted.
        """
        with self._lock:
            q = self._queue(RX_QUEUE)
            size = size or self.rx_buffer_size or self.buffer_size
            least = self.hdr_len if self.has_feature(VIRTIO_NET_F_MRG_RXBUF) \
                else self.hdr_len + MAX_FRAME
            if not least <= size <= self.buffer_size:
                raise GuestDriverError(
                    f"post_rx_buffers: size {size} outside {least}..{self.buffer_size} "
                    f"(header {self.hdr_len}" + ("" if least == self.hdr_len else
                                                 f" + {MAX_FRAME}-byte frame, no MRG_RXBUF") + ")")
            n = q.driver.num_free if n is None else n
            if not n:
                return []
            ids = q.driver.next_free(n, what=f"posting {n} RX buffers ")
            self.rx_buffer_size = size
            q.driver.add_buffers([[(self._slot(q, d), size, True)] for d in ids])
            for d in ids:
                q.sizes[d] = size
            self._publish(q)
            return ids

    def receive(self, timeout: float | None = None) -> list[bytes]:
        """Frames the device put in RX buffers, header stripped, oldest first.

        With ``timeout``, first waits (see :meth:`wait_used`) up to that long
        for at least one. The buffers used are posted again.
        """
        if timeout:
            self.wait_used(RX_QUEUE, 1, timeout)
        with self._lock:
            q = self._queue(RX_QUEUE)
            elems = q.driver.get_used()
            frames, i = [], 0
            while i < len(elems):
                frame, i = self._gather(q, elems, i)
                frames.append(frame)
            if elems:
                self.post_rx_buffers(len(elems), self.rx_buffer_size)
            return frames

    def _gather(self, q: _Queue, elems: list[UsedElem], i: int) -> tuple[bytes, int]:
        """Read the frame starting at ``elems[i]``; returns it and the next index."""
        head, length = elems[i]
        posted = q.sizes.pop(head, 0)
        if not self.hdr_len <= length <= posted:
            raise GuestDriverError(f"RX: used len {length} for buffer {head} outside "
                                   f"{self.hdr_len}..{posted} (header..posted size)")
        data = self.qtest.read(self._slot(q, head), length)
        nbuf = 1
        if self.has_feature(VIRTIO_NET_F_MRG_RXBUF):
            nbuf = struct.unpack_from("<H", data, 10)[0]  # virtio_net_hdr_mrg_rxbuf.num_buffers
            if not 1 <= nbuf <= len(elems) - i:
                raise GuestDriverError(f"RX: num_buffers {nbuf} in buffer {head}, but only "
                                       f"{len(elems) - i} used buffers are ready")
        parts = [data[self.hdr_len:]]
        for head, length in elems[i + 1:i + nbuf]:
            posted = q.sizes.pop(head, 0)
            if length > posted:
                raise GuestDriverError(f"RX: used len {length} > posted size {posted} "
                                       f"for buffer {head}")
            parts.append(self.qtest.read(self._slot(q, head), length))
        return b"".join(parts), i + nbuf

    # -- inspection -------------------------------------------------------------
    def queue_gpas(self, queue: int) -> VringLayout:
        """Guest-physical addresses of ``queue``'s descriptor table, avail and used rings."""
        return self._queue(queue).gpas

    def ring_state(self, queue: int) -> QTestRingSnapshot:
        """Read ``queue``'s whole ring from guest memory (one qtest read) and describe it."""
        with self._lock:
            q = self._queue(queue)
            g = q.gpas
            raw = self.qtest.read(g.desc, g.size)
        n = q.num
        a, u = g.avail - g.desc, g.used - g.desc
        avail_flags, avail_idx = struct.unpack_from("<HH", raw, a)
        used_flags, used_idx = struct.unpack_from("<HH", raw, u)
        return QTestRingSnapshot(
            queue=queue, gpas=g, avail_flags=avail_flags, avail_idx=avail_idx,
            used_event=struct.unpack_from("<H", raw, a + 4 + 2 * n)[0],
            used_flags=used_flags, used_idx=used_idx,
            avail_event=struct.unpack_from("<H", raw, u + 4 + 8 * n)[0],
            last_used_idx=q.driver.last_used_idx,
            desc=np.frombuffer(raw, VRING_DESC_DTYPE, n, 0).copy(),
            avail_ring=np.frombuffer(raw, "<u2", n, a + 4).copy(),
            used_ring=np.frombuffer(raw, VRING_USED_ELEM_DTYPE, n, u + 4).copy(),
            free_descriptors=q.driver.num_free, in_flight=tuple(sorted(q.driver.chains)))

    def stats(self) -> dict:
        """Kicks sent and suppressed per queue, interrupts seen, qtest commands sent."""
        out = {f"queue{q.index}": {"notifications": q.notifications,
                                   "suppressed": q.suppressed} for q in self.queues.values()}
        if self.irq_line is not None:
            out["interrupts"] = self.qtest.irq_raise_count(self.irq_line)
        out["qtest_commands"] = self.qtest.commands_sent
        return out
