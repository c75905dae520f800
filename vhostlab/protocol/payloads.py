"""Typed payloads of vhost-user messages (vhost-user.rst "Payload").

Every payload is a frozen dataclass with ``pack() -> bytes``, a classmethod
``unpack(data)`` and ``fields() -> dict`` (plain ints, strings and lists,
for message traces). Constructing a payload checks only that each field
fits its wire type, so a lab can build a *bad* message on purpose;
``unpack`` is the edge and also runs ``validate()``, the semantic checks
(sizes, overflow past 2**64, limits). Both raise ProtocolError.

Layouts are little endian and match QEMU's C structs byte for byte,
including their padding (kept, so ``pack(unpack(b)) == b``). The Payload base
and the field checks are in payload_base.py.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from .constants import (MAX_PAYLOAD_SIZE, VHOST_MEMORY_BASELINE_NREGIONS,
                        VHOST_USER_MAX_CONFIG_SIZE, VHOST_VRING_F_LOG,
                        VRING_IDX_MASK, VRING_NOFD_MASK)
from .errors import ProtocolError
from .payload_base import (Payload, _area_check, _check_bytes, _check_int, _end_check,
                           _size_error)

__all__ = [
    "Payload", "U64", "VringState", "VringAddr", "MemoryRegion",
    "MemoryTable", "SingleMemoryRegion", "LogArea", "IotlbMsg",
    "ConfigSpace", "CryptoSession", "InflightArea", "VringArea",
    "SharedObject", "TransferDeviceState", "VHOST_IOTLB_MISS", "VHOST_IOTLB_UPDATE",
    "VHOST_IOTLB_INVALIDATE", "VHOST_IOTLB_ACCESS_FAIL",
]

# struct vhost_iotlb_msg "type" and "perm" (<linux/vhost_types.h>)
VHOST_IOTLB_MISS = 1
VHOST_IOTLB_UPDATE = 2
VHOST_IOTLB_INVALIDATE = 3
VHOST_IOTLB_ACCESS_FAIL = 4
VHOST_ACCESS_RW = 3


@dataclass(frozen=True)
class U64(Payload):
    """A single u64: feature masks, statuses, a vring index + flag, an MTU."""

    value: int
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("<Q")

    @property
    def vring_index(self) -> int:
        """SET_VRING_KICK/CALL/ERR: bits 0-7, the vring index."""
        return self.value & VRING_IDX_MASK

    @property
    def vring_nofd(self) -> bool:
        """SET_VRING_KICK/CALL/ERR: bit 8, no fd attached (poll instead)."""
        return bool(self.value & VRING_NOFD_MASK)


@dataclass(frozen=True)
class VringState(Payload):
    """struct vhost_vring_state: a vring index and a number (size, base, enable)."""

    index: int
    num: int
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("<II")


@dataclass(frozen=True)
class VringAddr(Payload):
    """struct vhost_vring_addr. desc/used/avail are front-end virtual
    addresses; log_guest_addr is the used ring's guest-physical address."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")

    @property
    def log_enabled(self) -> bool:
        """VHOST_VRING_F_LOG: log used-ring writes at log_guest_addr."""
        return bool(self.flags & VHOST_VRING_F_LOG)

    def validate(self) -> None:
        if self.flags & ~VHOST_VRING_F_LOG:
            raise ProtocolError(f"flag bits 0x{self.flags & ~VHOST_VRING_F_LOG:x} "
                                "are undefined; only VHOST_VRING_F_LOG (0x1) "
                                "exists",
                                field="flags", value=self.flags,
                                limit=VHOST_VRING_F_LOG)


@dataclass(frozen=True)
class MemoryRegion(Payload):
    """VhostUserMemoryRegion: guest memory [guest_phys_addr, +memory_size)
    is mapped by the front-end at userspace_addr and found at mmap_offset
    in the region's fd."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("<QQQQ")

    def validate(self) -> None:
        if self.memory_size == 0:
            raise ProtocolError("memory_size is 0; a region must hold at least "
                                "one byte", field="memory_size",
                                value=0, limit=">= 1")
        for base in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
            _end_check(base, getattr(self, base), "memory_size", self.memory_size)


_REGION_SIZE = MemoryRegion._FORMAT.size
_TABLE_HEAD = struct.Struct("<II")


@dataclass(frozen=True)
class MemoryTable(Payload):
    """VhostUserMemory: u32 nregions, u32 padding, then nregions regions.
    QEMU sends only the regions in use (size 8 + 32 * nregions)."""

    regions: tuple[MemoryRegion, ...]
    padding: int = 0

    def __post_init__(self) -> None:
        regions = tuple(self.regions)
        for r in regions:
            if not isinstance(r, MemoryRegion):
                raise ProtocolError("MemoryTable.regions must hold MemoryRegion "
                                    f"objects, got a {type(r).__name__}",
                                    field="regions", value=type(r).__name__)
        object.__setattr__(self, "regions", regions)
        object.__setattr__(self, "padding", _check_int(
            "MemoryTable", "padding", self.padding, 32))
        _check_int("MemoryTable", "nregions", len(regions), 32)

    @property
    def nregions(self) -> int:
        return len(self.regions)

    @classmethod
    def accepts_size(cls, n: int) -> bool:
        return n >= _TABLE_HEAD.size and (n - _TABLE_HEAD.size) % _REGION_SIZE == 0

    @classmethod
    def size_text(cls) -> str:
        return f"{_TABLE_HEAD.size} + {_REGION_SIZE} * nregions"

    def pack(self) -> bytes:
        head = _TABLE_HEAD.pack(len(self.regions), self.padding)
        return head + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> "MemoryTable":
        if len(data) < _TABLE_HEAD.size:
            raise _size_error(cls, len(data), f">= {_TABLE_HEAD.size}")
        nregions, padding = _TABLE_HEAD.unpack_from(data)
        # QEMU: VHOST_MEMORY_BASELINE_NREGIONS regions at most (one fd each).
        if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
            raise ProtocolError(f"{nregions} regions; SET_MEM_TABLE carries at "
                                f"most {VHOST_MEMORY_BASELINE_NREGIONS}",
                                field="nregions", value=nregions,
                                limit=VHOST_MEMORY_BASELINE_NREGIONS)
        expected = _TABLE_HEAD.size + nregions * _REGION_SIZE
        if len(data) != expected:
            raise ProtocolError(f"{nregions} regions take {expected} payload "
                                f"bytes, got {len(data)}",
                                field="size", value=len(data), limit=expected)
        regions = tuple(
            MemoryRegion.unpack(data[off:off + _REGION_SIZE])
            for off in range(_TABLE_HEAD.size, expected, _REGION_SIZE))
        table = cls(regions, padding)
        table.validate()
        return table

    def validate(self) -> None:
        if self.nregions > VHOST_MEMORY_BASELINE_NREGIONS:
            raise ProtocolError(f"{self.nregions} regions; SET_MEM_TABLE carries "
                                f"at most {VHOST_MEMORY_BASELINE_NREGIONS}",
                                field="nregions", value=self.nregions,
                                limit=VHOST_MEMORY_BASELINE_NREGIONS)
        spans = []
        for r in self.regions:
            r.validate()
            spans.append((r.guest_phys_addr, r.guest_phys_addr + r.memory_size))
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            if start < end:
                raise ProtocolError(f"a region starting at 0x{start:x} overlaps "
                                    f"the one before it, which ends at 0x{end:x}",
                                    field="guest_phys_addr", value=start,
                                    limit=end)

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"nregions": self.nregions,
                               "regions": [r.fields() for r in self.regions]}
        if self.padding:
            out["padding"] = self.padding
        return out


_SINGLE_HEAD = struct.Struct("<Q")


@dataclass(frozen=True)
class SingleMemoryRegion(Payload):
    """VhostUserMemRegMsg: u64 padding then one region (ADD/REM_MEM_REG)."""

    region: MemoryRegion
    padding: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.region, MemoryRegion):
            raise ProtocolError("SingleMemoryRegion.region must be a MemoryRegion, "
                                f"got a {type(self.region).__name__}",
                                field="region", value=type(self.region).__name__)
        object.__setattr__(self, "padding", _check_int(
            "SingleMemoryRegion", "padding", self.padding, 64))

    @classmethod
    def accepts_size(cls, n: int) -> bool:
        return n == _SINGLE_HEAD.size + _REGION_SIZE

    @classmethod
    def size_text(cls) -> str:
        return str(_SINGLE_HEAD.size + _REGION_SIZE)

    def pack(self) -> bytes:
        return _SINGLE_HEAD.pack(self.padding) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> "SingleMemoryRegion":
        if not cls.accepts_size(len(data)):
            raise _size_error(cls, len(data), _SINGLE_HEAD.size + _REGION_SIZE)
        (padding,) = _SINGLE_HEAD.unpack_from(data)
        return cls(MemoryRegion.unpack(data[_SINGLE_HEAD.size:]), padding)

    def validate(self) -> None:
        self.region.validate()

    def fields(self) -> dict[str, Any]:
        out = dict(self.region.fields())
        if self.padding:
            out["padding"] = self.padding
        return out


@dataclass(frozen=True)
class LogArea(Payload):
    """VhostUserLog: the dirty log is mmap_size bytes at mmap_offset in the
    fd sent with SET_LOG_BASE. One bit per VHOST_LOG_PAGE of guest memory."""

    mmap_size: int
    mmap_offset: int
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("<QQ")

    def validate(self) -> None:
        if self.mmap_size == 0:
            raise ProtocolError("mmap_size is 0; the dirty log must be at "
                                "least one byte", field="mmap_size",
                                value=0, limit=">= 1")
        # DPDK CVE-2020-10722: offset + size wrapped around and passed the check.
        _area_check("a dirty log", "mmap_offset", self.mmap_offset, "mmap_size", self.mmap_size)


@dataclass(frozen=True)
class IotlbMsg(Payload):
    """struct vhost_iotlb_msg: u64 iova, size, uaddr; u8 perm, type; 6 bytes
    of C padding (32 bytes in all)."""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int
    padding: int = 0
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("<QQQBB")
    _TAIL: ClassVar[int] = 6

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "padding", _check_int(
            "IotlbMsg", "padding", self.padding, 8 * self._TAIL))

    @classmethod
    def accepts_size(cls, n: int) -> bool:
        return n == cls._FORMAT.size + cls._TAIL

    @classmethod
    def size_text(cls) -> str:
        return str(cls._FORMAT.size + cls._TAIL)

    def pack(self) -> bytes:
        head = self._FORMAT.pack(self.iova, self.size, self.uaddr,
                                 self.perm, self.type)
        return head + self.padding.to_bytes(self._TAIL, "little")

    @classmethod
    def unpack(cls, data: bytes) -> "IotlbMsg":
        if not cls.accepts_size(len(data)):
            raise _size_error(cls, len(data), cls._FORMAT.size + cls._TAIL)
        head = cls._FORMAT.unpack_from(data)
        pad = int.from_bytes(data[cls._FORMAT.size:], "little")
        msg = cls(*head, padding=pad)
        msg.validate()
        return msg

    def validate(self) -> None:
        if not VHOST_IOTLB_MISS <= self.type <= VHOST_IOTLB_ACCESS_FAIL:
            raise ProtocolError(f"IOTLB type {self.type} is undefined; expected "
                                "1 (miss) to 4 (access fail)", field="type",
                                value=self.type, limit=VHOST_IOTLB_ACCESS_FAIL)
        if self.perm > VHOST_ACCESS_RW:
            raise ProtocolError(f"IOTLB perm {self.perm} is undefined; expected "
                                "0 (none) to 3 (read/write)", field="perm",
                                value=self.perm, limit=VHOST_ACCESS_RW)
        _end_check("iova", self.iova, "size", self.size)
        _end_check("uaddr", self.uaddr, "size", self.size)


_CONFIG_HEAD = struct.Struct("<III")


@dataclass(frozen=True)
class ConfigSpace(Payload):
    """VhostUserConfig: u32 offset, size, flags, then ``size`` bytes of the
    device's config space (at most VHOST_USER_MAX_CONFIG_SIZE)."""

    offset: int
    size: int
    flags: int
    payload: bytes = b""

    def __post_init__(self) -> None:
        for name in ("offset", "size", "flags"):
            object.__setattr__(self, name, _check_int(
                "ConfigSpace", name, getattr(self, name), 32))
        object.__setattr__(self, "payload", _check_bytes(
            "ConfigSpace", "payload", self.payload))

    @classmethod
    def accepts_size(cls, n: int) -> bool:
        return _CONFIG_HEAD.size <= n <= _CONFIG_HEAD.size + VHOST_USER_MAX_CONFIG_SIZE

    @classmethod
    def size_text(cls) -> str:
        return f"{_CONFIG_HEAD.size} + size (size <= {VHOST_USER_MAX_CONFIG_SIZE})"

    def pack(self) -> bytes:
        return _CONFIG_HEAD.pack(self.offset, self.size, self.flags) + self.payload

    @classmethod
    def unpack(cls, data: bytes) -> "ConfigSpace":
        if len(data) < _CONFIG_HEAD.size:
            raise _size_error(cls, len(data), f">= {_CONFIG_HEAD.size}")
        offset, size, flags = _CONFIG_HEAD.unpack_from(data)
        config = cls(offset, size, flags, data[_CONFIG_HEAD.size:])
        config.validate()
        return config

    def validate(self) -> None:
        if self.size > VHOST_USER_MAX_CONFIG_SIZE:
            raise ProtocolError(f"a config access of {self.size} bytes; the config "
                                f"space is at most {VHOST_USER_MAX_CONFIG_SIZE}",
                                field="size",
                                value=self.size, limit=VHOST_USER_MAX_CONFIG_SIZE)
        if self.size != len(self.payload):
            raise ProtocolError(f"size says {self.size} config bytes but "
                                f"{len(self.payload)} came with it",
                                field="size", value=self.size,
                                limit=len(self.payload))
        if self.offset + self.size > VHOST_USER_MAX_CONFIG_SIZE:
            raise ProtocolError(f"offset {self.offset} + size {self.size} runs past "
                                f"the {VHOST_USER_MAX_CONFIG_SIZE}-byte config "
                                "space",
                                field="offset", value=self.offset,
                                limit=VHOST_USER_MAX_CONFIG_SIZE - self.size)


_CRYPTO_HEAD = struct.Struct("<Q")
_CRYPTO_TAIL = struct.Struct("<q")


@dataclass(frozen=True)
class CryptoSession(Payload):
    """VhostUserCryptoSession: u64 op_code, the session set-up union (kept as
    raw bytes: its size differs between QEMU versions), s64 session_id."""

    op_code: int
    body: bytes
    session_id: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "op_code", _check_int(
            "CryptoSession", "op_code", self.op_code, 64))
        object.__setattr__(self, "body", _check_bytes(
            "CryptoSession", "body", self.body))
        object.__setattr__(self, "session_id", _check_int(
            "CryptoSession", "session_id", self.session_id, 64, signed=True))

    @classmethod
    def accepts_size(cls, n: int) -> bool:
        return _CRYPTO_HEAD.size + _CRYPTO_TAIL.size <= n <= MAX_PAYLOAD_SIZE

    @classmethod
    def size_text(cls) -> str:
        return f"{_CRYPTO_HEAD.size + _CRYPTO_TAIL.size}..{MAX_PAYLOAD_SIZE}"

    def pack(self) -> bytes:
        return (_CRYPTO_HEAD.pack(self.op_code) + self.body
                + _CRYPTO_TAIL.pack(self.session_id))

    @classmethod
    def unpack(cls, data: bytes) -> "CryptoSession":
        if not cls.accepts_size(len(data)):
            raise _size_error(cls, len(data),
                              f"{_CRYPTO_HEAD.size + _CRYPTO_TAIL.size}..{MAX_PAYLOAD_SIZE}")
        (op_code,) = _CRYPTO_HEAD.unpack_from(data)
        (session_id,) = _CRYPTO_TAIL.unpack_from(data, len(data) - _CRYPTO_TAIL.size)
        return cls(op_code, data[_CRYPTO_HEAD.size:len(data) - _CRYPTO_TAIL.size],
                   session_id)

    def fields(self) -> dict[str, Any]:
        return {"op_code": self.op_code, "body_size": len(self.body),
                "session_id": self.session_id}


@dataclass(frozen=True)
class InflightArea(Payload):
    """VhostUserInflight: u64 mmap_size, mmap_offset; u16 num_queues,
    queue_size; 4 bytes of C padding (24 bytes in all)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int
    padding: int = 0
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("<QQHHI")

    def validate(self) -> None:
        _area_check("an inflight area", "mmap_offset", self.mmap_offset, "mmap_size",
                    self.mmap_size)


@dataclass(frozen=True)
class VringArea(Payload):
    """VhostUserVringArea (back-end VRING_HOST_NOTIFIER_MSG): u64 holds the
    vring index and the no-fd bit; size and offset locate the area in the fd."""

    u64: int
    size: int
    offset: int
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("<QQQ")

    def validate(self) -> None:
        if self.u64 & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            extra = self.u64 & ~(VRING_IDX_MASK | VRING_NOFD_MASK)
            raise ProtocolError(f"bits 0x{extra:x} are set; only bits 0-7 (the "
                                "vring index) and bit 8 (no fd) are defined",
                                field="u64", value=self.u64,
                                limit=VRING_IDX_MASK | VRING_NOFD_MASK)
        _area_check("a host notifier area", "offset", self.offset, "size", self.size)


@dataclass(frozen=True)
class SharedObject(Payload):
    """VhostUserShared: the 16-byte UUID of a virtio shared object."""

    uuid: bytes

    def __post_init__(self) -> None:
        uuid = _check_bytes("SharedObject", "uuid", self.uuid)
        if len(uuid) != 16:
            raise ProtocolError(f"a UUID is 16 bytes, got {len(uuid)}", field="uuid",
                                value=len(uuid), limit=16)
        object.__setattr__(self, "uuid", uuid)

    @classmethod
    def accepts_size(cls, n: int) -> bool:
        return n == 16

    @classmethod
    def size_text(cls) -> str:
        return "16"

    def pack(self) -> bytes:
        return self.uuid

    @classmethod
    def unpack(cls, data: bytes) -> "SharedObject":
        if len(data) != 16:
            raise _size_error(cls, len(data), 16)
        return cls(bytes(data))


@dataclass(frozen=True)
class TransferDeviceState(Payload):
    """VhostUserTransferDeviceState (SET_DEVICE_STATE_FD): u32 direction
    (0 save, 1 load) and u32 phase (0 stopped, the only one defined)."""

    direction: int
    phase: int
    _FORMAT: ClassVar[struct.Struct] = struct.Struct("<II")
