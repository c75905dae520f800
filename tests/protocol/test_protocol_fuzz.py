"""Fuzzing: random valid messages round-trip; random and mutated input
gives a valid message or a ProtocolError, never anything else; the
connections never lose or invent an fd."""
from __future__ import annotations

import os
import struct
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from protocol_samples import SAMPLE_REQUESTS, sample_reply
from vhostlab.protocol import (BackendConnection, ConfigSpace, CryptoSession,
                               FdRule, FrontendConnection, InflightArea,
                               IotlbMsg, LogArea, MAX_AREA_SIZE, Message,
                               MemoryRegion, MemoryTable, ProtocolError,
                               Request, SharedObject, SingleMemoryRegion,
                               TransferDeviceState, U64, VringAddr,
                               VringState, expected_fds, parse_message,
                               spec_of)

U64_END = 2 ** 64
u16 = st.integers(0, 2 ** 16 - 1)
u32 = st.integers(0, 2 ** 32 - 1)
u64 = st.integers(0, U64_END - 1)
FUZZ = settings(max_examples=150, deadline=None)


@pytest.fixture(scope="module")
def real_fds():
    """Nine real eventfds shared by the fuzz examples (parse never uses them)."""
    fds = tuple(os.eventfd(0, os.EFD_CLOEXEC) for _ in range(9))
    yield fds
    for fd in fds:
        os.close(fd)


def below(size: int) -> st.SearchStrategy[int]:
    """A base address such that base + size stays within 2**64."""
    return st.integers(0, min(U64_END - size, U64_END - 1))


@st.composite
def regions(draw, gpa: int | None = None) -> MemoryRegion:
    size = draw(st.integers(1, 2 ** 40))
    return MemoryRegion(gpa if gpa is not None else draw(below(size)), size,
                        draw(below(size)), draw(below(size)))


@st.composite
def tables(draw) -> MemoryTable:
    n = draw(st.integers(0, 8))
    # one 2**41-byte slot per region keeps them from overlapping
    return MemoryTable(tuple(draw(regions(gpa=i << 41)) for i in range(n)),
                       draw(u32))


@st.composite
def areas(draw, cls):
    size = draw(st.integers(1, MAX_AREA_SIZE))
    return cls(size, draw(below(size)))


@st.composite
def iotlbs(draw) -> IotlbMsg:
    size = draw(u64)
    return IotlbMsg(draw(below(size)), size, draw(below(size)),
                    draw(st.integers(0, 3)), draw(st.integers(1, 4)),
                    draw(st.integers(0, 2 ** 48 - 1)))


@st.composite
def configs(draw) -> ConfigSpace:
    size = draw(st.integers(0, 256))
    return ConfigSpace(draw(st.integers(0, 256 - size)), size, draw(u32),
                       draw(st.binary(min_size=size, max_size=size)))


@st.composite
def inflights(draw) -> InflightArea:
    size = draw(st.integers(0, MAX_AREA_SIZE))
    return InflightArea(size, draw(below(size)), draw(u16), draw(u16), draw(u32))


PAYLOADS = {
    None: st.none(),
    U64: st.builds(U64, u64),
    VringState: st.builds(VringState, u32, u32),
    VringAddr: st.builds(VringAddr, u32, st.integers(0, 1), u64, u64, u64, u64),
    MemoryTable: tables(),
    SingleMemoryRegion: st.builds(SingleMemoryRegion, regions(), u64),
    LogArea: areas(LogArea),
    IotlbMsg: iotlbs(),
    ConfigSpace: configs(),
    CryptoSession: st.builds(CryptoSession, u64, st.binary(max_size=64),
                             st.integers(-2 ** 63, 2 ** 63 - 1)),
    InflightArea: inflights(),
    SharedObject: st.builds(SharedObject, st.binary(min_size=16, max_size=16)),
    TransferDeviceState: st.builds(TransferDeviceState, u32, u32),
}


def request_payloads(request: Request) -> st.SearchStrategy:
    spec = spec_of(request)
    if spec.fds is FdRule.VRING:
        # bits 0-7 index, bit 8 no-fd; nothing else
        return st.integers(0, 0x1FF).map(U64)
    return PAYLOADS[spec.payload[0]]


@st.composite
def requests(draw, fd_pool: tuple[int, ...]) -> Message:
    request = draw(st.sampled_from(list(Request)))
    payload = draw(request_payloads(request))
    low, high = expected_fds(spec_of(request).fds, payload)
    nfds = draw(st.integers(low, high))
    return Message.make(request, payload, fd_pool[:nfds],
                        need_reply=draw(st.booleans()))


@st.composite
def mutations(draw, data: bytes):
    """Apply 1-4 random mutations: bit flips, truncation, size/id/flag
    rewrites, appended bytes."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "size", "request",
                                     "flags", "append"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) * 8 - 1))
            data[i // 8] ^= 1 << (i % 8)
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind in ("size", "request", "flags") and len(data) >= 12:
            offset = {"request": 0, "flags": 4, "size": 8}[kind]
            old = struct.unpack_from("<I", data, offset)[0]
            new = draw(st.one_of(u32, st.integers(-40, 40).map(
                lambda d: (old + d) % 2 ** 32)))
            struct.pack_into("<I", data, offset, new)
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=40))
    return bytes(data)


def check_parse(data: bytes, fds: tuple[int, ...]) -> Message | None:
    """parse_message returns a message that reproduces the bytes, or raises
    ProtocolError; anything else fails the test."""
    try:
        msg = parse_message(data, fds)
    except ProtocolError as err:
        assert str(err)
        return None
    assert msg.to_bytes() == data and msg.fds == fds
    return msg


# -- parse_message ------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_valid_requests_round_trip(real_fds, data) -> None:
    msg = data.draw(requests(real_fds))
    raw = msg.to_bytes()
    parsed = parse_message(raw, msg.fds)
    assert parsed == msg and parsed.to_bytes() == raw
    assert isinstance(parsed.fields(), dict)


@FUZZ
@given(data=st.data())
def test_valid_replies_round_trip(real_fds, data) -> None:
    request = data.draw(st.sampled_from(list(Request)))
    spec = spec_of(request)
    payload = data.draw(st.one_of(*(PAYLOADS[t] for t in spec.reply_payload)))
    low, high = expected_fds(spec.reply_fds, payload)
    msg = Message.make_reply(request, payload, real_fds[:low])
    raw = msg.to_bytes()
    # An empty postcopy table and a u64 ack are the same 8 bytes; a
    # front-end knows which it waits for and says so with reply_payload.
    kind = None if payload is None else type(payload)
    assert parse_message(raw, msg.fds, reply_payload=(kind,)) == msg
    assert parse_message(raw, msg.fds).to_bytes() == raw


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_mutated_messages(real_fds, data) -> None:
    msg = data.draw(requests(real_fds))
    raw = data.draw(mutations(msg.to_bytes()))
    nfds = data.draw(st.sampled_from([len(msg.fds), 0, 1, 3, 9]))
    check_parse(raw, real_fds[:nfds])


@FUZZ
@given(raw=st.binary(max_size=300), nfds=st.integers(0, 9))
def test_random_bytes(real_fds, raw: bytes, nfds: int) -> None:
    check_parse(raw, real_fds[:nfds])


@FUZZ
@given(body=st.binary(max_size=300), request=st.integers(0, 45),
       flags=st.sampled_from([1, 5, 9, 0, 0xD]), nfds=st.integers(0, 9))
def test_random_payloads_behind_valid_headers(real_fds, body, request, flags, nfds) -> None:
    check_parse(struct.pack("<III", request, flags, len(body)) + body,
                real_fds[:nfds])


# -- connections -----------------------------------------------------------------
def feed(conn, stream: bytes, cuts: list[int], fd_at: dict[int, tuple[int, ...]]):
    """Feed ``stream`` in chunks; return (messages, fds given, error)."""
    got: list[Message] = []
    given_fds: list[int] = []
    bounds = sorted(set(c % (len(stream) + 1) for c in cuts)) + [len(stream)]
    start = 0
    for i, end in enumerate(bounds):
        fds = fd_at.get(i, ())
        try:
            got += conn.receive_data(stream[start:end], fds)
        except ProtocolError as err:
            if "failed earlier" not in str(err):
                given_fds += fds
            with pytest.raises(ProtocolError):
                conn.receive_data(b"\0" * 12)
            return got, given_fds, err
        given_fds += fds
        start = end
    return got, given_fds, None


def check_connection(conn, stream, cuts, fd_at) -> None:
    got, given_fds, _ = feed(conn, stream, cuts, fd_at)
    for msg in got:
        raw = msg.to_bytes()
        assert parse_message(raw, msg.fds).to_bytes() == raw
    # every fd handed in comes out exactly once: in a message or as pending
    handed_out = [fd for m in got for fd in m.fds]
    pending = list(conn.pending_fds)
    assert Counter(handed_out + pending) == Counter(given_fds)
    assert Counter(conn.reset()) == Counter(pending)
    assert conn.pending_fds == () and not conn.failed


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_backend_connection_fuzz(real_fds, data) -> None:
    msgs = data.draw(st.lists(requests(real_fds), min_size=1, max_size=5))
    stream = b"".join(m.to_bytes() for m in msgs)
    if data.draw(st.booleans()):
        stream = data.draw(mutations(stream))
    cuts = data.draw(st.lists(st.integers(0, 10_000), max_size=6))
    fd_at = data.draw(st.dictionaries(st.integers(0, 6), st.sampled_from(
        [real_fds[:1], real_fds[1:3], real_fds[3:6]]), max_size=3))
    conn = BackendConnection(offered_protocol_features=2 ** 19 - 1)
    check_connection(conn, stream, cuts, fd_at)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_frontend_connection_fuzz(real_fds, data) -> None:
    conn = FrontendConnection()
    chosen = data.draw(st.lists(st.sampled_from(
        [r for r in Request if r is not Request.POSTCOPY_LISTEN]), min_size=1, max_size=4))
    replies = []
    for request in chosen:
        payload, nfds = SAMPLE_REQUESTS[request]
        msg = Message.make(request, payload, real_fds[:nfds], need_reply=True)
        conn.send(msg)
        reply_payload, _ = sample_reply(request)
        replies.append(Message.make_reply(request, reply_payload))
    stream = b"".join(m.to_bytes() for m in replies)
    if data.draw(st.booleans()):
        stream = data.draw(mutations(stream))
    cuts = data.draw(st.lists(st.integers(0, 10_000), max_size=6))
    fd_at = data.draw(st.dictionaries(st.integers(0, 6), st.sampled_from(
        [real_fds[:1], real_fds[1:3]]), max_size=2))
    check_connection(conn, stream, cuts, fd_at)
