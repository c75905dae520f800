"""A legacy virtio-net driver that runs in the test process and acts through qtest.

Theory of operation. QEMU's vCPU sits halted in the halt firmware, so there
is no guest kernel; this class does what the guest's virtio-net driver would
do, by port I/O and guest-memory writes over qtest:

1. find the device on PCI bus 0 (vendor 0x1af4, device 0x1000: legacy
   virtio-net), give BAR0 an I/O base, enable I/O decoding and bus mastering
   (the device's DMA into guest RAM needs bus mastering);
2. route the PCI interrupt to an IOAPIC input QEMU reports over qtest, so
   "used buffer" interrupts (vhost's *call*) wake a waiting driver;
3. the legacy initialisation (virtio 1.1 section 3.1.2 "Legacy Interface:
   Device Initialization", registers of 4.1.4.8 "Legacy Interfaces: A Note
   on PCI Device Layout"): status 0 (reset), ACKNOWLEDGE, DRIVER, read the host
   features, write the guest features, per queue select it, read its size,
   write the page frame number of a 4 KiB aligned ring, then DRIVER_OK;
4. run the split rings (virtio 1.1 section 2.6): put descriptors in the
   descriptor table, their heads in the avail ring, publish ``avail->idx``,
   notify (the *kick*) by writing the queue number to QUEUE_NOTIFY, and take
   completed heads back from the used ring.

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
import dataclasses
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from vhostlab.ring.layout import (
    VIRTIO_NET_HDR_LEN, VIRTIO_NET_HDR_MRG_LEN, VRING_DESC_DTYPE, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE, VRING_USED_ELEM_DTYPE, VRING_USED_F_NO_NOTIFY, VringLayout,
    vring_layout, vring_need_event_py,
)

from .errors import GuestDriverError
from .qtest import QTest

__all__ = [
    "VirtioNetGuest", "RingState", "UsedElem", "GuestAllocator",
    "RX_QUEUE", "TX_QUEUE", "DEFAULT_FEATURES", "SUPPORTED_FEATURES",
    "VIRTIO_NET_F_MTU", "VIRTIO_NET_F_MAC", "VIRTIO_NET_F_MRG_RXBUF", "VIRTIO_NET_F_STATUS",
    "VIRTIO_RING_F_EVENT_IDX", "VIRTIO_F_NOTIFY_ON_EMPTY", "VIRTIO_F_ANY_LAYOUT",
    "VIRTIO_CONFIG_S_ACKNOWLEDGE", "VIRTIO_CONFIG_S_DRIVER", "VIRTIO_CONFIG_S_DRIVER_OK",
    "VIRTIO_CONFIG_S_FAILED",
]

# PCI configuration mechanism #1 and registers (QEMU include/hw/pci/pci_regs.h).
PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA = 0xCF8, 0xCFC
PCI_VENDOR_ID, PCI_COMMAND, PCI_BASE_ADDRESS_0, PCI_INTERRUPT_LINE = 0x00, 0x04, 0x10, 0x3C
PCI_COMMAND_IO, PCI_COMMAND_MASTER, PCI_COMMAND_INTX_DISABLE = 0x1, 0x4, 0x400
PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_VENDOR_ID_REDHAT_QUMRANET, VIRTIO_NET_LEGACY_DEVICE_ID = 0x1AF4, 0x1000
# PIIX3 (00:01.0) PIRQ[A-D] route control registers (QEMU hw/isa/piix3.c PIIX_PIRQCA).
PIIX3_SLOT, PIIX_PIRQCA = 1, 0x60

# Legacy virtio-pci I/O registers (QEMU include/standard-headers/linux/virtio_pci.h).
VIRTIO_PCI_HOST_FEATURES = 0x00
VIRTIO_PCI_GUEST_FEATURES = 0x04
VIRTIO_PCI_QUEUE_PFN = 0x08
VIRTIO_PCI_QUEUE_NUM = 0x0C
VIRTIO_PCI_QUEUE_SEL = 0x0E
VIRTIO_PCI_QUEUE_NOTIFY = 0x10
VIRTIO_PCI_STATUS = 0x12
VIRTIO_PCI_ISR = 0x13
VIRTIO_PCI_CONFIG_OFF = 0x14  # device config when MSI-X is off
VIRTIO_PCI_QUEUE_ADDR_SHIFT = 12

VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

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


class UsedElem(NamedTuple):
    """One used-ring element as the device wrote it: chain head ``id``, bytes written ``len``."""

    id: int
    len: int


@dataclass
class RingState:
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
    free: list[int] = field(default_factory=list)
    chains: dict[int, list[int]] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)   # posted RX buffer sizes by head
    avail_idx: int = 0         # the driver's copy of avail->idx
    last_used_idx: int = 0     # how far the driver has consumed the used ring
    notifications: int = 0
    suppressed: int = 0


class VirtioNetGuest:
    """The guest side of a legacy virtio-net-pci device, driven over ``qtest``.

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
        if io_base & 0xFF or not 0x1000 <= io_base <= 0xFF00:
            raise ValueError(f"io_base={io_base:#x}: want a 256-byte aligned port "
                             "in 0x1000..0xff00")
        self.qtest = qtest
        self.requested_features = features
        self.buffer_size = buffer_size
        self.io_base = io_base
        self.irq_line = irq_line if interrupts else None
        self.allocator = GuestAllocator(ring_base, min(ram_size, 0xE0000000))
        self.queues: dict[int, _Queue] = {}
        self.host_features = self.guest_features = 0
        self.slot: int | None = None
        self.mac: str | None = None
        self.rx_buffer_size = 0
        self._lock = threading.RLock()
        self._interrupts = interrupts
        if init:
            with self._lock:
                self._init_device(interrupts)

    # -- PCI ------------------------------------------------------------------
    def _cfg_addr(self, slot: int, reg: int) -> int:
        return 0x80000000 | slot << 11 | (reg & 0xFC)

    def pci_read32(self, slot: int, reg: int) -> int:
        """Read a dword of bus 0 / ``slot`` / function 0 config space (mechanism #1)."""
        self.qtest.outl(PCI_CONFIG_ADDRESS, self._cfg_addr(slot, reg))
        return self.qtest.inl(PCI_CONFIG_DATA)

    def pci_write(self, slot: int, reg: int, value: int, width: int = 4) -> None:
        """Write ``width`` bytes of config space at ``reg``."""
        self.qtest.outl(PCI_CONFIG_ADDRESS, self._cfg_addr(slot, reg))
        port = PCI_CONFIG_DATA + (reg & 3)
        {1: self.qtest.outb, 2: self.qtest.outw, 4: self.qtest.outl}[width](port, value)

    def _find_device(self) -> int:
        want = VIRTIO_NET_LEGACY_DEVICE_ID << 16 | PCI_VENDOR_ID_REDHAT_QUMRANET
        for slot in range(32):
            if self.pci_read32(slot, PCI_VENDOR_ID) == want:
                return slot
        raise GuestDriverError(
            "no legacy virtio-net device (1af4:1000) on PCI bus 0",
            hint="QEMU needs -device virtio-net-pci,disable-modern=on")

    def _program_bar0(self) -> None:
        slot = self.slot
        # Size the BAR the standard way: write all ones, read back the mask.
        self.pci_write(slot, PCI_BASE_ADDRESS_0, 0xFFFFFFFF)
        mask = self.pci_read32(slot, PCI_BASE_ADDRESS_0)
        if not mask & PCI_BASE_ADDRESS_SPACE_IO:
            raise GuestDriverError(f"BAR0 of 00:{slot:02x}.0 is not an I/O BAR ({mask:#x}); "
                                   "is disable-modern=on set?")
        size = (~(mask & 0xFFFFFFFC) + 1) & 0xFFFF
        if not size or size & (size - 1):
            raise GuestDriverError(f"BAR0 of 00:{slot:02x}.0 reports mask {mask:#x}: "
                                   "not a power-of-two I/O window")
        if self.io_base % size:
            raise GuestDriverError(f"io_base {self.io_base:#x} not aligned to BAR0 size {size:#x}")
        self.pci_write(slot, PCI_BASE_ADDRESS_0, self.io_base | PCI_BASE_ADDRESS_SPACE_IO)
        self.pci_write(slot, PCI_COMMAND, PCI_COMMAND_IO | PCI_COMMAND_MASTER, 2)

    def _route_interrupt(self) -> None:
        # Without firmware nobody routes PCI INTx: send PIRQA-D to irq_line on the
        # PIIX3, then have QEMU report that IOAPIC input over qtest.
        for pirq in range(4):
            self.pci_write(PIIX3_SLOT, PIIX_PIRQCA + pirq, self.irq_line, 1)
        self.pci_write(self.slot, PCI_INTERRUPT_LINE, self.irq_line, 1)
        self.qtest.irq_intercept_in("ioapic")

    # -- legacy virtio registers ------------------------------------------------
    def status(self) -> int:
        """Read the device status register."""
        return self.qtest.inb(self.io_base + VIRTIO_PCI_STATUS)

    def set_status(self, value: int) -> None:
        """Write the device status register (0 resets the device)."""
        self.qtest.outb(self.io_base + VIRTIO_PCI_STATUS, value)

    def read_isr(self) -> int:
        """Read (and so clear, lowering INTx) the ISR: bit 0 queue interrupt, bit 1 config."""
        return self.qtest.inb(self.io_base + VIRTIO_PCI_ISR)

    def queue_size(self, queue: int) -> int:
        """Select ``queue`` and read its size (VIRTIO_PCI_QUEUE_NUM)."""
        self.qtest.outw(self.io_base + VIRTIO_PCI_QUEUE_SEL, queue)
        return self.qtest.inw(self.io_base + VIRTIO_PCI_QUEUE_NUM)

    def queue_pfn(self, queue: int) -> int:
        """Select ``queue`` and read back its ring's page frame number."""
        self.qtest.outw(self.io_base + VIRTIO_PCI_QUEUE_SEL, queue)
        return self.qtest.inl(self.io_base + VIRTIO_PCI_QUEUE_PFN)

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
    def _init_device(self, interrupts: bool) -> None:
        self.probe(interrupts)
        self.set_status(0)
        self.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
        self.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        self.negotiate_features()
        for q in (RX_QUEUE, TX_QUEUE):
            self._setup_queue(q)
        self.driver_ok()

    def probe(self, interrupts: bool | None = None) -> int:
        """Find the device, give BAR0 its I/O base, route INTx; returns the PCI slot."""
        self.slot = self._find_device()
        self._program_bar0()
        if self._interrupts if interrupts is None else interrupts:
            self._route_interrupt()
        return self.slot

    def negotiate_features(self) -> int:
        """Read the host features, write the requested ones the device offers; returns them."""
        self.host_features = self.qtest.inl(self.io_base + VIRTIO_PCI_HOST_FEATURES)
        self.guest_features = self.requested_features & self.host_features
        self.qtest.outl(self.io_base + VIRTIO_PCI_GUEST_FEATURES, self.guest_features)
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
            # struct virtio_net_config starts with mac[6]; legacy config is in I/O space.
            base = self.io_base + VIRTIO_PCI_CONFIG_OFF
            self.mac = ":".join(f"{self.qtest.inb(base + i):02x}" for i in range(6))
        return status

    def config_mtu(self) -> int:
        """The ``mtu`` field of virtio_net_config (offset 10; meaningful with VIRTIO_NET_F_MTU)."""
        return self.qtest.inw(self.io_base + VIRTIO_PCI_CONFIG_OFF + 10)

    def _setup_queue(self, index: int) -> None:
        num = self.queue_size(index)
        if not num or num & (num - 1) or num > 32768:
            raise GuestDriverError(f"queue {index}: device reports size {num}; "
                                   "want a power of two in 1..32768")
        # Legacy layout (virtio 1.1 2.6.2): desc table, avail ring, used ring
        # aligned to 4096, in one block whose page frame number the device gets.
        base = self.allocator.alloc(vring_layout(0, num).size, f"queue {index} ring")
        gpas = vring_layout(base, num)
        self.qtest.memset(base, gpas.size, 0)
        buffers = self.allocator.alloc(num * self.buffer_size, f"queue {index} buffers")
        self.queues[index] = _Queue(index, num, gpas, buffers, free=list(range(num)))
        # QUEUE_SEL is still ``index`` (queue_size selected it).
        self.qtest.outl(self.io_base + VIRTIO_PCI_QUEUE_PFN, base >> VIRTIO_PCI_QUEUE_ADDR_SHIFT)
        pfn = self.queue_pfn(index)
        if pfn != base >> VIRTIO_PCI_QUEUE_ADDR_SHIFT:
            raise GuestDriverError(f"queue {index}: wrote PFN {base >> 12:#x}, read back {pfn:#x}")

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
            state["queues"] = {i: dataclasses.asdict(q) for i, q in self.queues.items()}
            return copy.deepcopy(state)

    @classmethod
    def resume(cls, qtest: QTest, state: dict) -> "VirtioNetGuest":
        """Adopt a running device from ``export_state()``, e.g. on a migration destination.

        Checks that the device is at DRIVER_OK with the same rings; raises
        GuestDriverError if not. Does not reset or re-initialise anything.
        """
        self = cls.__new__(cls)
        self.qtest, self._lock = qtest, threading.RLock()
        state = copy.deepcopy(state)
        start, end, nxt, allocations = state.pop("allocator")
        self.allocator = GuestAllocator(start, end)
        self.allocator.next, self.allocator.allocations = nxt, allocations
        self.queues = {int(i): _Queue(**{**d, "gpas": VringLayout(*d["gpas"])})
                       for i, d in state.pop("queues").items()}
        self.__dict__.update(state)
        if not self.status() & VIRTIO_CONFIG_S_DRIVER_OK:
            raise GuestDriverError(f"resume: device status {self.status():#x} lacks DRIVER_OK")
        for i, q in self.queues.items():
            if self.queue_pfn(i) != q.gpas.desc >> VIRTIO_PCI_QUEUE_ADDR_SHIFT:
                raise GuestDriverError(f"resume: queue {i} PFN {self.queue_pfn(i):#x} is not "
                                       f"the exported ring at {q.gpas.desc:#x}")
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

    def _write_descs(self, q: _Queue, descs: dict[int, tuple[int, int, int, int]]) -> None:
        # One qtest write per run of consecutive descriptor indices.
        ids = sorted(descs)
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[i - 1] + 1:
                run = ids[start:i]
                data = b"".join(struct.pack("<QIHH", *descs[d]) for d in run)
                self.qtest.write(q.gpas.desc + 16 * run[0], data)
                start = i

    def _publish(self, q: _Queue, heads: list[int]) -> int:
        """Put ``heads`` in the avail ring, then publish avail->idx; returns the old idx."""
        old = q.avail_idx
        pos = old % q.num
        entries = struct.pack(f"<{len(heads)}H", *heads)
        first = min(len(heads), q.num - pos)
        self.qtest.write(q.gpas.avail + 4 + 2 * pos, entries[:2 * first])
        if first < len(heads):  # wrapped around the end of the ring
            self.qtest.write(q.gpas.avail + 4, entries[2 * first:])
        # The ring entries are written before the index that makes them visible
        # (virtio 1.1 2.6.13.3 "Updating idx": after the ring entries it exposes).
        q.avail_idx = (old + len(heads)) & 0xFFFF
        self.qtest.writew(q.gpas.avail + 2, q.avail_idx)
        return old

    def _kick(self, q: _Queue, old_idx: int, force: bool = False) -> bool:
        """Notify the device unless it asked not to be (virtio 1.1 2.6.10, 2.6.13.4)."""
        if self.has_feature(VIRTIO_RING_F_EVENT_IDX):
            avail_event = self.qtest.readw(q.gpas.used + 4 + 8 * q.num)
            need = vring_need_event_py(avail_event, q.avail_idx, old_idx)
        else:
            need = not self.qtest.readw(q.gpas.used) & VRING_USED_F_NO_NOTIFY
        if need or force:
            self.qtest.outw(self.io_base + VIRTIO_PCI_QUEUE_NOTIFY, q.index)
            q.notifications += 1
            return True
        q.suppressed += 1
        return False

    def notify(self, queue: int) -> None:
        """Kick ``queue`` unconditionally (write its number to QUEUE_NOTIFY)."""
        with self._lock:
            q = self._queue(queue)
            self._kick(q, q.avail_idx, force=True)

    def _take(self, q: _Queue, n: int, what: str) -> list[int]:
        if n > len(q.free):
            raise GuestDriverError(
                f"queue {q.index}: {what} needs {n} descriptors, {len(q.free)} free "
                f"of {q.num}", hint="reap used buffers first (reap_used / receive)")
        taken, q.free[:n] = q.free[:n], []
        return taken

    def used_idx(self, queue: int) -> int:
        """Read ``used->idx`` of ``queue`` from guest memory."""
        return self.qtest.readw(self._queue(queue).gpas.used + 2)

    def _reap(self, q: _Queue) -> list[UsedElem]:
        used_idx = self.qtest.readw(q.gpas.used + 2)
        n = (used_idx - q.last_used_idx) & 0xFFFF
        if n > q.num:  # the device is not trusted either
            raise GuestDriverError(f"queue {q.index}: used->idx {used_idx} is {n} ahead of "
                                   f"last_used_idx {q.last_used_idx}, more than size {q.num}")
        if not n:
            return []
        raw = self.qtest.read(q.gpas.used + 4, 8 * q.num)
        ring = np.frombuffer(raw, VRING_USED_ELEM_DTYPE)
        out = []
        for k in range(n):
            e = ring[(q.last_used_idx + k) % q.num]
            head, length = int(e["id"]), int(e["len"])
            chain = q.chains.pop(head, None)
            if chain is None:
                raise GuestDriverError(f"queue {q.index}: used ring returned id {head}, "
                                       "which is not an outstanding descriptor head")
            q.free.extend(chain)
            out.append(UsedElem(head, length))
        q.last_used_idx = used_idx
        if self.has_feature(VIRTIO_RING_F_EVENT_IDX):
            # used_event (avail->ring[num]): interrupt me when the next entry is used.
            self.qtest.writew(q.gpas.avail + 4 + 2 * q.num, q.last_used_idx)
        return out

    def reap_used(self, queue: int) -> list[UsedElem]:
        """Take completed buffers off ``queue``'s used ring: ``[(id, len), ...]``.

        Their descriptors become free again. On the RX queue use
        :meth:`receive` instead, which also reads the frames.
        """
        with self._lock:
            return self._reap(self._queue(queue))

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
                q = self._queue(queue)
                ready = (self.used_idx(queue) - q.last_used_idx) & 0xFFFF
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
            self._reap(q)
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
            ids = self._take(q, per * len(frames), f"transmit of {len(frames)} frames")
            descs, heads = {}, []
            for i, frame in enumerate(frames):
                chain = ids[per * i:per * i + per]
                if split_header:
                    h, d = chain
                    self.qtest.write(self._slot(q, h), self._header())
                    self.qtest.write(self._slot(q, d), frame)
                    descs[h] = (self._slot(q, h), self.hdr_len, VRING_DESC_F_NEXT, d)
                    descs[d] = (self._slot(q, d), len(frame), 0, 0)
                else:
                    self.qtest.write(self._slot(q, chain[0]), self._header() + frame)
                    descs[chain[0]] = (self._slot(q, chain[0]), self.hdr_len + len(frame), 0, 0)
                q.chains[chain[0]] = chain
                heads.append(chain[0])
            self._write_descs(q, descs)
            self._kick(q, self._publish(q, heads))
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
            n = len(q.free) if n is None else n
            ids = self._take(q, n, f"posting {n} RX buffers")
            if not ids:
                return []
            self.rx_buffer_size = size
            self._write_descs(q, {d: (self._slot(q, d), size, VRING_DESC_F_WRITE, 0) for d in ids})
            for d in ids:
                q.chains[d] = [d]
                q.sizes[d] = size
            self._kick(q, self._publish(q, ids))
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
            elems = self._reap(q)
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

    def ring_state(self, queue: int) -> RingState:
        """Read ``queue``'s whole ring from guest memory (one qtest read) and describe it."""
        with self._lock:
            q = self._queue(queue)
            g = q.gpas
            raw = self.qtest.read(g.desc, g.size)
        n = q.num
        a, u = g.avail - g.desc, g.used - g.desc
        avail_flags, avail_idx = struct.unpack_from("<HH", raw, a)
        used_flags, used_idx = struct.unpack_from("<HH", raw, u)
        return RingState(
            queue=queue, gpas=g, avail_flags=avail_flags, avail_idx=avail_idx,
            used_event=struct.unpack_from("<H", raw, a + 4 + 2 * n)[0],
            used_flags=used_flags, used_idx=used_idx,
            avail_event=struct.unpack_from("<H", raw, u + 4 + 8 * n)[0],
            last_used_idx=q.last_used_idx,
            desc=np.frombuffer(raw, VRING_DESC_DTYPE, n, 0).copy(),
            avail_ring=np.frombuffer(raw, "<u2", n, a + 4).copy(),
            used_ring=np.frombuffer(raw, VRING_USED_ELEM_DTYPE, n, u + 4).copy(),
            free_descriptors=len(q.free), in_flight=tuple(sorted(q.chains)))

    def stats(self) -> dict:
        """Kicks sent and suppressed per queue, interrupts seen, qtest commands sent."""
        out = {f"queue{q.index}": {"notifications": q.notifications,
                                   "suppressed": q.suppressed} for q in self.queues.values()}
        if self.irq_line is not None:
            out["interrupts"] = self.qtest.irq_raise_count(self.irq_line)
        out["qtest_commands"] = self.qtest.commands_sent
        return out
