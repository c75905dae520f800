"""One well-formed request and reply for every vhost-user request id.

Each sample is (payload, number of fds). Values are what a front-end
such as QEMU would plausibly send; tests use them for round trips and
as seeds for mutation.
"""
from __future__ import annotations

import os
import struct

from vhostlab.protocol import (ConfigSpace, CryptoSession, InflightArea,
                               IotlbMsg, LogArea, MemoryRegion, MemoryTable,
                               Request, SharedObject, SingleMemoryRegion,
                               TransferDeviceState, U64, VringAddr, VringState,
                               VHOST_IOTLB_UPDATE)

R = Request
HVA = 0x7F0000000000

REGION_LOW = MemoryRegion(0x0, 0xC0000, HVA, 0x0)
REGION_HIGH = MemoryRegion(0x100000, 0xFF00000, HVA + 0x100000, 0x100000)
TABLE = MemoryTable((REGION_LOW, REGION_HIGH))
ADDR = VringAddr(index=0, flags=0, desc_user_addr=HVA + 0x200000,
                 used_user_addr=HVA + 0x202000, avail_user_addr=HVA + 0x201000,
                 log_guest_addr=0x202000)
MAC = int.from_bytes(bytes.fromhex("525400123456"), "little")
# QEMU 7.1+ VhostUserCryptoSession: u64 op_code, 1056-byte union, s64 id.
CRYPTO = CryptoSession(op_code=2, body=bytes(1056), session_id=-1)

SAMPLE_REQUESTS: dict[Request, tuple[object, int]] = {
    R.GET_FEATURES: (None, 0),
    R.SET_FEATURES: (U64(0x1_4000_0000 | 1 << 26), 0),
    R.SET_OWNER: (None, 0),
    R.RESET_OWNER: (None, 0),
    R.SET_MEM_TABLE: (TABLE, 2),
    R.SET_LOG_BASE: (LogArea(8192, 0), 1),
    R.SET_LOG_FD: (None, 1),
    R.SET_VRING_NUM: (VringState(0, 256), 0),
    R.SET_VRING_ADDR: (ADDR, 0),
    R.SET_VRING_BASE: (VringState(1, 0), 0),
    R.GET_VRING_BASE: (VringState(1, 0), 0),
    R.SET_VRING_KICK: (U64(1), 1),
    R.SET_VRING_CALL: (U64(0x100), 0),
    R.SET_VRING_ERR: (U64(0), 1),
    R.GET_PROTOCOL_FEATURES: (None, 0),
    R.SET_PROTOCOL_FEATURES: (U64(0b1010), 0),
    R.GET_QUEUE_NUM: (None, 0),
    R.SET_VRING_ENABLE: (VringState(0, 1), 0),
    R.SEND_RARP: (U64(MAC), 0),
    R.NET_SET_MTU: (U64(1500), 0),
    R.SET_BACKEND_REQ_FD: (None, 1),
    R.IOTLB_MSG: (IotlbMsg(0x1000, 0x1000, HVA, 3, VHOST_IOTLB_UPDATE), 0),
    R.SET_VRING_ENDIAN: (VringState(0, 0), 0),
    R.GET_CONFIG: (ConfigSpace(0, 6, 0, bytes(6)), 0),
    R.SET_CONFIG: (ConfigSpace(0, 6, 1, MAC.to_bytes(6, "little")), 0),
    R.CREATE_CRYPTO_SESSION: (CRYPTO, 0),
    R.CLOSE_CRYPTO_SESSION: (U64(5), 0),
    R.POSTCOPY_ADVISE: (None, 0),
    R.POSTCOPY_LISTEN: (None, 0),
    R.POSTCOPY_END: (None, 0),
    R.GET_INFLIGHT_FD: (InflightArea(0, 0, 2, 256), 0),
    R.SET_INFLIGHT_FD: (InflightArea(0x4000, 0, 2, 256), 1),
    R.GPU_SET_SOCKET: (None, 1),
    R.RESET_DEVICE: (None, 0),
    R.VRING_KICK: (VringState(0, 0), 0),
    R.GET_MAX_MEM_SLOTS: (None, 0),
    R.ADD_MEM_REG: (SingleMemoryRegion(REGION_HIGH), 1),
    R.REM_MEM_REG: (SingleMemoryRegion(REGION_HIGH), 0),
    R.SET_STATUS: (U64(0xF), 0),
    R.GET_STATUS: (None, 0),
    R.GET_SHARED_OBJECT: (SharedObject(bytes(range(16))), 0),
    R.SET_DEVICE_STATE_FD: (TransferDeviceState(0, 0), 1),
    R.CHECK_DEVICE_STATE: (None, 0),
}

# Replies with data of their own; every other request's reply is a u64 status.
SAMPLE_DATA_REPLIES: dict[Request, tuple[object, int]] = {
    R.GET_FEATURES: (U64(1 << 26 | 1 << 30), 0),
    R.GET_PROTOCOL_FEATURES: (U64(0b1010), 0),
    R.GET_VRING_BASE: (VringState(1, 3), 0),
    R.GET_QUEUE_NUM: (U64(2), 0),
    R.GET_CONFIG: (ConfigSpace(0, 6, 0, MAC.to_bytes(6, "little")), 0),
    R.CREATE_CRYPTO_SESSION: (CryptoSession(2, bytes(1056), 7), 0),
    R.POSTCOPY_ADVISE: (None, 1),
    R.GET_INFLIGHT_FD: (InflightArea(0x4000, 0, 2, 256), 1),
    R.GET_MAX_MEM_SLOTS: (U64(509), 0),
    R.GET_STATUS: (U64(0xF), 0),
    R.GET_SHARED_OBJECT: (SharedObject(bytes(range(16))), 1),
    R.SET_DEVICE_STATE_FD: (U64(0x100), 0),          # success, no fd of its own
    R.CHECK_DEVICE_STATE: (U64(0), 0),
}


def sample_reply(request: Request) -> tuple[object, int]:
    """The sample reply payload and fd count for ``request``."""
    return SAMPLE_DATA_REPLIES.get(request, (U64(0), 0))


def header(request: int, flags: int, size: int) -> bytes:
    return struct.pack("<III", request, flags, size)


def make_fds(n: int, opened: list[int]) -> tuple[int, ...]:
    """``n`` real eventfds, recorded in ``opened`` for the caller to close."""
    fds = tuple(os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n))
    opened.extend(fds)
    return fds
