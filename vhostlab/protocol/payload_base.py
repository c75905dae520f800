"""The Payload base and the checks every payload's fields go through.

A payload maps a struct format one to one onto dataclass fields (``_FORMAT``);
constructing one only checks that each field fits its wire type, so a lab can
build a bad message on purpose; ``unpack`` is the edge and also runs
``validate()``. The helpers below raise ProtocolError naming the field, the
value and the limit. The payloads of each message are in payloads.py.
"""
from __future__ import annotations

import struct
from dataclasses import fields as dc_fields
from typing import Any, ClassVar

from .constants import MAX_AREA_SIZE
from .errors import ProtocolError

__all__ = ["Payload", "U64_END"]

U64_END = 2 ** 64

_BITS = {"B": (8, False), "H": (16, False), "I": (32, False),
         "Q": (64, False), "q": (64, True)}


def _check_int(owner: str, name: str, value: Any, bits: int,
               signed: bool = False) -> int:
    """Return ``value`` as a plain int, or raise if it does not fit."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{owner}.{name} must be an int, got "
                            f"{type(value).__name__}", field=name, value=value)
    low, high = (-(1 << bits - 1), (1 << bits - 1) - 1) if signed \
        else (0, (1 << bits) - 1)
    if not low <= value <= high:
        kind = f"{'s' if signed else 'u'}{bits}"
        raise ProtocolError(f"expected a {kind} ({low}..{high}), got {value}",
                            field=name, value=value, limit=high)
    return int(value)


def _check_bytes(owner: str, name: str, value: Any) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{owner}.{name} must be bytes, got "
                            f"{type(value).__name__}",
                            field=name, value=type(value).__name__)
    return bytes(value)


def _end_check(base_name: str, base: int, size_name: str, size: int) -> None:
    """Raise unless ``base + size`` stays within the 64-bit space."""
    if base + size > U64_END:
        raise ProtocolError(
            f"{base_name} + {size_name} = 0x{base + size:x} runs past 2**64 "
            "(the range would wrap around)",
            field=base_name, value=base, limit=U64_END - size)


def _area_check(what: str, base_name: str, base: int, size_name: str, size: int) -> None:
    """Bounds of an fd-backed area the other side will mmap: not larger than
    MAX_AREA_SIZE, and ``base + size`` not wrapping (DPDK CVE-2020-10722)."""
    if size > MAX_AREA_SIZE:
        raise ProtocolError(f"{what} of {size} bytes is more than the {MAX_AREA_SIZE} "
                            "this side maps", field=size_name, value=size, limit=MAX_AREA_SIZE)
    _end_check(base_name, base, size_name, size)


def _size_error(cls: type, n: int, expected: Any) -> ProtocolError:
    return ProtocolError(f"a {cls.__name__} payload is {expected} bytes, got {n}",
                         field="size", value=n, limit=expected)


class Payload:
    """Base of all payloads: fixed-size ones declare a struct ``_FORMAT``
    whose items map one to one onto the dataclass fields."""

    _FORMAT: ClassVar[struct.Struct | None] = None

    def __post_init__(self) -> None:
        fmt = self._FORMAT
        if fmt is None:
            return
        codes = [c for c in fmt.format if c in _BITS]
        for f, code in zip(dc_fields(self), codes):
            bits, signed = _BITS[code]
            value = _check_int(type(self).__name__, f.name,
                               getattr(self, f.name), bits, signed)
            object.__setattr__(self, f.name, value)

    @classmethod
    def accepts_size(cls, n: int) -> bool:
        """Whether a payload of ``n`` bytes could be this type."""
        return cls._FORMAT is not None and n == cls._FORMAT.size

    @classmethod
    def size_text(cls) -> str:
        """The wire size rule, for error messages (e.g. ``"8"``)."""
        return str(cls._FORMAT.size) if cls._FORMAT is not None else "?"

    def pack(self) -> bytes:
        """The payload's wire bytes."""
        assert self._FORMAT is not None
        return self._FORMAT.pack(*(getattr(self, f.name) for f in dc_fields(self)))

    @classmethod
    def unpack(cls, data: bytes):
        """Parse and validate wire bytes. Raises ProtocolError."""
        fmt = cls._FORMAT
        assert fmt is not None
        if len(data) != fmt.size:
            raise _size_error(cls, len(data), fmt.size)
        obj = cls(*fmt.unpack(data))
        obj.validate()
        return obj

    def validate(self) -> None:
        """Semantic checks beyond field widths. Raises ProtocolError."""

    def fields(self) -> dict[str, Any]:
        """Decoded fields as plain ints, strings and lists."""
        out: dict[str, Any] = {}
        for f in dc_fields(self):
            value = getattr(self, f.name)
            if f.name == "padding" and not value:
                continue
            out[f.name] = value.hex() if isinstance(value, bytes) else value
        return out
