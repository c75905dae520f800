"""Sans-IO vhost-user connections: bytes and fds in, messages out.

Modelled on h11: a connection object owns no socket. The I/O code reads
from the socket (recvmsg with SCM_RIGHTS) and hands the bytes and fds to
``receive_data``; it writes whatever bytes ``reply``/``ack``/``send``
return (with any fds the message carries). The protocol rules live here
and in the table in requests.py; the I/O lives elsewhere.

Framing: vhost-user runs over SOCK_STREAM, so a message may arrive in
pieces or several in one read. The sender passes a message's fds in the
same sendmsg as its bytes, and Linux hands them out with the first read
that touches that sendmsg's data, then ends the read there (a read may
glue fd-less data in front, never behind). So fds that arrive with a
chunk belong to the last message whose header begins in that chunk, or,
when none begins in it, to the message the chunk continues.

Fd ownership: fds handed in belong to the caller. A parsed message
carries its own fds out; fds still buffered (a message not yet complete,
or messages lost to a ProtocolError) are listed by ``pending_fds`` and
returned by ``reset()``, for the caller to close.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Sequence

from .constants import FLAG_REPLY, HEADER_SIZE, VHOST_USER_MAX_FDS, VRING_NOFD_MASK
from .errors import ProtocolError
from .features import Feature, ProtocolFeature
from .message import (Header, Message, parse_message, peek_header, reply_types_for,
                      unknown_request)
from .payloads import U64, CryptoSession, InflightArea, MemoryTable, SharedObject
from .requests import Request, ReplyKind

__all__ = ["BackendConnection", "FrontendConnection"]

_INBAND_NEEDS = ProtocolFeature.BACKEND_REQ | ProtocolFeature.REPLY_ACK


def _request_of(header: Header) -> Request:
    try:
        return Request(header.request)
    except ValueError:
        raise unknown_request(header.request) from None


def _is_postcopy_ack(msg: Message) -> bool:
    # After the back-end answers a postcopy SET_MEM_TABLE, QEMU acknowledges
    # with a SET_MEM_TABLE whose payload is a u64 0 (an empty table here).
    return isinstance(msg.payload, MemoryTable) and msg.payload.nregions == 0


class _Connection:
    """Buffering, fd association, negotiated state and the failed state."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._offset = 0                  # stream offset of _buffer[0]
        self._fds: dict[int, list[int]] = {}  # message start offset -> fds
        self._orphans: list[int] = []     # fds of messages a failure dropped
        self._error: ProtocolError | None = None
        self._protocol_features = 0
        self._features = 0
        self.postcopy_listening = False

    # -- state --------------------------------------------------------------
    @property
    def protocol_features(self) -> ProtocolFeature:
        """Protocol features agreed by SET_PROTOCOL_FEATURES (0 before)."""
        return ProtocolFeature(self._agreed_protocol_features())

    @property
    def features(self) -> Feature:
        """Features set by the last SET_FEATURES (0 before)."""
        return Feature(self._agreed_features())

    def _agreed_protocol_features(self) -> int:
        return self._protocol_features

    def _agreed_features(self) -> int:
        return self._features

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def error(self) -> ProtocolError | None:
        """The ProtocolError that failed the connection, if any."""
        return self._error

    @property
    def pending_fds(self) -> tuple[int, ...]:
        """Fds received but not handed out in a Message (caller closes them)."""
        held = [fd for start in sorted(self._fds) for fd in self._fds[start]]
        return tuple(self._orphans + held)

    def reset(self) -> tuple[int, ...]:
        """Forget everything (for a reconnection). Returns the fds that were
        still buffered; the caller should close them."""
        fds = self.pending_fds
        _Connection.__init__(self)
        self._on_reset()
        return fds

    def _on_reset(self) -> None:
        """Subclass hook: clear subclass state."""

    # -- input --------------------------------------------------------------
    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> list[Message]:
        """Feed bytes (and the fds that came with them); return every
        message now complete, in order.

        Raises ProtocolError on malformed input; the connection is then
        failed and every later call raises too, until ``reset()``.
        """
        if self._error is not None:
            raise ProtocolError("the connection failed earlier; call reset() "
                                "before feeding more data",
                                field="state", value="failed",
                                limit=str(self._error)) from self._error
        chunk_start = self._offset + len(self._buffer)
        self._buffer += data
        if fds:
            owner = self._fd_owner(chunk_start)
            held = self._fds.setdefault(owner, [])
            held.extend(fds)
            if len(held) > VHOST_USER_MAX_FDS:
                # Counted as they come, not once the message is whole: a peer
                # that sends fds with every byte of an unfinished message
                # must not make us hold thousands (closed by the caller).
                self._error = ProtocolError(
                    f"{len(held)} fds arrived for a message still incomplete "
                    f"({len(self._buffer)} bytes buffered)", field="fds",
                    value=len(held), limit=VHOST_USER_MAX_FDS)
                raise self._error
        out: list[Message] = []
        try:
            while (msg := self._next_message()) is not None:
                out.append(msg)           # first: a message _on_message refuses
                self._on_message(msg)     # still hands its fds back below
        except ProtocolError as err:
            self._error = err
            for msg in out:
                self._orphans.extend(msg.fds)
            raise
        return out

    def _fd_owner(self, chunk_start: int) -> int:
        """Stream offset of the message that owns fds arriving with the
        chunk that starts at ``chunk_start`` (see the module docstring)."""
        owner, pos = self._offset, self._offset
        end = self._offset + len(self._buffer)
        while pos < end:
            if pos >= chunk_start:
                owner = pos
            at = pos - self._offset
            if end - pos < HEADER_SIZE:
                break
            try:
                size = peek_header(self._buffer[at:at + HEADER_SIZE]).size
            except ProtocolError:
                break  # the parse loop reports it
            pos += HEADER_SIZE + size
        return owner

    def _next_message(self) -> Message | None:
        if len(self._buffer) < HEADER_SIZE:
            return None
        # Check the header as soon as it is here, before buffering a payload.
        header = peek_header(self._buffer)
        self._check_header(header)
        end = HEADER_SIZE + header.size
        if len(self._buffer) < end:
            return None
        fds = self._fds.pop(self._offset, [])
        try:
            msg = self._parse(bytes(self._buffer[:end]), fds)
        except ProtocolError:
            self._orphans.extend(fds)
            raise
        del self._buffer[:end]
        self._offset += end
        return msg

    def _check_header(self, header: Header) -> None:
        raise NotImplementedError

    def _parse(self, data: bytes, fds: list[int]) -> Message:
        raise NotImplementedError

    def _on_message(self, msg: Message) -> None:
        """Subclass hook: check and track a message that parsed."""

    def _data_reply_due(self, msg: Message) -> bool:
        kind = msg.spec.reply
        if kind is ReplyKind.DATA:
            return True
        return (kind is ReplyKind.DATA_IF_POSTCOPY and self.postcopy_listening
                and not _is_postcopy_ack(msg))

    def _reply_due(self, msg: Message) -> bool:
        kind = msg.spec.reply
        if kind is ReplyKind.STATUS or self._data_reply_due(msg):
            return True
        if (kind is ReplyKind.STATUS_IF_LOG_SHMFD
                and self._agreed_protocol_features() & ProtocolFeature.LOG_SHMFD):
            return True
        # REPLY_ACK: answered whenever need_reply is set (QEMU waits for a
        # reply whenever it sets the flag; libvhost-user and DPDK send one).
        return msg.need_reply

    def _track(self, msg: Message) -> None:
        if msg.request is Request.SET_PROTOCOL_FEATURES:
            self._protocol_features = msg.payload.value
        elif msg.request is Request.SET_FEATURES:
            self._features = msg.payload.value
        elif msg.request is Request.POSTCOPY_LISTEN:
            self.postcopy_listening = True
        elif msg.request is Request.POSTCOPY_END:
            self.postcopy_listening = False


class BackendConnection(_Connection):
    """The back-end's side: parses requests, builds replies.

    ``offered_protocol_features`` is what the back-end answers to
    GET_PROTOCOL_FEATURES; a SET_PROTOCOL_FEATURES enabling anything else
    is a ProtocolError. ``offered_features``, if given, is checked the
    same way against SET_FEATURES.

    ``check_fd_counts=False`` hands out requests whatever number of fds
    (up to VHOST_USER_MAX_FDS) came with them, for a device that checks
    the count per request (DPDK's validate_msg_fds(), libvhost-user's
    handlers) and so can answer need_reply with a failure status.

    ``negotiated``: an object with ``features`` and ``protocol_features``
    (the device) that keeps what was negotiated, as the device accepted it;
    the connection then reads them there instead of keeping its own copy.
    """

    def __init__(self, offered_protocol_features: int = 0, *,
                 offered_features: int | None = None,
                 check_fd_counts: bool = True, negotiated=None) -> None:
        super().__init__()
        self.offered_protocol_features = ProtocolFeature(offered_protocol_features)
        self.offered_features = None if offered_features is None \
            else Feature(offered_features)
        self.check_fd_counts = check_fd_counts
        self.negotiated = negotiated

    def _agreed_protocol_features(self) -> int:
        if self.negotiated is not None:
            return int(self.negotiated.protocol_features)
        return self._protocol_features

    def _agreed_features(self) -> int:
        if self.negotiated is not None:
            return int(self.negotiated.features)
        return self._features

    def _check_header(self, header: Header) -> None:
        request = _request_of(header)
        if header.flags & FLAG_REPLY:
            raise ProtocolError("a back-end receives requests, but this message "
                                "has the reply bit (0x4) set",
                                request=request.name, field="flags",
                                value=header.flags, limit="no reply bit (0x4)")

    def _parse(self, data: bytes, fds: list[int]) -> Message:
        return parse_message(data, fds, check_fd_count=self.check_fd_counts)

    def _on_message(self, msg: Message) -> None:
        if msg.request is Request.SET_PROTOCOL_FEATURES:
            self._check_protocol_features(msg.payload.value)
        elif msg.request is Request.SET_FEATURES and self.offered_features is not None:
            extra = msg.payload.value & ~int(self.offered_features)
            if extra:
                raise ProtocolError(f"enables bits 0x{extra:x}, which the back-end "
                                    f"did not offer (it offered "
                                    f"0x{int(self.offered_features):x})",
                                    request=msg.request.name, field="u64",
                                    value=msg.payload.value,
                                    limit=int(self.offered_features))
        self._track(msg)

    def _check_protocol_features(self, value: int) -> None:
        name = Request.SET_PROTOCOL_FEATURES.name
        extra = value & ~int(self.offered_protocol_features)
        if extra:
            raise ProtocolError(f"enables protocol bits 0x{extra:x}, which the "
                                f"back-end did not offer (it offered "
                                f"0x{int(self.offered_protocol_features):x})",
                                request=name, field="u64", value=value,
                                limit=int(self.offered_protocol_features))
        # "It is also considered an error to negotiate this feature without
        # also negotiating VHOST_USER_PROTOCOL_F_BACKEND_REQ and
        # VHOST_USER_PROTOCOL_F_REPLY_ACK" (In-band notifications).
        if value & ProtocolFeature.INBAND_NOTIFICATIONS and \
                value & _INBAND_NEEDS != _INBAND_NEEDS:
            raise ProtocolError("INBAND_NOTIFICATIONS was negotiated without "
                                "BACKEND_REQ and REPLY_ACK, which it needs",
                                request=name, field="u64", value=value,
                                limit=int(_INBAND_NEEDS | ProtocolFeature.INBAND_NOTIFICATIONS))

    def _on_reset(self) -> None:
        pass

    def _track(self, msg: Message) -> None:
        # Postcopy state follows what the device did (handled()), not what
        # came in: a refused POSTCOPY_LISTEN must not make later memory
        # tables wait for a data reply that never comes. Features are the
        # device's to keep when it was given (``negotiated``).
        if msg.request in (Request.POSTCOPY_LISTEN, Request.POSTCOPY_END):
            return
        if self.negotiated is not None and msg.request in (
                Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES):
            return
        super()._track(msg)

    def handled(self, msg: Message, ok: bool) -> None:
        """Tell the connection whether the device carried ``msg`` out.

        Only then does POSTCOPY_LISTEN (or POSTCOPY_END) change the
        connection's state, and with it which replies are due.
        """
        if ok and msg.request is Request.POSTCOPY_LISTEN:
            self.postcopy_listening = True
        elif ok and msg.request is Request.POSTCOPY_END:
            self.postcopy_listening = False

    # -- output -------------------------------------------------------------
    def needs_reply(self, msg: Message) -> bool:
        """Whether the front-end waits for a reply to ``msg``: every request
        with a reply of its own (GET_*, IOTLB_MSG, POSTCOPY_*), SET_LOG_BASE
        when LOG_SHMFD is negotiated, postcopy memory tables, and any
        request with need_reply set."""
        return self._reply_due(msg)

    def reply(self, msg: Message, payload=None) -> bytes:
        """The reply to ``msg`` carrying ``payload`` (flags exactly 0x5).

        For GET_INFLIGHT_FD and POSTCOPY_ADVISE the caller sends the fd
        the reply carries alongside these bytes.
        Raises TypeError if the payload does not fit the request's reply.
        """
        return Message.make_reply(msg.request, payload).to_bytes()

    def ack(self, msg: Message, status: int = 0) -> bytes:
        """The u64 status reply (0 = success) if the front-end waits for one
        for ``msg``, else b"". Requests whose reply carries data (GET_*)
        are answered with ``reply()`` instead; for them this returns b""."""
        if not self._reply_due(msg) or self._data_reply_due(msg):
            return b""
        return Message.make_reply(msg.request, U64(status)).to_bytes()

    def answer(self, msg: Message, payload=None, *, refused: bool = False) -> bytes | None:
        """How the back-end answers ``msg``: the one place that decides it.

        Returns the bytes to send (b"": no reply), or None when a refusal can
        only close the connection; tells ``handled()`` the outcome.

        Success: requests with a reply of their own get it, carrying
        ``payload`` (also with need_reply: "unless the message already has
        an explicit reply body"); the others get a u64 0 when the front-end
        waits for one (need_reply with REPLY_ACK, or SET_LOG_BASE with
        LOG_SHMFD). Refusal: the request's own failure reply if the spec
        defines one (:data:`FAILURE_REPLIES`); else a non-zero u64 if
        need_reply is set; else the connection is closed, as DPDK's
        vhost_user_msg_handler does, so that e.g. a refused SET_LOG_BASE
        (whose reply QEMU reads without looking at the value) is never
        mistaken for logging. Requests whose reply is data and has no
        failure form (GET_VRING_BASE, GET_FEATURES, ...) are refused by
        closing too: a made-up value would be worse.
        """
        if not refused:
            out = self.reply(msg, payload) if msg.spec.reply is ReplyKind.DATA \
                else self.ack(msg, 0)
        elif (failure := FAILURE_REPLIES.get(msg.request)) is not None:
            out = self.reply(msg, failure(msg))
        elif msg.need_reply and msg.spec.reply is not ReplyKind.DATA:
            out = self.ack(msg, 1) or None
        else:
            out = None
        self.handled(msg, not refused)
        return out


def _failed_crypto(msg: Message):
    p = msg.payload
    # "The back-end must return the session id, 0 or positive for success,
    # negative for failure."
    return CryptoSession(p.op_code, p.body, -1) if isinstance(p, CryptoSession) else None


def _no_inflight(msg: Message):
    p = msg.payload
    # libvhost-user's failure form, and what QEMU's vhost_user_get_inflight_fd
    # reads as "no inflight buffer": mmap_size 0 and no fd.
    return InflightArea(0, 0, p.num_queues, p.queue_size) if isinstance(p, InflightArea) \
        else None


#: What a refused request gets back when the spec gives it a failure reply of
#: its own (used by :meth:`BackendConnection.answer`).
FAILURE_REPLIES: dict[Request, Callable[[Message], object]] = {
    # "vhost-user back-end uses zero length of payload to indicate an error"
    Request.GET_CONFIG: lambda msg: None,
    Request.GET_INFLIGHT_FD: _no_inflight,
    # No userfaultfd with the reply: QEMU's postcopy advise fails ("Failed to get ufd").
    Request.POSTCOPY_ADVISE: lambda msg: None,
    Request.CREATE_CRYPTO_SESSION: _failed_crypto,
    # These always answer with a u64 status; non-zero is failure.
    Request.IOTLB_MSG: lambda msg: U64(1),
    Request.POSTCOPY_END: lambda msg: U64(1),
    Request.CHECK_DEVICE_STATE: lambda msg: U64(1),
    # "Bits 0-7 are 0 on success, and non-zero on error. Bit 8 is the invalid
    # FD flag ... The back-end must not both indicate an error and return a
    # file descriptor."
    Request.SET_DEVICE_STATE_FD: lambda msg: U64(1 | VRING_NOFD_MASK),
    # libvhost-user answers an unknown UUID with the request's payload and no
    # fd; QEMU then reports "Failed to get dmabuf fd".
    Request.GET_SHARED_OBJECT: lambda msg: msg.payload if isinstance(msg.payload, SharedObject)
    else None,
}


class FrontendConnection(_Connection):
    """The front-end's side: serialises requests, checks the replies.

    Replies must come in order, carry the request id of the request they
    answer and flags exactly 0x5 (as QEMU's vhost_user_read_header checks).
    """

    def __init__(self) -> None:
        super().__init__()
        self._expected: deque[tuple[Request, tuple]] = deque()

    def _on_reset(self) -> None:
        self._expected = deque()

    @property
    def expecting_reply(self) -> Request | None:
        """The request whose reply is awaited next, or None."""
        return self._expected[0][0] if self._expected else None

    def send(self, msg: Message) -> bytes:
        """Bytes to write for request ``msg`` (its fds go with them).

        Checks ``msg`` with the same rules the back-end applies, and
        records the reply it now waits for. Raises ProtocolError for a
        malformed message, ValueError for a reply or a failed connection.
        """
        if self._error is not None:
            raise ValueError(f"connection failed earlier: {self._error}")
        if msg.is_reply or not isinstance(msg.request, Request):
            raise ValueError("send() takes front-end requests, not replies")
        data = msg.to_bytes()
        parse_message(data, msg.fds)
        types = self._reply_types(msg)
        if types is not None:
            self._expected.append((msg.request, types))
        self._track(msg)
        return data

    def expect_reply(self, msg: Message) -> bool:
        """Record ``msg`` as sent by someone else (its bytes went out another
        way, e.g. a fuzzer's): await its reply if one is due. Negotiation is
        tracked; postcopy is not (a back-end may refuse it). True if due."""
        if msg.request not in (Request.POSTCOPY_LISTEN, Request.POSTCOPY_END):
            self._track(msg)
        types = self._reply_types(msg)
        if types is not None:
            self._expected.append((msg.request, types))
        return types is not None

    def _reply_types(self, msg: Message) -> tuple | None:
        if not self._reply_due(msg):
            return None
        spec = msg.spec
        if self._data_reply_due(msg):
            return reply_types_for(spec, self.postcopy_listening)
        if spec.reply is ReplyKind.STATUS_IF_LOG_SHMFD:
            return spec.reply_payload          # SET_LOG_BASE: u64, or empty (DPDK)
        return (U64,)

    def _check_header(self, header: Header) -> None:
        request = _request_of(header)
        if not header.flags & FLAG_REPLY:
            raise ProtocolError("expected a reply (flags 0x5) but a request "
                                "came; back-end requests use the BACKEND_REQ "
                                "channel",
                                request=request.name, field="flags",
                                value=header.flags, limit=0x5)
        if not self._expected:
            raise ProtocolError("a reply came but nobody is waiting for one",
                                request=request.name, field="request",
                                value=int(request), limit="no reply expected")
        wanted = self._expected[0][0]
        if request is not wanted:
            raise ProtocolError(f"expected the reply to {wanted.name}, got a "
                                f"reply to {request.name}", request=request.name,
                                field="request", value=int(request),
                                limit=f"{int(wanted)} ({wanted.name})")

    def _parse(self, data: bytes, fds: list[int]) -> Message:
        msg = parse_message(data, fds, reply_payload=self._expected[0][1])
        self._expected.popleft()
        return msg
