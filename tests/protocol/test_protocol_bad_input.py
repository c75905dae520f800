"""Hostile input gets a ProtocolError naming request, field, value, limit."""
from __future__ import annotations

import struct

import pytest

from protocol_samples import header
from vhostlab.protocol import (MAX_AREA_SIZE, MAX_PAYLOAD_SIZE, Message,
                               ProtocolError, Request, peek_header,
                               parse_message)

R = Request
U64_MAX = 2 ** 64 - 1


def region(gpa: int, size: int, uaddr: int = 0x7F0000000000, off: int = 0) -> bytes:
    return struct.pack("<QQQQ", gpa, size, uaddr, off)


def mem_table(regions: list[bytes], nregions: int | None = None, flags: int = 1) -> bytes:
    n = len(regions) if nregions is None else nregions
    body = struct.pack("<II", n, 0) + b"".join(regions)
    return header(R.SET_MEM_TABLE, flags, len(body)) + body


def u64_msg(request: int, value: int, flags: int = 1) -> bytes:
    return header(request, flags, 8) + struct.pack("<Q", value)


def rejects(data: bytes, fds=(), *, request=None, field=None, value=None,
            limit=None) -> ProtocolError:
    """Assert ``parse_message`` raises, with the named attributes."""
    with pytest.raises(ProtocolError) as info:
        parse_message(data, fds)
    err = info.value
    for name, want in (("request", request), ("field", field),
                       ("value", value), ("limit", limit)):
        if want is not None:
            assert getattr(err, name) == want, (name, err)
    # The message names what broke.
    text = str(err)
    for part in (err.request, err.field):
        if part is not None:
            assert str(part) in text
    return err


# -- header -----------------------------------------------------------------
@pytest.mark.parametrize("length", range(12))
def test_short_header(length: int) -> None:
    rejects(header(1, 1, 0)[:length], field="header", value=length, limit=12)
    with pytest.raises(ProtocolError):
        peek_header(b"\x01" * length)


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x9 & ~1, 0x7])
def test_version_bits_other_than_one(flags: int) -> None:
    rejects(header(1, flags, 0), field="flags", value=flags)


@pytest.mark.parametrize("flags", [0x11, 0x101, 0x8000_0001])
def test_unknown_flag_bits(flags: int) -> None:
    rejects(header(1, flags, 0), field="flags", value=flags)


@pytest.mark.parametrize("flags", [0xD, 0x4 | 0x1 | 0x8])
def test_reply_flags_must_be_exactly_0x5(flags: int) -> None:
    rejects(u64_msg(R.GET_FEATURES, 0, flags), field="flags", limit=0x5)


@pytest.mark.parametrize("request_id", [0, 44, 99, 0xFFFFFFFF])
def test_unknown_request_id(request_id: int) -> None:
    rejects(header(request_id, 1, 0), request=request_id, field="request",
            value=request_id)


def test_size_over_the_sane_maximum() -> None:
    size = MAX_PAYLOAD_SIZE + 1
    rejects(header(R.SET_CONFIG, 1, size) + bytes(size), field="size",
            value=size, limit=MAX_PAYLOAD_SIZE)
    rejects(header(R.SET_FEATURES, 1, 2 ** 31 + 8), field="size")


def test_payload_beyond_the_data() -> None:
    rejects(header(R.SET_FEATURES, 1, 8) + bytes(5), request="SET_FEATURES",
            field="size", value=8, limit=5)


def test_trailing_bytes() -> None:
    rejects(u64_msg(R.SET_FEATURES, 0) + b"\0", request="SET_FEATURES",
            field="trailing", value=1, limit=0)


@pytest.mark.parametrize("request_id,size", [
    (R.SET_FEATURES, 4), (R.GET_FEATURES, 8), (R.SET_VRING_NUM, 12),
    (R.SET_VRING_ADDR, 32), (R.SET_LOG_BASE, 8), (R.ADD_MEM_REG, 32),
    (R.IOTLB_MSG, 26), (R.GET_INFLIGHT_FD, 20), (R.SET_CONFIG, 8),
    (R.SET_CONFIG, 12 + 257), (R.SET_MEM_TABLE, 4), (R.SET_MEM_TABLE, 20),
    (R.CREATE_CRYPTO_SESSION, 15), (R.SET_OWNER, 1),
])
def test_payload_size_wrong_for_the_request(request_id: Request, size: int) -> None:
    rejects(header(request_id, 1, size) + bytes(size), request=request_id.name,
            field="size", value=size)


def test_reply_size_wrong() -> None:
    rejects(header(R.GET_VRING_BASE, 5, 16) + bytes(16),
            request="GET_VRING_BASE", field="size", value=16)
    rejects(header(R.SET_VRING_NUM, 5, 0), request="SET_VRING_NUM",
            field="size", value=0, limit="8")


# -- memory table -------------------------------------------------------------
def test_more_than_eight_regions() -> None:
    regions = [region(i << 32, 0x1000) for i in range(9)]
    rejects(mem_table(regions), tuple(range(9)), request="SET_MEM_TABLE",
            field="nregions", value=9, limit=8)
    rejects(mem_table([], nregions=0xFFFFFFFF), field="nregions",
            value=0xFFFFFFFF, limit=8)


def test_nregions_disagrees_with_size() -> None:
    rejects(mem_table([region(0, 0x1000)], nregions=2), (3, 4),
            field="size", value=8 + 32, limit=8 + 64)


def test_region_of_size_zero() -> None:
    rejects(mem_table([region(0, 0)]), (3,), request="SET_MEM_TABLE",
            field="memory_size", value=0)


@pytest.mark.parametrize("field,reg", [
    ("guest_phys_addr", region(U64_MAX - 0xFFF, 0x2000)),
    ("userspace_addr", region(0, 0x2000, uaddr=U64_MAX - 0xFFF)),
    ("mmap_offset", region(0, 0x2000, off=U64_MAX)),
    ("guest_phys_addr", region(2, U64_MAX, uaddr=0)),
])
def test_region_end_past_2_64(field: str, reg: bytes) -> None:
    err = rejects(mem_table([reg]), (3,), request="SET_MEM_TABLE", field=field)
    assert "2**64" in str(err)


def test_region_ending_exactly_at_2_64_is_fine() -> None:
    msg = parse_message(mem_table([region(U64_MAX - 0xFFF, 0x1000, uaddr=0)]), (3,))
    assert msg.payload.regions[0].memory_size == 0x1000


def test_overlapping_regions() -> None:
    rejects(mem_table([region(0, 0x2000), region(0x1000, 0x1000)]), (3, 4),
            field="guest_phys_addr", value=0x1000, limit=0x2000)


def test_add_mem_reg_region_checked() -> None:
    body = struct.pack("<Q", 0) + region(0, 0)
    rejects(header(R.ADD_MEM_REG, 1, 40) + body, (3,), request="ADD_MEM_REG",
            field="memory_size")


# -- log base (DPDK CVE-2020-10722) --------------------------------------------
def test_log_base_offset_plus_size_past_2_64() -> None:
    data = header(R.SET_LOG_BASE, 1, 16) + struct.pack("<QQ", 0x2000, U64_MAX - 0xFFF)
    rejects(data, (3,), request="SET_LOG_BASE", field="mmap_offset",
            value=U64_MAX - 0xFFF)


def test_log_base_sizes() -> None:
    for size in (0, MAX_AREA_SIZE + 1, U64_MAX):
        data = header(R.SET_LOG_BASE, 1, 16) + struct.pack("<QQ", size, 0)
        rejects(data, (3,), request="SET_LOG_BASE", field="mmap_size", value=size)


def test_inflight_area_too_large() -> None:
    data = header(R.SET_INFLIGHT_FD, 1, 24) + struct.pack(
        "<QQHHI", MAX_AREA_SIZE + 1, 0, 2, 256, 0)
    rejects(data, (3,), field="mmap_size", limit=MAX_AREA_SIZE)


# -- fd counts -------------------------------------------------------------------
@pytest.mark.parametrize("request_id,payload,nfds,want", [
    (R.SET_MEM_TABLE, None, 2, 3),
    (R.SET_MEM_TABLE, None, 4, 3),
    (R.SET_LOG_BASE, struct.pack("<QQ", 8192, 0), 0, 1),
    (R.SET_LOG_BASE, struct.pack("<QQ", 8192, 0), 2, 1),
    (R.ADD_MEM_REG, struct.pack("<Q", 0) + region(0, 0x1000), 0, 1),
    (R.SET_VRING_KICK, struct.pack("<Q", 0), 0, 1),
    (R.SET_VRING_CALL, struct.pack("<Q", 1), 2, 1),
    (R.SET_VRING_ERR, struct.pack("<Q", 0x100), 1, 0),
    (R.SET_VRING_KICK, struct.pack("<Q", 0x105), 1, 0),
    (R.SET_LOG_FD, b"", 0, 1),
    (R.SET_BACKEND_REQ_FD, b"", 0, 1),
    (R.SET_INFLIGHT_FD, struct.pack("<QQHHI", 0x4000, 0, 2, 256, 0), 0, 1),
    (R.GET_FEATURES, b"", 1, 0),
    (R.SET_VRING_NUM, struct.pack("<II", 0, 256), 1, 0),
    (R.REM_MEM_REG, struct.pack("<Q", 0) + region(0, 0x1000), 2, "0..1"),
])
def test_fd_count_must_match(request_id, payload, nfds, want) -> None:
    if payload is None:
        data = mem_table([region(i << 32, 0x1000) for i in range(3)])
    else:
        data = header(request_id, 1, len(payload)) + payload
    rejects(data, tuple(range(10, 10 + nfds)), request=request_id.name,
            field="fds", value=nfds, limit=want)


def test_more_than_eight_fds() -> None:
    rejects(header(R.SET_OWNER, 1, 0), tuple(range(9)), field="fds",
            value=9, limit=8)


def test_vring_file_unknown_bits() -> None:
    rejects(u64_msg(R.SET_VRING_KICK, 0x200), (3,), request="SET_VRING_KICK",
            field="u64", value=0x200)
    rejects(u64_msg(R.SET_VRING_CALL, 1 << 40), (3,), field="u64")


def test_reply_fd_counts() -> None:
    inflight = struct.pack("<QQHHI", 0x4000, 0, 2, 256, 0)
    rejects(header(R.GET_INFLIGHT_FD, 5, 24) + inflight, (), field="fds",
            value=0, limit=1)
    rejects(header(R.GET_FEATURES, 5, 8) + bytes(8), (3,), field="fds")


# -- other payload limits ----------------------------------------------------------
def test_config_space_limits() -> None:
    body = struct.pack("<III", 0, 7, 0) + bytes(6)
    rejects(header(R.SET_CONFIG, 1, len(body)) + body, field="size", value=7, limit=6)
    body = struct.pack("<III", 200, 100, 0) + bytes(100)
    rejects(header(R.SET_CONFIG, 1, len(body)) + body, field="offset", value=200,
            limit=156)


def test_iotlb_limits() -> None:
    def iotlb(iova, size, uaddr, perm, kind) -> bytes:
        return header(R.IOTLB_MSG, 1, 32) + struct.pack(
            "<QQQBB6x", iova, size, uaddr, perm, kind)
    rejects(iotlb(0, 0x1000, 0, 3, 0), field="type", value=0)
    rejects(iotlb(0, 0x1000, 0, 3, 5), field="type", value=5)
    rejects(iotlb(0, 0x1000, 0, 4, 2), field="perm", value=4)
    rejects(iotlb(U64_MAX, 2, 0, 3, 2), field="iova")
    rejects(iotlb(0, 2, U64_MAX, 3, 2), field="uaddr")


def test_vring_addr_unknown_flags() -> None:
    data = header(R.SET_VRING_ADDR, 1, 40) + struct.pack("<IIQQQQ", 0, 2, 0, 0, 0, 0)
    rejects(data, field="flags", value=2, limit=1)


def test_error_message_names_everything() -> None:
    err = rejects(mem_table([region(0, 0x1000)] * 9), tuple(range(9)))
    text = str(err)
    assert "SET_MEM_TABLE" in text and "nregions=9" in text and "limit: 8" in text
    assert isinstance(err, ValueError)


def test_building_bad_payloads_is_refused_with_a_named_error() -> None:
    from vhostlab.protocol import MemoryRegion, VringState
    with pytest.raises(ProtocolError) as info:
        VringState(index=-1, num=0)
    assert info.value.field == "index"
    with pytest.raises(ProtocolError):
        MemoryRegion(2 ** 64, 1, 0, 0)
    with pytest.raises(ProtocolError):
        Message.make(R.SET_FEATURES, 2 ** 64)


def test_header_errors_name_a_known_request() -> None:
    err = rejects(header(R.SET_MEM_TABLE, 0x3, 0), field="flags", value=3)
    assert err.request == "SET_MEM_TABLE" and str(err).startswith("SET_MEM_TABLE:")
    err = rejects(header(99, 0x3, 0), field="flags")
    assert err.request == 99


# -- what the messages say -----------------------------------------------------------
@pytest.mark.parametrize("data, nfds, text", [
    (header(R.SET_LOG_BASE, 1, 16) + struct.pack("<QQ", 8192, 0), 0,
     "SET_LOG_BASE: fds=0: expected exactly 1 fd, got 0 (limit: 1)"),
    (header(R.SET_FEATURES, 1, 16) + bytes(15), 0,
     "SET_FEATURES: size=16: header promises 16 payload bytes but only 15 arrived "
     "(limit: 15)"),
    (u64_msg(R.SET_FEATURES, 0) + b"\0\0", 0,
     "SET_FEATURES: trailing=2: 2 bytes arrived after the 8-byte payload the header "
     "promised (limit: 0)"),
    (header(R.SET_VRING_NUM, 1, 4) + bytes(4), 0,
     "SET_VRING_NUM: size=4: expected a payload of 8 bytes, got 4 (limit: 8)"),
    (mem_table([region(i << 32, 0x1000) for i in range(3)]), 2,
     "SET_MEM_TABLE: fds=2: expected exactly 3 fds (one per memory region), got 2 "
     "(limit: 3)"),
    (u64_msg(R.SET_VRING_KICK, 0x101), 1,
     "SET_VRING_KICK: fds=1: expected exactly 0 fds (bit 8, no fd, is set), got 1 "
     "(limit: 0)"),
    (header(R.SET_OWNER, 1, 0), 9,
     "SET_OWNER: fds=9: 9 fds arrived; no message may carry more than 8 (limit: 8)"),
    (header(44, 1, 0), 0,
     "44: request=44: request id 44 is not a front-end request of the spec "
     "(known: 1..43) (limit: 1..43)"),
    (header(R.GET_FEATURES, 0xD, 0), 0,
     "GET_FEATURES: flags=13: a reply must carry flags exactly 0x5 (version 1 + reply), "
     "this one has 0xd (limit: 5)"),
    (header(R.GET_FEATURES, 1, 5000), 0,
     "GET_FEATURES: size=5000 (0x1388): header promises 5000 payload bytes; no message "
     "may be larger than 4096 (limit: 4096 (0x1000))"),
])
def test_messages_say_what_was_expected_and_what_came(data, nfds, text) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message(data, tuple(range(10, 10 + nfds)))
    assert str(info.value) == text


def test_fd_counts_can_be_left_to_the_device() -> None:
    """check_fd_count=False: a back-end that checks fds per request (and answers
    need_reply with a failure) gets the message; the hard limit of 8 stays."""
    data = header(R.SET_LOG_BASE, 9, 16) + struct.pack("<QQ", 8192, 0)
    msg = parse_message(data, (), check_fd_count=False)
    assert msg.request is R.SET_LOG_BASE and msg.fds == () and msg.need_reply
    rejects(data, ())
    with pytest.raises(ProtocolError) as info:
        parse_message(header(R.SET_OWNER, 1, 0), tuple(range(9)), check_fd_count=False)
    assert info.value.field == "fds" and info.value.value == 9
    with pytest.raises(ProtocolError) as info:        # payload rules still apply
        parse_message(u64_msg(R.SET_VRING_CALL, 0x200), (), check_fd_count=False)
    assert info.value.field == "u64"
