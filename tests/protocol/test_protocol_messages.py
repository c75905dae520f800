"""Every message round-trips; QEMU's messages match hand-written bytes."""
from __future__ import annotations

import os

import pytest

from protocol_samples import (SAMPLE_REQUESTS, header, sample_reply)
from vhostlab.protocol import (BackendRequest, ConfigSpace, CryptoSession, Feature,
                               LogArea, Message, MemoryRegion, MemoryTable,
                               ProtocolError, Request, SharedObject, U64,
                               VringAddr, VringArea, VringState,
                               parse_backend_message, parse_message,
                               peek_header)
from vhostlab.protocol.recorded import QEMU_7_2_SEQUENCE


def test_request_ids_are_the_specs() -> None:
    assert [r.value for r in Request] == list(range(1, 44))
    assert Request.GET_FEATURES == 1 and Request.GET_STATUS == 40
    assert (Request.GET_SHARED_OBJECT, Request.SET_DEVICE_STATE_FD,
            Request.CHECK_DEVICE_STATE) == (41, 42, 43)
    assert (Request.POSTCOPY_ADVISE, Request.POSTCOPY_LISTEN,
            Request.POSTCOPY_END) == (28, 29, 30)
    assert Request.SET_BACKEND_REQ_FD == 21 and Request.VRING_KICK == 35
    assert [b.value for b in BackendRequest] == list(range(1, 9))
    assert BackendRequest.VRING_CALL == 4 and BackendRequest.SHARED_OBJECT_ADD == 6


def test_every_request_has_a_sample() -> None:
    assert set(SAMPLE_REQUESTS) == set(Request)


@pytest.mark.parametrize("request_id", list(Request), ids=lambda r: r.name)
def test_request_round_trips(request_id: Request, fds) -> None:
    payload, nfds = SAMPLE_REQUESTS[request_id]
    for need_reply in (False, True):
        msg = Message.make(request_id, payload, fds(nfds), need_reply=need_reply)
        data = msg.to_bytes()
        assert peek_header(data) == (request_id, msg.flags, len(data) - 12)
        parsed = parse_message(data, msg.fds)
        assert parsed == msg
        assert parsed.to_bytes() == data
        assert parsed.need_reply is need_reply and not parsed.is_reply
        assert parsed.size == len(data) - 12


@pytest.mark.parametrize("request_id", list(Request), ids=lambda r: r.name)
def test_reply_round_trips(request_id: Request, fds) -> None:
    payload, nfds = sample_reply(request_id)
    msg = Message.make_reply(request_id, payload, fds(nfds))
    assert msg.flags == 0x5 and msg.is_reply
    data = msg.to_bytes()
    parsed = parse_message(data, msg.fds)
    assert parsed == msg and parsed.to_bytes() == data


@pytest.mark.parametrize("request_id", list(Request), ids=lambda r: r.name)
def test_fields_are_plain_data(request_id: Request) -> None:
    payload, nfds = SAMPLE_REQUESTS[request_id]
    fields = Message.make(request_id, payload).fields()
    assert fields["request"] == request_id.name and fields["id"] == request_id

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or type(value) in (int, str, bool)
    assert plain(fields)


def test_fields_name_feature_bits_and_vring_files() -> None:
    set_features = Message.make(Request.SET_FEATURES, 1 << 26 | 1 << 32)
    assert set_features.fields()["payload"]["names"] == [
        "VHOST_F_LOG_ALL", "VIRTIO_F_VERSION_1"]
    get_proto = Message.make_reply(Request.GET_PROTOCOL_FEATURES, 0b10)
    assert get_proto.fields()["payload"]["names"] == ["LOG_SHMFD"]
    kick = Message.make(Request.SET_VRING_KICK, 0x101).fields()["payload"]
    assert kick == {"value": 0x101, "index": 1, "nofd": True}
    ack = Message.make_reply(Request.SET_MEM_TABLE, 1).fields()["payload"]
    assert ack == {"value": 1, "status": "failure"}
    table = MemoryTable((MemoryRegion(0, 0x1000, 0x7000, 0),))
    fields = Message.make(Request.SET_MEM_TABLE, table).fields()["payload"]
    assert fields == {"nregions": 1, "regions": [
        {"guest_phys_addr": 0, "memory_size": 0x1000,
         "userspace_addr": 0x7000, "mmap_offset": 0}]}


def test_make_wraps_ints_and_rejects_wrong_types() -> None:
    assert Message.make(Request.SET_FEATURES, 5).payload == U64(5)
    assert Message.make(Request.SET_FEATURES, Feature.VHOST_F_LOG_ALL).payload \
        == U64(1 << 26)
    with pytest.raises(TypeError, match="SET_VRING_NUM"):
        Message.make(Request.SET_VRING_NUM, U64(1))
    with pytest.raises(TypeError, match="GET_FEATURES"):
        Message.make(Request.GET_FEATURES, 1)
    with pytest.raises(TypeError, match="GET_VRING_BASE"):
        Message.make_reply(Request.GET_VRING_BASE, U64(1))


def test_crypto_session_keeps_any_union_size() -> None:
    for body in (bytes(624), bytes(1056), b"\x01" * 5):
        msg = Message.make(Request.CREATE_CRYPTO_SESSION, CryptoSession(9, body, -1))
        assert parse_message(msg.to_bytes()) == msg


def test_payload_padding_survives_round_trip() -> None:
    # QEMU's C structs have padding; whatever arrives there comes back out.
    data = header(Request.SET_MEM_TABLE, 1, 40) + bytes.fromhex(
        "01000000" "efbeadde"
        "0000000000000000" "0010000000000000" "0000000000700000" "0000000000000000")
    msg = parse_message(data, (3,))
    assert msg.payload.padding == 0xDEADBEEF and msg.to_bytes() == data


def test_backend_channel_messages_round_trip(fds) -> None:
    samples = [
        (BackendRequest.IOTLB_MSG, SAMPLE_REQUESTS[Request.IOTLB_MSG][0], 0),
        (BackendRequest.CONFIG_CHANGE_MSG, None, 0),
        (BackendRequest.VRING_HOST_NOTIFIER_MSG, VringArea(1, 4096, 0), 1),
        (BackendRequest.VRING_HOST_NOTIFIER_MSG, VringArea(0x101, 0, 0), 0),
        (BackendRequest.VRING_CALL, VringState(0, 0), 0),
        (BackendRequest.VRING_ERR, VringState(1, 0), 0),
        (BackendRequest.SHARED_OBJECT_ADD, SharedObject(bytes(range(16))), 0),
        (BackendRequest.SHARED_OBJECT_REMOVE, SharedObject(bytes(16)), 0),
        (BackendRequest.SHARED_OBJECT_LOOKUP, SharedObject(bytes(16)), 0),
    ]
    for request, payload, nfds in samples:
        msg = Message.make(request, payload, fds(nfds), need_reply=True)
        assert parse_backend_message(msg.to_bytes(), msg.fds) == msg
    reply = Message.make_reply(BackendRequest.SHARED_OBJECT_LOOKUP, 0, fds(1))
    assert parse_backend_message(reply.to_bytes(), reply.fds) == reply
    with pytest.raises(ProtocolError) as err:
        parse_backend_message(header(9, 1, 0))
    assert err.value.field == "request" and err.value.value == 9


def test_parse_never_closes_fds(fds) -> None:
    mine = fds(2)
    with pytest.raises(ProtocolError):
        parse_message(header(Request.SET_LOG_FD, 1, 0), mine)
    parse_message(header(Request.SET_LOG_FD, 1, 0), mine[:1])
    for fd in mine:
        os.fstat(fd)  # still open


# -- golden bytes: hand-written from the vhost-user.rst layouts ------------
# header = u32 request | u32 flags | u32 size, little endian.

def hx(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def recorded(request: Request, n: int = 0, reply: bool = False) -> Message:
    """The n-th recorded request (or reply) of this kind."""
    return [m for _, m in QEMU_7_2_SEQUENCE
            if m.request is request and m.is_reply is reply][n]


def test_golden_get_features() -> None:
    data = hx("01000000 01000000 00000000")
    assert Message.make(Request.GET_FEATURES).to_bytes() == data
    assert parse_message(data) == recorded(Request.GET_FEATURES)
    reply = hx("01000000 05000000 08000000 00000044 00000000")
    assert parse_message(reply).payload == U64(1 << 26 | 1 << 30)
    assert recorded(Request.GET_FEATURES, reply=True).to_bytes() == reply


def test_golden_set_features_with_log_all() -> None:
    # bit 30 VHOST_USER_F_PROTOCOL_FEATURES | bit 26 VHOST_F_LOG_ALL,
    # need_reply (0x8) set because REPLY_ACK is negotiated.
    data = hx("02000000 09000000 08000000 00000044 00000000")
    msg = parse_message(data)
    assert msg.payload.value & Feature.VHOST_F_LOG_ALL and msg.need_reply
    assert recorded(Request.SET_FEATURES, 1).to_bytes() == data


def test_golden_set_mem_table_three_regions(fds) -> None:
    data = hx("""
        05000000 09000000 68000000   03000000 00000000
        0000000000000000 00000c0000000000 00000000007f0000 0000000000000000
        00000e0000000000 0000010000000000 00000e00007f0000 00000e0000000000
        0000100000000000 0000f00f00000000 00001000007f0000 0000100000000000
    """)
    msg = parse_message(data, fds(3))
    regions = msg.payload.regions
    assert [(r.guest_phys_addr, r.memory_size) for r in regions] == [
        (0x0, 0xC0000), (0xE0000, 0x10000), (0x100000, 0xFF00000)]
    assert regions[2].userspace_addr == 0x7F0000100000
    assert regions[1].mmap_offset == 0xE0000
    assert recorded(Request.SET_MEM_TABLE).to_bytes() == data
    ack = hx("05000000 05000000 08000000 0000000000000000")
    assert parse_message(ack) == Message.make_reply(Request.SET_MEM_TABLE, 0)


def test_golden_set_log_base(fds) -> None:
    data = hx("06000000 01000000 10000000 0020000000000000 0000000000000000")
    fd = fds(1)
    msg = parse_message(data, fd)
    assert msg.payload == LogArea(mmap_size=8192, mmap_offset=0) and msg.fds == fd
    assert recorded(Request.SET_LOG_BASE).to_bytes() == data


def test_golden_set_vring_addr_with_log_flag() -> None:
    data = hx("""
        09000000 09000000 28000000
        01000000 01000000
        00002100007f0000 00202100007f0000 00102100007f0000 0020210000000000
    """)
    msg = parse_message(data)
    assert msg.payload == VringAddr(
        index=1, flags=1, desc_user_addr=0x7F0000210000,
        used_user_addr=0x7F0000212000, avail_user_addr=0x7F0000211000,
        log_guest_addr=0x212000)
    assert msg.payload.log_enabled
    assert recorded(Request.SET_VRING_ADDR, 3).to_bytes() == data


def test_golden_get_vring_base_and_reply() -> None:
    request = hx("0b000000 01000000 08000000 01000000 00000000")
    reply = hx("0b000000 05000000 08000000 01000000 03000000")
    assert parse_message(request).payload == VringState(index=1, num=0)
    assert parse_message(reply) == Message.make_reply(
        Request.GET_VRING_BASE, VringState(index=1, num=3))
    assert recorded(Request.GET_VRING_BASE, 1).to_bytes() == request
    assert recorded(Request.GET_VRING_BASE, 1, reply=True).to_bytes() == reply


def test_golden_vring_kick_with_and_without_fd(fds) -> None:
    with_fd = hx("0c000000 01000000 08000000 0100000000000000")
    no_fd = hx("0c000000 01000000 08000000 0101000000000000")
    assert parse_message(with_fd, fds(1)).payload.vring_index == 1
    msg = parse_message(no_fd)
    assert msg.payload.vring_nofd and msg.fds == ()


def test_golden_get_config() -> None:
    data = hx("18000000 01000000 12000000 00000000 06000000 00000000 000000000000")
    assert parse_message(data).payload == ConfigSpace(0, 6, 0, bytes(6))
