"""Every vhost-user request, and what travels with it, as one table.

Theory of operation
-------------------
A vhost-user connection carries *requests* from the front-end (QEMU) to
the back-end; some get a *reply* on the same socket. Whether a request
gets a reply, and what it carries, is fixed per request id, with three
kinds of exception, all in this table:

* REPLY_ACK: when the front-end sets need_reply (flags bit 3) on a request
  that has no reply of its own, the back-end answers with a u64 status,
  0 = success (vhost-user.rst "VHOST_USER_PROTOCOL_F_REPLY_ACK"). QEMU's
  process_message_reply() reads that reply whenever it set the flag, and
  libvhost-user and DPDK answer whenever the flag is set, so this kit
  does the same.
* SET_LOG_BASE gets a reply only when LOG_SHMFD was negotiated: a u64 0
  (libvhost-user, this kit) or an empty one (DPDK); QEMU accepts both.
* In postcopy (between POSTCOPY_LISTEN and POSTCOPY_END) SET_MEM_TABLE and
  ADD_MEM_REG are answered with the regions as the back-end mapped them.

File descriptors ride beside the bytes (SCM_RIGHTS). The table says how
many each request carries: none, one, one per memory region, or one
unless bit 8 (VRING_NOFD_MASK) of the u64 says "no fd".

The back-end may open a second channel (BACKEND_REQ) and send its own
requests on it; ``BackendRequest`` and ``BACKEND_REQUESTS`` describe those.

State lives here as data: the connection objects and the back-end's
dispatch read this table rather than repeating it in code.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from .constants import VRING_NOFD_MASK
from .payloads import (ConfigSpace, CryptoSession, InflightArea, IotlbMsg,
                       LogArea, MemoryTable, Payload, SharedObject,
                       SingleMemoryRegion, TransferDeviceState, U64, VringAddr,
                       VringArea, VringState)

__all__ = ["Request", "BackendRequest", "FdRule", "ReplyKind", "RequestSpec",
           "REQUESTS", "BACKEND_REQUESTS", "spec_of", "expected_fds"]


class Request(enum.IntEnum):
    """Front-end requests (vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Back-end requests on the BACKEND_REQ channel ("Back-end message types")."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class FdRule(enum.Enum):
    """How many fds a message carries in its ancillary data."""

    NONE = "none"
    ONE = "one"
    PER_REGION = "one per memory region"
    VRING = "one, or none when bit 8 (no fd) is set"
    ZERO_OR_ONE = "none or one"
    STATUS_FD = "one, or none when bit 8 (invalid fd) of the u64 status is set"
    INFLIGHT = "one, or none when mmap_size is 0 (no inflight buffer)"


class ReplyKind(enum.Enum):
    """When a request is answered, and with what."""

    ACK_ONLY = "u64 status only if need_reply is set"
    DATA = "always, with a payload of its own"
    STATUS = "always, a u64 status"
    STATUS_IF_LOG_SHMFD = "a u64 status when LOG_SHMFD is negotiated"
    DATA_IF_POSTCOPY = "the mapped regions while postcopy is listening"


PayloadType = type[Payload] | None


@dataclass(frozen=True)
class RequestSpec:
    """One row of the table: payload types (None = empty payload), fd
    rule, reply kind, reply payload types and reply fd rule, and one line
    saying what the request does."""

    payload: tuple[PayloadType, ...]
    fds: FdRule
    reply: ReplyKind
    reply_payload: tuple[PayloadType, ...]
    reply_fds: FdRule
    doc: str

    @property
    def has_data_reply(self) -> bool:
        """Whether the reply carries data rather than a u64 status."""
        return self.reply in (ReplyKind.DATA, ReplyKind.DATA_IF_POSTCOPY)


def _row(payload: PayloadType, doc: str, fds: FdRule = FdRule.NONE,
         reply: ReplyKind = ReplyKind.ACK_ONLY,
         reply_payload: tuple[PayloadType, ...] = (U64,),
         reply_fds: FdRule = FdRule.NONE) -> RequestSpec:
    return RequestSpec((payload,), fds, reply, reply_payload, reply_fds, doc)


R, K, D, S = Request, FdRule, ReplyKind.DATA, ReplyKind.STATUS
REQUESTS: dict[Request, RequestSpec] = {
    R.GET_FEATURES: _row(None, "read the back-end's virtio/vhost feature bits", reply=D),
    R.SET_FEATURES: _row(U64, "enable feature bits (VHOST_F_LOG_ALL starts dirty logging)"),
    R.SET_OWNER: _row(None, "claim the session: the first message of a connection"),
    R.RESET_OWNER: _row(None, "deprecated: disable all rings"),
    R.SET_MEM_TABLE: _row(MemoryTable, "map guest memory: regions with one fd each",
                          fds=K.PER_REGION, reply=ReplyKind.DATA_IF_POSTCOPY,
                          reply_payload=(U64, MemoryTable)),
    # The reply: libvhost-user sends a u64 0, DPDK an empty body ("QEMU doesn't
    # expect any payload in the reply"); QEMU reads either and checks only the id.
    R.SET_LOG_BASE: _row(LogArea, "hand over the dirty-page log (shared memory fd)",
                         fds=K.ONE, reply=ReplyKind.STATUS_IF_LOG_SHMFD,
                         reply_payload=(U64, None)),
    R.SET_LOG_FD: _row(None, "eventfd to signal after writing the log", fds=K.ONE),
    R.SET_VRING_NUM: _row(VringState, "set a vring's size (number of descriptors)"),
    R.SET_VRING_ADDR: _row(VringAddr, "set a vring's desc/avail/used addresses and log flag"),
    R.SET_VRING_BASE: _row(VringState, "set the next avail index to process (last_avail_idx)"),
    R.GET_VRING_BASE: _row(VringState, "stop a vring and return its last_avail_idx",
                           reply=D, reply_payload=(VringState,)),
    R.SET_VRING_KICK: _row(U64, "eventfd the front-end writes when buffers are added",
                           fds=K.VRING),
    R.SET_VRING_CALL: _row(U64, "eventfd the back-end writes when buffers are used",
                           fds=K.VRING),
    R.SET_VRING_ERR: _row(U64, "eventfd the back-end writes on a vring error", fds=K.VRING),
    R.GET_PROTOCOL_FEATURES: _row(None, "read the back-end's protocol feature bits", reply=D),
    R.SET_PROTOCOL_FEATURES: _row(U64, "enable protocol feature bits"),
    R.GET_QUEUE_NUM: _row(None, "read how many queues the back-end supports (MQ)", reply=D),
    R.SET_VRING_ENABLE: _row(VringState, "enable (num=1) or disable (num=0) a vring"),
    R.SEND_RARP: _row(U64, "broadcast a RARP for this MAC after migration"),
    R.NET_SET_MTU: _row(U64, "set the MTU the guest sees"),
    R.SET_BACKEND_REQ_FD: _row(None, "socket for back-end initiated requests", fds=K.ONE),
    R.IOTLB_MSG: _row(IotlbMsg, "update or invalidate a device IOTLB entry", reply=S),
    R.SET_VRING_ENDIAN: _row(VringState, "legacy: vring endianness (num 0 little, 1 big)"),
    R.GET_CONFIG: _row(ConfigSpace, "read device config space (empty reply = error)",
                       reply=D, reply_payload=(ConfigSpace, None)),
    R.SET_CONFIG: _row(ConfigSpace, "write device config space"),
    R.CREATE_CRYPTO_SESSION: _row(CryptoSession, "create a crypto session, reply its id",
                                  reply=D, reply_payload=(CryptoSession,)),
    R.CLOSE_CRYPTO_SESSION: _row(U64, "close a crypto session by id"),
    # Replies without their fd are the failure forms: no userfaultfd (QEMU:
    # "Failed to get ufd"), no inflight buffer (mmap_size 0, as libvhost-user).
    R.POSTCOPY_ADVISE: _row(None, "postcopy is coming: reply with a userfaultfd",
                            reply=D, reply_payload=(None,), reply_fds=K.ZERO_OR_ONE),
    R.POSTCOPY_LISTEN: _row(None, "postcopy has started: register memory with userfaultfd"),
    R.POSTCOPY_END: _row(None, "postcopy has finished: reply a u64 status", reply=S),
    R.GET_INFLIGHT_FD: _row(InflightArea, "get the inflight-I/O buffer (fd in the reply)",
                            reply=D, reply_payload=(InflightArea,), reply_fds=K.INFLIGHT),
    R.SET_INFLIGHT_FD: _row(InflightArea, "give back the inflight-I/O buffer", fds=K.ONE),
    R.GPU_SET_SOCKET: _row(None, "socket for the vhost-user-gpu protocol", fds=K.ONE),
    R.RESET_DEVICE: _row(None, "disable all rings and reset device state"),
    R.VRING_KICK: _row(VringState, "in-band kick (INBAND_NOTIFICATIONS); num is 0"),
    R.GET_MAX_MEM_SLOTS: _row(None, "read how many memory slots the back-end takes", reply=D),
    R.ADD_MEM_REG: _row(SingleMemoryRegion, "map one more guest memory region",
                        fds=K.ONE, reply=ReplyKind.DATA_IF_POSTCOPY,
                        reply_payload=(U64, SingleMemoryRegion)),
    R.REM_MEM_REG: _row(SingleMemoryRegion, "unmap one guest memory region",
                        fds=K.ZERO_OR_ONE),
    R.SET_STATUS: _row(U64, "set the virtio device status byte"),
    R.GET_STATUS: _row(None, "read the virtio device status byte", reply=D),
    # libvhost-user answers with the request's UUID, and the fd when it has one.
    R.GET_SHARED_OBJECT: _row(SharedObject, "look up a shared object's dma-buf fd by UUID",
                              reply=D, reply_payload=(SharedObject,),
                              reply_fds=K.ZERO_OR_ONE),
    # Reply u64: "Bits 0-7 are 0 on success ... Bit 8 is the invalid FD flag".
    R.SET_DEVICE_STATE_FD: _row(TransferDeviceState,
                                "channel for migrating the back-end's internal state",
                                fds=K.ONE, reply=D, reply_fds=K.STATUS_FD),
    R.CHECK_DEVICE_STATE: _row(None, "did the back-end take the migrated state? (0 = yes)",
                               reply=D),
}

B = BackendRequest
BACKEND_REQUESTS: dict[BackendRequest, RequestSpec] = {
    B.IOTLB_MSG: _row(IotlbMsg, "IOTLB miss or access failure"),
    B.CONFIG_CHANGE_MSG: _row(None, "device config space changed"),
    B.VRING_HOST_NOTIFIER_MSG: _row(VringArea, "map a host notifier area for a vring",
                                    fds=K.VRING),
    B.VRING_CALL: _row(VringState, "in-band call (INBAND_NOTIFICATIONS)"),
    B.VRING_ERR: _row(VringState, "in-band vring error (INBAND_NOTIFICATIONS)"),
    B.SHARED_OBJECT_ADD: _row(SharedObject, "register a shared object's UUID"),
    B.SHARED_OBJECT_REMOVE: _row(SharedObject, "unregister a shared object's UUID"),
    B.SHARED_OBJECT_LOOKUP: _row(SharedObject, "look up a shared object; fd in the reply",
                                 reply=S, reply_fds=K.ZERO_OR_ONE),
}
del R, K, D, S, B


def spec_of(request: Request | BackendRequest) -> RequestSpec:
    """The table row for ``request`` (front-end or back-end channel)."""
    if isinstance(request, BackendRequest):
        return BACKEND_REQUESTS[request]
    return REQUESTS[Request(request)]


def expected_fds(rule: FdRule, payload: Payload | None) -> tuple[int, int]:
    """(fewest, most) fds a message with ``payload`` may carry under ``rule``."""
    if rule is FdRule.NONE:
        return 0, 0
    if rule is FdRule.ONE:
        return 1, 1
    if rule is FdRule.ZERO_OR_ONE:
        return 0, 1
    if rule is FdRule.PER_REGION:
        n = payload.nregions if isinstance(payload, MemoryTable) else 0
        return n, n
    if rule is FdRule.INFLIGHT:
        empty = isinstance(payload, InflightArea) and payload.mmap_size == 0
        return (0, 0) if empty else (1, 1)
    # FdRule.VRING / STATUS_FD: "Bit 8 is the invalid FD flag. This flag is
    # set when there is no file descriptor in the ancillary data."
    word = payload.u64 if isinstance(payload, VringArea) else \
        payload.value if isinstance(payload, U64) else 0
    return (0, 0) if word & VRING_NOFD_MASK else (1, 1)
