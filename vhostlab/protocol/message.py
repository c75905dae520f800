"""One vhost-user message: header, typed payload, fds; and its parser.

Wire layout (vhost-user.rst "Message Specification")::

    u32 request | u32 flags | u32 size | size bytes of payload

``parse_message`` turns exactly one complete message into a ``Message``
and raises ProtocolError, and nothing else, for anything malformed.
It never closes, dups or reads the fds it is given: the caller owns them,
also when parsing fails.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

from .constants import (FLAG_NEED_REPLY, FLAG_REPLY, HEADER_SIZE,
                        KNOWN_FLAGS, MAX_PAYLOAD_SIZE, REPLY_FLAGS,
                        VERSION_MASK, VHOST_USER_MAX_FDS, VHOST_USER_VERSION,
                        VRING_IDX_MASK, VRING_NOFD_MASK)
from .errors import ProtocolError
from .features import Feature, ProtocolFeature, feature_names
from .payloads import U64, Payload, VringAddr
from .requests import (BACKEND_REQUESTS, REQUESTS, BackendRequest, FdRule,
                       Request, RequestSpec, ReplyKind, expected_fds, spec_of)

__all__ = ["Header", "Message", "peek_header", "parse_message",
           "parse_backend_message"]

_HEADER = struct.Struct("<III")
AnyRequest = Request | BackendRequest


class Header(NamedTuple):
    """The three header fields, as read by ``peek_header``."""

    request: int
    flags: int
    size: int


def peek_header(data: bytes) -> Header:
    """Read and check the 12-byte header at the start of ``data``.

    For framing: once this returns, the message is ``HEADER_SIZE + size``
    bytes long. Checks the version bits, unknown flag bits, reply flags
    (exactly 0x5) and that size is at most MAX_PAYLOAD_SIZE. The request
    id is not checked here (it depends on the channel).
    Raises ProtocolError.
    """
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"a header is {HEADER_SIZE} bytes but only "
                            f"{len(data)} arrived", field="header",
                            value=len(data), limit=HEADER_SIZE)
    request, flags, size = _HEADER.unpack_from(data)
    # "Lower 2 bits are the version (currently 0x01)"
    if flags & VERSION_MASK != VHOST_USER_VERSION:
        raise ProtocolError(f"version bits say {flags & VERSION_MASK}, expected "
                            f"{VHOST_USER_VERSION} (the only protocol version)",
                            request=request, field="flags", value=flags,
                            limit=f"version bits == {VHOST_USER_VERSION}")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"flag bits 0x{flags & ~KNOWN_FLAGS:x} are undefined; "
                            "expected only the version (bits 0-1), reply (0x4) "
                            "and need_reply (0x8)", request=request,
                            field="flags", value=flags,
                            limit=f"only bits 0-3 (0x{KNOWN_FLAGS:x})")
    if flags & FLAG_REPLY and flags != REPLY_FLAGS:
        raise ProtocolError(f"a reply must carry flags exactly 0x{REPLY_FLAGS:x} "
                            f"(version 1 + reply), this one has 0x{flags:x}",
                            request=request, field="flags", value=flags,
                            limit=REPLY_FLAGS)
    if size > MAX_PAYLOAD_SIZE:
        raise ProtocolError(f"header promises {size} payload bytes; no message "
                            f"may be larger than {MAX_PAYLOAD_SIZE}",
                            request=request, field="size", value=size,
                            limit=MAX_PAYLOAD_SIZE)
    return Header(request, flags, size)


def _coerce_payload(request: AnyRequest, payload: Any,
                    allowed: tuple) -> Payload | None:
    if isinstance(payload, int) and not isinstance(payload, bool) and U64 in allowed:
        return U64(payload)
    if payload is None and None in allowed:
        return None
    for kind in allowed:
        if kind is not None and isinstance(payload, kind):
            return payload
    names = [k.__name__ if k else "None" for k in allowed]
    raise TypeError(f"{request.name}: payload must be one of {names}, "
                    f"not {type(payload).__name__}")


@dataclass(frozen=True)
class Message:
    """A vhost-user message: request (or reply) id, flags, payload, fds.

    ``payload`` is a typed payload object, or None when the message has
    none. ``fds`` are the file descriptors that came (or go) with it in
    SCM_RIGHTS ancillary data; ``to_bytes()`` does not include them.
    """

    request: AnyRequest
    flags: int
    payload: Payload | None = None
    fds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.request, (Request, BackendRequest)):
            object.__setattr__(self, "request", Request(self.request))
        object.__setattr__(self, "fds", tuple(self.fds))
        if not 0 <= self.flags < 2 ** 32:
            raise ValueError(f"flags {self.flags!r} is not a u32")

    # -- building ---------------------------------------------------------
    @classmethod
    def make(cls, request: AnyRequest, payload: Any = None,
             fds: Sequence[int] = (), need_reply: bool = False) -> "Message":
        """A request (flags 0x1, or 0x9 with ``need_reply``).

        An int payload is wrapped in U64 where the request takes a u64.
        Raises TypeError if the payload type does not fit the request.
        """
        if not isinstance(request, (Request, BackendRequest)):
            request = Request(request)
        spec = spec_of(request)
        payload = _coerce_payload(request, payload, spec.payload)
        flags = VHOST_USER_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        return cls(request, flags, payload, tuple(fds))

    @classmethod
    def make_reply(cls, request: AnyRequest, payload: Any = None,
                   fds: Sequence[int] = ()) -> "Message":
        """A reply to ``request``: flags exactly 0x5, as QEMU requires."""
        if not isinstance(request, (Request, BackendRequest)):
            request = Request(request)
        spec = spec_of(request)
        payload = _coerce_payload(request, payload, spec.reply_payload)
        return cls(request, REPLY_FLAGS, payload, tuple(fds))

    # -- reading ----------------------------------------------------------
    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def size(self) -> int:
        """The header's size field: the payload length in bytes."""
        return len(self._payload_bytes())

    @property
    def spec(self) -> RequestSpec:
        """The request's row in the protocol table."""
        return spec_of(self.request)

    def _payload_bytes(self) -> bytes:
        return self.payload.pack() if self.payload is not None else b""

    def to_bytes(self) -> bytes:
        """Header and payload exactly as they go on the wire (no fds)."""
        body = self._payload_bytes()
        return _HEADER.pack(int(self.request), self.flags, len(body)) + body

    def fields(self) -> dict[str, Any]:
        """Decoded fields for a message trace (plain ints, str, lists)."""
        return {
            "request": self.request.name,
            "id": int(self.request),
            "flags": self.flags,
            "reply": self.is_reply,
            "need_reply": self.need_reply,
            "size": self.size,
            "fds": len(self.fds),
            "payload": _payload_fields(self.request, self.is_reply, self.payload),
        }


_FEATURE_MASKS = {
    # (request, is_reply) -> which mask the u64 holds
    (Request.GET_FEATURES, True): Feature,
    (Request.SET_FEATURES, False): Feature,
    (Request.GET_PROTOCOL_FEATURES, True): ProtocolFeature,
    (Request.SET_PROTOCOL_FEATURES, False): ProtocolFeature,
}
_VRING_FILES = (Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                Request.SET_VRING_ERR)


def _payload_fields(request: AnyRequest, is_reply: bool,
                    payload: Payload | None):
    if payload is None:
        return None
    out = payload.fields()
    if isinstance(payload, U64):
        _u64_fields(request, is_reply, payload, out)
    elif isinstance(payload, VringAddr):
        out["log"] = payload.log_enabled
    return out


def _u64_fields(request: AnyRequest, is_reply: bool, payload: U64,
                out: dict[str, Any]) -> None:
    if is_reply and spec_of(request).reply is not ReplyKind.DATA:
        # REPLY_ACK and status replies: "zero on success or non-zero on failure"
        out["status"] = "success" if payload.value == 0 else "failure"
        return
    flag_class = _FEATURE_MASKS.get((request, is_reply))
    if flag_class is not None:
        out["names"] = feature_names(payload.value, flag_class)
    elif request in _VRING_FILES:
        out["index"] = payload.vring_index
        out["nofd"] = payload.vring_nofd
    elif request is Request.SET_DEVICE_STATE_FD and is_reply:
        # "Bits 0-7 are 0 on success, and non-zero on error. Bit 8 is the
        # invalid FD flag"
        out["status"] = "success" if payload.value & VRING_IDX_MASK == 0 else "failure"
        out["nofd"] = payload.vring_nofd
    elif request is Request.CHECK_DEVICE_STATE and is_reply:
        out["status"] = "success" if payload.value == 0 else "failure"
    elif request is Request.SEND_RARP:
        mac = payload.value.to_bytes(8, "little")[:6]
        out["mac"] = ":".join(f"{b:02x}" for b in mac)


# -- parsing ---------------------------------------------------------------
def _unpack_payload(types: tuple, body: bytes) -> Payload | None:
    n = len(body)
    for kind in types:
        if kind is None:
            if n == 0:
                return None
        elif kind.accepts_size(n):
            return kind.unpack(body)
    rules = " or ".join("0" if k is None else k.size_text() for k in types)
    raise ProtocolError(f"expected a payload of {rules} bytes, got {n}",
                        field="size", value=n, limit=rules)


def _expected_fds_text(rule: FdRule, low: int, high: int) -> str:
    """Plain words for what ``rule`` allows: "exactly 1 fd", "0 or 1 fd"..."""
    if low != high:
        return f"{low} or {high} fd" if high == low + 1 else f"{low} to {high} fds"
    text = f"exactly {low} fd{'' if low == 1 else 's'}"
    if rule is FdRule.PER_REGION:
        return f"{text} (one per memory region)"
    if rule in (FdRule.VRING, FdRule.STATUS_FD):
        return f"{text} (bit 8, no fd, is {'set' if low == 0 else 'clear'})"
    return text


def _check_fds(rule: FdRule, payload: Payload | None, nfds: int,
               check_count: bool = True) -> None:
    if nfds > VHOST_USER_MAX_FDS:
        raise ProtocolError(f"{nfds} fds arrived; no message may carry more "
                            f"than {VHOST_USER_MAX_FDS}", field="fds",
                            value=nfds, limit=VHOST_USER_MAX_FDS)
    low, high = expected_fds(rule, payload)
    if check_count and not low <= nfds <= high:
        limit = low if low == high else f"{low}..{high}"
        raise ProtocolError(f"expected {_expected_fds_text(rule, low, high)}, "
                            f"got {nfds}", field="fds", value=nfds, limit=limit)
    if rule is FdRule.VRING and isinstance(payload, U64):
        # "Bits (0-7) of the payload contain the vring index. Bit 8 is the
        # invalid FD flag." Nothing else may be set.
        extra = payload.value & ~(VRING_IDX_MASK | VRING_NOFD_MASK)
        if extra:
            raise ProtocolError(f"bits 0x{extra:x} are set; only bits 0-7 (the "
                                "vring index) and bit 8 (no fd) are defined",
                                field="u64", value=payload.value,
                                limit=VRING_IDX_MASK | VRING_NOFD_MASK)


def _parse(data: bytes, fds: Sequence[int], enum_cls: type,
           table: dict, reply_payload: tuple | None,
           check_fd_count: bool = True) -> Message:
    data = bytes(data)
    try:
        header = peek_header(data)
    except ProtocolError as err:
        if err.request in set(enum_cls):  # name it, now that the channel is known
            raise ProtocolError(err.reason, request=enum_cls(err.request).name,
                                field=err.field, value=err.value,
                                limit=err.limit) from None
        raise
    try:
        request = enum_cls(header.request)
    except ValueError:
        raise unknown_request(header.request, enum_cls) from None
    spec: RequestSpec = table[request]
    try:
        body = data[HEADER_SIZE:]
        if len(body) < header.size:
            raise ProtocolError(f"header promises {header.size} payload bytes "
                                f"but only {len(body)} arrived", field="size",
                                value=header.size, limit=len(body))
        if len(body) > header.size:
            raise ProtocolError(f"{len(body) - header.size} bytes arrived after "
                                f"the {header.size}-byte payload the header "
                                "promised", field="trailing",
                                value=len(body) - header.size, limit=0)
        is_reply = bool(header.flags & FLAG_REPLY)
        if is_reply:
            types = reply_payload or spec.reply_payload
        else:
            types = spec.payload
        payload = _unpack_payload(types, body)
        _check_fds(spec.reply_fds if is_reply else spec.fds, payload, len(fds),
                   check_fd_count)
    except ProtocolError as err:
        raise err.with_request(request.name) from None
    return Message(request, header.flags, payload, tuple(fds))


def parse_message(data: bytes, fds: Sequence[int] = (), *,
                  reply_payload: tuple | None = None,
                  check_fd_count: bool = True) -> Message:
    """Parse exactly one complete front-end-channel message.

    ``data`` holds header and payload, nothing more; ``fds`` are the fds
    received with it. A message with the reply flag is parsed as a reply
    to its request id (a REPLY_ACK reply is a U64); ``reply_payload``
    narrows which reply payload types are accepted, for a caller that
    knows what it is waiting for.

    ``check_fd_count=False`` leaves the number of fds to the caller (more
    than VHOST_USER_MAX_FDS is still refused): a back-end that checks it per
    request, as DPDK's validate_msg_fds() does, can then answer a request
    with need_reply and the wrong fds with a failure status (REPLY_ACK)
    instead of dropping the connection.

    Returns a Message. Raises ProtocolError, naming the request, field,
    value and limit, and nothing else. Never closes the fds.
    """
    return _parse(data, fds, Request, REQUESTS, reply_payload, check_fd_count)


def parse_backend_message(data: bytes, fds: Sequence[int] = ()) -> Message:
    """Like ``parse_message``, for the back-end channel (BACKEND_REQ):
    back-end requests and the front-end's replies to them."""
    return _parse(data, fds, BackendRequest, BACKEND_REQUESTS, None)


def unknown_request(request_id: int, enum_cls: type = Request) -> ProtocolError:
    """The error for a request id that ``enum_cls`` does not define."""
    known = f"{min(enum_cls)}..{max(enum_cls)}"
    channel = "front-end" if enum_cls is Request else "back-end"
    return ProtocolError(f"request id {request_id} is not a {channel} request "
                         f"of the spec (known: {known})", request=request_id,
                         field="request", value=request_id, limit=known)


def reply_types_for(spec: RequestSpec, postcopy: bool) -> tuple:
    """Reply payload types a caller waits for, given the postcopy state."""
    if spec.reply is ReplyKind.DATA_IF_POSTCOPY:
        return spec.reply_payload[1:] if postcopy else (U64,)
    return spec.reply_payload
