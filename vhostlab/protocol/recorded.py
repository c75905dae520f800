"""QEMU 7.2's vhost-user conversation with a vhost-user-net back-end.

The requests and their order are the sequence observed with the set-up in
the project's notes (legacy virtio-net-pci, 256 MiB memfd RAM, no guest
OS, two queues: 0 = RX, 1 = TX): start-up, DRIVER_OK (vhost_dev_start),
QMP ``migrate`` (vhost_log_global_start) and the switch-over
(vhost_dev_stop). Observed values are the memory regions, the 8192-byte
log, SET_FEATURES gaining bit 26 and SET_VRING_ADDR gaining flag bit 0.

The other values are those of a minimal back-end that can migrate: it
offers VHOST_F_LOG_ALL and VHOST_USER_F_PROTOCOL_FEATURES, and the
protocol features LOG_SHMFD and REPLY_ACK. The host virtual address of
guest RAM (``RAM_HVA``), the ring addresses and the two last_avail_idx
values are examples. need_reply is set where QEMU's hw/virtio/vhost-user.c
sets it once REPLY_ACK is negotiated: SET_MEM_TABLE, and SET_FEATURES /
SET_VRING_ADDR when they turn logging on. QEMU repeats SET_VRING_ENABLE
during start-up; one per queue is shown.

Messages carry no fds here (a recording holds no open files);
``RecordedMessage.nfds`` says how many the real message carried.
"""
from __future__ import annotations

from typing import NamedTuple

from .features import Feature, ProtocolFeature
from .lines import TO_BACKEND, TO_FRONTEND
from .message import Message
from .payloads import LogArea, MemoryRegion, MemoryTable, VringAddr, VringState
from .requests import Request, expected_fds

__all__ = ["TO_BACKEND", "TO_FRONTEND", "RecordedMessage", "RAM_HVA",
           "OFFERED_FEATURES", "OFFERED_PROTOCOL_FEATURES",
           "QEMU_7_2_PHASES", "QEMU_7_2_SEQUENCE"]

RAM_HVA = 0x7F0000000000          # example: where QEMU mapped guest RAM
QUEUE_SIZE = 256                  # legacy virtio-net queue size
RING_GPA = (0x200000, 0x210000)   # example ring addresses, RX and TX
LAST_AVAIL_IDX = (7, 3)           # example GET_VRING_BASE answers

OFFERED_FEATURES = Feature.VHOST_F_LOG_ALL | Feature.VHOST_USER_F_PROTOCOL_FEATURES
OFFERED_PROTOCOL_FEATURES = ProtocolFeature.LOG_SHMFD | ProtocolFeature.REPLY_ACK
_ACKED = Feature.VHOST_USER_F_PROTOCOL_FEATURES


class RecordedMessage(NamedTuple):
    """(direction, message): one message of the recording."""

    direction: str
    message: Message

    @property
    def nfds(self) -> int:
        """How many fds the real message carried."""
        spec = self.message.spec
        rule = spec.reply_fds if self.message.is_reply else spec.fds
        return expected_fds(rule, self.message.payload)[0]


def _req(request: Request, payload=None, need_reply: bool = False) -> RecordedMessage:
    return RecordedMessage(TO_BACKEND, Message.make(request, payload,
                                                    need_reply=need_reply))


def _rep(request: Request, payload) -> RecordedMessage:
    return RecordedMessage(TO_FRONTEND, Message.make_reply(request, payload))


def _region(gpa: int, size: int) -> MemoryRegion:
    # One memfd backs all of RAM, so the offset in the fd is the GPA.
    return MemoryRegion(guest_phys_addr=gpa, memory_size=size,
                        userspace_addr=RAM_HVA + gpa, mmap_offset=gpa)


def _vring_addr(index: int, flags: int) -> VringAddr:
    # Legacy split-ring layout: desc table, avail ring, used ring on the
    # next 4 KiB boundary. desc/avail/used are QEMU virtual addresses,
    # log_guest_addr the used ring's guest-physical address.
    desc = RING_GPA[index]
    avail, used = desc + 16 * QUEUE_SIZE, desc + 0x2000
    return VringAddr(index=index, flags=flags, desc_user_addr=RAM_HVA + desc,
                     used_user_addr=RAM_HVA + used,
                     avail_user_addr=RAM_HVA + avail, log_guest_addr=used)


def _startup() -> tuple[RecordedMessage, ...]:
    per_queue = []
    for q in (0, 1):
        per_queue += [_req(Request.SET_VRING_CALL, q), _req(Request.SET_VRING_ERR, q)]
    return (
        _req(Request.GET_FEATURES), _rep(Request.GET_FEATURES, int(OFFERED_FEATURES)),
        _req(Request.GET_PROTOCOL_FEATURES),
        _rep(Request.GET_PROTOCOL_FEATURES, int(OFFERED_PROTOCOL_FEATURES)),
        _req(Request.SET_PROTOCOL_FEATURES, int(OFFERED_PROTOCOL_FEATURES)),
        _req(Request.SET_OWNER),
        _req(Request.GET_FEATURES), _rep(Request.GET_FEATURES, int(OFFERED_FEATURES)),
        *per_queue,
        _req(Request.SET_VRING_ENABLE, VringState(0, 1)),
        _req(Request.SET_VRING_ENABLE, VringState(1, 1)),
    )


def _driver_ok() -> tuple[RecordedMessage, ...]:
    table = MemoryTable((_region(0x0, 0xC0000), _region(0xE0000, 0x10000),
                         _region(0x100000, 0xFF00000)))
    out = [_req(Request.SET_FEATURES, int(_ACKED)),
           _req(Request.SET_MEM_TABLE, table, need_reply=True),
           _rep(Request.SET_MEM_TABLE, 0)]
    for q in (0, 1):
        out += [_req(Request.SET_VRING_NUM, VringState(q, QUEUE_SIZE)),
                _req(Request.SET_VRING_BASE, VringState(q, 0)),
                _req(Request.SET_VRING_ADDR, _vring_addr(q, 0)),
                _req(Request.SET_VRING_KICK, q),
                _req(Request.SET_VRING_CALL, q)]
    return tuple(out)


def _migrate() -> tuple[RecordedMessage, ...]:
    logging = int(_ACKED | Feature.VHOST_F_LOG_ALL)
    out = [_req(Request.SET_LOG_BASE, LogArea(mmap_size=8192, mmap_offset=0)),
           _rep(Request.SET_LOG_BASE, 0),
           _req(Request.SET_FEATURES, logging, need_reply=True),
           _rep(Request.SET_FEATURES, 0)]
    for q in (0, 1):
        out += [_req(Request.SET_VRING_ADDR, _vring_addr(q, 1), need_reply=True),
                _rep(Request.SET_VRING_ADDR, 0)]
    return tuple(out)


def _switch_over() -> tuple[RecordedMessage, ...]:
    out = []
    for q in (0, 1):
        out += [_req(Request.GET_VRING_BASE, VringState(q, 0)),
                _rep(Request.GET_VRING_BASE, VringState(q, LAST_AVAIL_IDX[q]))]
    return tuple(out)


QEMU_7_2_PHASES: tuple[tuple[str, tuple[RecordedMessage, ...]], ...] = (
    ("start-up", _startup()),
    ("DRIVER_OK: vhost_dev_start", _driver_ok()),
    ("migrate: vhost_log_global_start", _migrate()),
    ("switch-over: vhost_dev_stop", _switch_over()),
)

QEMU_7_2_SEQUENCE: tuple[RecordedMessage, ...] = tuple(
    entry for _, entries in QEMU_7_2_PHASES for entry in entries)
