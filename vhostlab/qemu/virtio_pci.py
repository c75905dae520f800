"""The legacy virtio-pci transport, driven over qtest: PCI config space and I/O registers.

What a guest's PCI code and virtio_pci_legacy.c do before and around the
rings, by port I/O over qtest (QEMU's vCPU sits halted; there is no guest
kernel):

1. find the device on PCI bus 0 (configuration mechanism #1), give BAR0 an
   I/O base, enable I/O decoding and bus mastering (the device's DMA into
   guest RAM needs bus mastering);
2. route the PCI interrupt to an IOAPIC input QEMU reports over qtest, so
   "used buffer" interrupts (vhost's *call*) wake a waiting driver;
3. the legacy registers (virtio 1.1 section 4.1.4.8 "Legacy Interfaces: A
   Note on PCI Device Layout"): device status, host and guest features, queue
   select / size / page frame number, QUEUE_NOTIFY (the *kick*), the ISR, and
   the device config in I/O space after them.

The device-specific driver (``qemu.guest``) builds on :class:`LegacyVirtioPci`.
"""
from __future__ import annotations

from ..ring.driver import GuestDriverError
from .qtest import QTest

__all__ = ["LegacyVirtioPci", "VIRTIO_CONFIG_S_ACKNOWLEDGE", "VIRTIO_CONFIG_S_DRIVER",
           "VIRTIO_CONFIG_S_DRIVER_OK", "VIRTIO_CONFIG_S_NEEDS_RESET", "VIRTIO_CONFIG_S_FAILED"]

# PCI configuration mechanism #1 and registers (QEMU include/hw/pci/pci_regs.h).
PCI_CONFIG_ADDRESS, PCI_CONFIG_DATA = 0xCF8, 0xCFC
PCI_VENDOR_ID, PCI_COMMAND, PCI_BASE_ADDRESS_0, PCI_INTERRUPT_LINE = 0x00, 0x04, 0x10, 0x3C
PCI_COMMAND_IO, PCI_COMMAND_MASTER, PCI_COMMAND_INTX_DISABLE = 0x1, 0x4, 0x400
PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1AF4
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


class LegacyVirtioPci:
    """One legacy virtio-pci device (``device_id``, e.g. 0x1000 for ``name``
    "virtio-net") reached over ``qtest``.

    ``io_base`` is the port BAR0 gets; ``irq_line`` the IOAPIC input its
    INTx is routed to (None: no interrupts, the driver polls). Nothing is
    done until :meth:`probe`.
    """

    def __init__(self, qtest: QTest, device_id: int, name: str, *, io_base: int = 0xC000,
                 irq_line: int | None = 11):
        if io_base & 0xFF or not 0x1000 <= io_base <= 0xFF00:
            raise ValueError(f"io_base={io_base:#x}: want a 256-byte aligned port "
                             "in 0x1000..0xff00")
        self.qtest = qtest
        self.device_id, self.device_name = device_id, name
        self.io_base = io_base
        self.irq_line = irq_line
        self.slot: int | None = None

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
        want = self.device_id << 16 | PCI_VENDOR_ID_REDHAT_QUMRANET
        for slot in range(32):
            if self.pci_read32(slot, PCI_VENDOR_ID) == want:
                return slot
        raise GuestDriverError(
            f"no legacy {self.device_name} device (1af4:{self.device_id:04x}) on PCI bus 0",
            hint=f"QEMU needs -device {self.device_name}-pci,disable-modern=on")

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

    def probe(self, interrupts: bool | None = None) -> int:
        """Find the device, give BAR0 its I/O base, route INTx; returns the PCI slot."""
        self.slot = self._find_device()
        self._program_bar0()
        if (self.irq_line is not None) if interrupts is None else interrupts:
            self._route_interrupt()
        return self.slot

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

    def read_host_features(self) -> int:
        """The device's feature bits 0-31 (the legacy interface has no more)."""
        return self.qtest.inl(self.io_base + VIRTIO_PCI_HOST_FEATURES)

    def write_guest_features(self, features: int) -> None:
        """Tell the device which features the driver accepts."""
        self.qtest.outl(self.io_base + VIRTIO_PCI_GUEST_FEATURES, features)

    def queue_size(self, queue: int) -> int:
        """Select ``queue`` and read its size (VIRTIO_PCI_QUEUE_NUM)."""
        self.qtest.outw(self.io_base + VIRTIO_PCI_QUEUE_SEL, queue)
        return self.qtest.inw(self.io_base + VIRTIO_PCI_QUEUE_NUM)

    def queue_pfn(self, queue: int) -> int:
        """Select ``queue`` and read back its ring's page frame number."""
        self.qtest.outw(self.io_base + VIRTIO_PCI_QUEUE_SEL, queue)
        return self.qtest.inl(self.io_base + VIRTIO_PCI_QUEUE_PFN)

    def set_queue_ring(self, queue: int, gpa: int) -> None:
        """Give ``queue`` its ring at ``gpa`` (4 KiB aligned): write the page frame
        number and read it back."""
        pfn = gpa >> VIRTIO_PCI_QUEUE_ADDR_SHIFT
        self.qtest.outw(self.io_base + VIRTIO_PCI_QUEUE_SEL, queue)
        self.qtest.outl(self.io_base + VIRTIO_PCI_QUEUE_PFN, pfn)
        got = self.queue_pfn(queue)
        if got != pfn:
            raise GuestDriverError(f"queue {queue}: wrote PFN {pfn:#x}, read back {got:#x}")

    def check_queue_ring(self, queue: int, gpa: int, what: str) -> None:
        """Raise GuestDriverError unless ``queue``'s ring is at ``gpa``."""
        pfn = self.queue_pfn(queue)
        if pfn != gpa >> VIRTIO_PCI_QUEUE_ADDR_SHIFT:
            raise GuestDriverError(f"{what}: queue {queue} PFN {pfn:#x} is not "
                                   f"the exported ring at {gpa:#x}")

    def queue_notify(self, queue: int) -> None:
        """The kick: write the queue's number to QUEUE_NOTIFY."""
        self.qtest.outw(self.io_base + VIRTIO_PCI_QUEUE_NOTIFY, queue)

    def config_read(self, offset: int, width: int = 1) -> int:
        """Read ``width`` bytes (1, 2 or 4) of the device config (in I/O space, no MSI-X)."""
        port = self.io_base + VIRTIO_PCI_CONFIG_OFF + offset
        return {1: self.qtest.inb, 2: self.qtest.inw, 4: self.qtest.inl}[width](port)
