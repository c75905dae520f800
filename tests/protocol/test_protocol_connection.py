"""BackendConnection and FrontendConnection: framing, fds, replies, failure."""
from __future__ import annotations

import os
import socket
import struct

import pytest

from protocol_samples import SAMPLE_REQUESTS, header, sample_reply
from vhostlab.protocol import (BackendConnection, ConfigSpace, FrontendConnection,
                               InflightArea, LogArea, Message, MemoryRegion,
                               MemoryTable, ProtocolError, ProtocolFeature,
                               expected_fds,
                               Request, SingleMemoryRegion, U64, VringState,
                               parse_message)
from vhostlab.protocol.recorded import QEMU_7_2_SEQUENCE, TO_BACKEND

R = Request
P = ProtocolFeature
ALL_PROTOCOL = int(sum(P))


def requests_of_recording() -> list[Message]:
    return [m for d, m in QEMU_7_2_SEQUENCE if d == TO_BACKEND]


def with_fds(msg: Message, fds) -> Message:
    """The recorded message with as many real fds as the real one carried."""
    n = expected_fds(msg.spec.fds, msg.payload)[0]
    return Message(msg.request, msg.flags, msg.payload, fds(n))


def flags_of(data: bytes) -> int:
    return struct.unpack_from("<I", data, 4)[0]


# -- framing ------------------------------------------------------------------
def test_byte_by_byte_delivery(fds) -> None:
    msgs = [with_fds(m, fds) for m in requests_of_recording()]
    conn = BackendConnection(ALL_PROTOCOL)
    got: list[Message] = []
    for msg in msgs:
        data = msg.to_bytes()
        # fds ride on the first byte, as with sendmsg on SOCK_STREAM
        got += conn.receive_data(data[:1], msg.fds)
        for i in range(1, len(data)):
            got += conn.receive_data(data[i:i + 1])
    assert got == msgs
    assert conn.pending_fds == ()


def test_several_messages_in_one_chunk(fds) -> None:
    msgs = [Message.make(R.GET_FEATURES), Message.make(R.SET_OWNER),
            Message.make(R.SET_VRING_NUM, VringState(0, 256)),
            Message.make(R.SET_VRING_NUM, VringState(1, 256))]
    stream = b"".join(m.to_bytes() for m in msgs)
    conn = BackendConnection()
    assert conn.receive_data(stream + stream[:5]) == msgs
    assert conn.receive_data(stream[5:]) == msgs


def test_fds_belong_to_the_last_message_beginning_in_the_chunk(fds) -> None:
    # Linux ends a read at the sendmsg that carried fds, so a chunk may hold
    # fd-less messages first and the fd-carrying one last.
    addr = SAMPLE_REQUESTS[R.SET_VRING_ADDR][0]
    num = Message.make(R.SET_VRING_NUM, VringState(0, 256))
    base = Message.make(R.SET_VRING_BASE, VringState(0, 0))
    vaddr = Message.make(R.SET_VRING_ADDR, addr)
    kick = Message.make(R.SET_VRING_KICK, 0, fds(1))
    conn = BackendConnection()
    chunk = num.to_bytes() + base.to_bytes() + vaddr.to_bytes() + kick.to_bytes()
    assert conn.receive_data(chunk, kick.fds) == [num, base, vaddr, kick]


def test_fds_of_a_message_split_across_chunks(fds) -> None:
    table = MemoryTable((MemoryRegion(0, 0x1000, 0x7000, 0),
                         MemoryRegion(0x1000, 0x1000, 0x8000, 0x1000)))
    mem = Message.make(R.SET_MEM_TABLE, table, fds(2))
    owner = Message.make(R.SET_OWNER)
    call = Message.make(R.SET_VRING_CALL, 1, fds(1))
    conn = BackendConnection()
    # the tail of nothing, SET_OWNER, then the first 6 bytes of the table:
    # the fds ride with the chunk where the table's header begins
    assert conn.receive_data(owner.to_bytes() + mem.to_bytes()[:6], mem.fds) == [owner]
    assert conn.pending_fds == mem.fds
    # a chunk wholly inside the table: fds passed with it join the table too
    assert conn.receive_data(mem.to_bytes()[6:40]) == []
    assert conn.receive_data(mem.to_bytes()[40:] + call.to_bytes()[:1], call.fds) \
        == [mem]
    assert conn.pending_fds == call.fds
    assert conn.receive_data(call.to_bytes()[1:]) == [call]
    assert conn.pending_fds == ()


def test_fds_passed_mid_message_stay_with_that_message(fds) -> None:
    kick = Message.make(R.SET_VRING_KICK, 2, fds(1))
    conn = BackendConnection()
    data = kick.to_bytes()
    assert conn.receive_data(data[:4]) == []
    assert conn.receive_data(data[4:9], kick.fds) == []
    assert conn.receive_data(data[9:]) == [kick]


def test_real_socket_with_scm_rights(fds) -> None:
    """Messages sent with sendmsg+SCM_RIGHTS, read back in 7-byte pieces."""
    memfd = os.memfd_create("vhostlab-test-ram", os.MFD_CLOEXEC)
    received: list[int] = []
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.ftruncate(memfd, 0x3000)
        table = MemoryTable((MemoryRegion(0, 0x3000, 0x7F0000000000, 0),))
        sent = [Message.make(R.SET_OWNER),
                Message.make(R.SET_MEM_TABLE, table, (memfd,), need_reply=True),
                Message.make(R.SET_VRING_KICK, 1, fds(1)),
                Message.make(R.SET_VRING_CALL, 0x100),
                Message.make(R.SET_LOG_BASE, LogArea(8192, 0), fds(1))]
        for msg in sent:
            socket.send_fds(a, [msg.to_bytes()], list(msg.fds))
        a.shutdown(socket.SHUT_WR)
        conn = BackendConnection(P.LOG_SHMFD | P.REPLY_ACK)
        got: list[Message] = []
        while True:
            data, new_fds, _, _ = socket.recv_fds(b, 7, 8)
            received += new_fds
            if not data:
                break
            got += conn.receive_data(data, new_fds)
        assert [m.request for m in got] == [m.request for m in sent]
        assert [len(m.fds) for m in got] == [0, 1, 1, 0, 1]
        # the received fds are new, open descriptors of the same files
        assert os.fstat(got[1].fds[0]).st_ino == os.fstat(memfd).st_ino
        assert [m.payload for m in got] == [m.payload for m in sent]
    finally:
        for fd in received + [memfd]:
            os.close(fd)
        a.close()
        b.close()


def test_header_is_checked_before_the_payload_arrives() -> None:
    conn = BackendConnection()
    with pytest.raises(ProtocolError) as err:
        conn.receive_data(header(R.SET_CONFIG, 1, 100_000))
    assert err.value.field == "size"
    with pytest.raises(ProtocolError) as err:
        BackendConnection().receive_data(header(77, 1, 8))
    assert err.value.field == "request" and err.value.value == 77


# -- back-end replies -----------------------------------------------------------
@pytest.mark.parametrize("request_id", [
    R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_VRING_BASE, R.GET_QUEUE_NUM,
    R.GET_CONFIG, R.GET_INFLIGHT_FD, R.GET_MAX_MEM_SLOTS, R.GET_STATUS,
    R.CREATE_CRYPTO_SESSION, R.POSTCOPY_ADVISE, R.POSTCOPY_END, R.IOTLB_MSG])
def test_requests_that_always_need_a_reply(request_id: Request) -> None:
    payload, _ = SAMPLE_REQUESTS[request_id]
    assert BackendConnection().needs_reply(Message.make(request_id, payload))


@pytest.mark.parametrize("request_id", [
    R.SET_FEATURES, R.SET_OWNER, R.SET_VRING_NUM, R.SET_VRING_ADDR,
    R.SET_VRING_ENABLE, R.SET_PROTOCOL_FEATURES, R.SET_STATUS])
def test_need_reply_flag_asks_for_an_ack(request_id: Request) -> None:
    payload, _ = SAMPLE_REQUESTS[request_id]
    conn = BackendConnection(P.REPLY_ACK)
    plain = Message.make(request_id, payload)
    asking = Message.make(request_id, payload, need_reply=True)
    assert not conn.needs_reply(plain) and conn.ack(plain) == b""
    assert conn.needs_reply(asking)
    ack = conn.ack(asking, status=1)
    assert ack == header(request_id, 0x5, 8) + struct.pack("<Q", 1)
    assert parse_message(ack) == Message.make_reply(request_id, 1)


def test_set_log_base_replies_only_with_log_shmfd(fds) -> None:
    log = Message.make(R.SET_LOG_BASE, LogArea(8192, 0), fds(1))
    conn = BackendConnection(P.LOG_SHMFD | P.REPLY_ACK)
    assert not conn.needs_reply(log)
    conn.receive_data(Message.make(R.SET_PROTOCOL_FEATURES, int(P.REPLY_ACK)).to_bytes())
    assert not conn.needs_reply(log) and conn.ack(log) == b""
    conn.receive_data(Message.make(R.SET_PROTOCOL_FEATURES,
                                   int(P.LOG_SHMFD | P.REPLY_ACK)).to_bytes())
    assert conn.protocol_features == P.LOG_SHMFD | P.REPLY_ACK
    assert conn.needs_reply(log)
    assert conn.ack(log) == header(R.SET_LOG_BASE, 0x5, 8) + bytes(8)


def test_replies_carry_flags_exactly_0x5() -> None:
    conn = BackendConnection(P.REPLY_ACK)
    get = Message.make(R.GET_VRING_BASE, VringState(1, 0), need_reply=True)
    assert get.flags == 0x9
    data = conn.reply(get, VringState(1, 42))
    assert flags_of(data) == 0x5
    assert data == header(R.GET_VRING_BASE, 5, 8) + struct.pack("<II", 1, 42)
    # a data reply is the answer; ack() adds nothing beside it
    assert conn.ack(get) == b""
    with pytest.raises(TypeError):
        conn.reply(get, U64(42))


def test_reply_for_every_request_parses(fds) -> None:
    conn = BackendConnection()
    for request_id, (payload, _) in SAMPLE_REQUESTS.items():
        reply_payload, nfds = sample_reply(request_id)
        data = conn.reply(Message.make(request_id, payload), reply_payload)
        assert parse_message(data, fds(nfds)).payload == reply_payload


def test_postcopy_memory_tables_are_answered(fds) -> None:
    conn = BackendConnection(P.PAGEFAULT)
    table = MemoryTable((MemoryRegion(0, 0x1000, 0x7000, 0),))
    mem = Message.make(R.SET_MEM_TABLE, table, fds(1))
    add = Message.make(R.ADD_MEM_REG, SingleMemoryRegion(table.regions[0]), fds(1))
    assert not conn.needs_reply(mem)
    listen, = conn.receive_data(Message.make(R.POSTCOPY_LISTEN).to_bytes())
    assert not conn.postcopy_listening          # parsed, not yet carried out
    conn.handled(listen, ok=False)              # refused: nothing changes
    assert not conn.postcopy_listening and not conn.needs_reply(mem)
    conn.handled(listen, ok=True)
    assert conn.postcopy_listening
    assert conn.needs_reply(mem) and conn.needs_reply(add)
    assert conn.ack(mem) == b""  # the answer is the table, via reply()
    mapped = MemoryTable((MemoryRegion(0, 0x1000, 0x7FFF0000, 0),))
    assert parse_message(conn.reply(mem, mapped)).payload == mapped
    # QEMU's acknowledgement (a u64 0, i.e. an empty table) needs no answer
    assert not conn.needs_reply(Message.make(R.SET_MEM_TABLE, MemoryTable(())))
    end, = conn.receive_data(Message.make(R.POSTCOPY_END).to_bytes())
    conn.handled(end, ok=True)
    assert not conn.postcopy_listening and not conn.needs_reply(mem)


def test_fds_are_counted_while_a_message_is_incomplete(fds) -> None:
    """A peer sending fds with every byte of an unfinished message is refused
    as soon as more than VHOST_USER_MAX_FDS wait for it, not once it is whole."""
    conn = BackendConnection()
    head = Message.make(R.SET_CONFIG, ConfigSpace(0, 4, 0, bytes(4))).to_bytes()[:13]
    conn.receive_data(head, fds(4))
    conn.receive_data(b"\0", fds(4))
    with pytest.raises(ProtocolError, match="fds=9: .* incomplete .*limit: 8"):
        conn.receive_data(b"\0", fds(1))
    assert len(conn.reset()) == 9


# -- negotiation ------------------------------------------------------------------
def test_features_are_tracked() -> None:
    conn = BackendConnection(P.MQ | P.LOG_SHMFD, offered_features=1 << 26 | 1 << 30)
    conn.receive_data(Message.make(R.SET_PROTOCOL_FEATURES, int(P.LOG_SHMFD)).to_bytes()
                      + Message.make(R.SET_FEATURES, 1 << 30).to_bytes())
    assert conn.protocol_features == P.LOG_SHMFD
    assert int(conn.features) == 1 << 30


def test_unoffered_protocol_features_fail_the_connection() -> None:
    conn = BackendConnection(P.MQ)
    with pytest.raises(ProtocolError) as err:
        conn.receive_data(Message.make(R.SET_PROTOCOL_FEATURES, int(P.MQ | P.RARP)).to_bytes())
    assert err.value.request == "SET_PROTOCOL_FEATURES" and err.value.limit == int(P.MQ)
    assert conn.failed


def test_unoffered_features_fail_when_checked() -> None:
    conn = BackendConnection(offered_features=1 << 30)
    with pytest.raises(ProtocolError) as err:
        conn.receive_data(Message.make(R.SET_FEATURES, 1 << 30 | 1 << 26).to_bytes())
    assert err.value.field == "u64"
    # without offered_features nothing is checked
    BackendConnection().receive_data(Message.make(R.SET_FEATURES, 1 << 26).to_bytes())


def test_inband_notifications_need_backend_req_and_reply_ack() -> None:
    conn = BackendConnection(ALL_PROTOCOL)
    bad = Message.make(R.SET_PROTOCOL_FEATURES, int(P.INBAND_NOTIFICATIONS | P.REPLY_ACK))
    with pytest.raises(ProtocolError, match="INBAND_NOTIFICATIONS"):
        conn.receive_data(bad.to_bytes())
    good = int(P.INBAND_NOTIFICATIONS | P.REPLY_ACK | P.BACKEND_REQ)
    conn = BackendConnection(ALL_PROTOCOL)
    conn.receive_data(Message.make(R.SET_PROTOCOL_FEATURES, good).to_bytes())
    assert conn.protocol_features == good


# -- failed state --------------------------------------------------------------------
def test_failed_state_and_reset(fds) -> None:
    conn = BackendConnection()
    good = Message.make(R.SET_VRING_CALL, 0, fds(1))
    partial = Message.make(R.SET_VRING_KICK, 1, fds(1))
    bad = header(R.SET_FEATURES, 1, 4) + bytes(4)
    assert conn.receive_data(good.to_bytes()[:5], good.fds) == []
    with pytest.raises(ProtocolError) as first:
        conn.receive_data(good.to_bytes()[5:] + bad)
    assert first.value.request == "SET_FEATURES" and first.value.field == "size"
    assert conn.failed and conn.error is first.value
    # the good message was lost with the failing call: its fd is handed back
    assert conn.pending_fds == good.fds
    with pytest.raises(ProtocolError, match="failed earlier"):
        conn.receive_data(partial.to_bytes(), partial.fds)
    assert conn.pending_fds == good.fds  # a refused chunk's fds stay the caller's
    assert conn.reset() == good.fds
    assert not conn.failed and conn.pending_fds == ()
    assert conn.receive_data(partial.to_bytes()[:3], partial.fds) == []
    assert conn.reset() == partial.fds
    assert conn.receive_data(partial.to_bytes(), partial.fds) == [partial]


def test_a_bad_message_keeps_its_fds_for_the_caller(fds) -> None:
    conn = BackendConnection()
    mine = fds(2)
    with pytest.raises(ProtocolError):
        conn.receive_data(Message.make(R.SET_VRING_KICK, 0).to_bytes(), mine)
    assert conn.pending_fds == mine and conn.reset() == mine


def test_backend_refuses_replies() -> None:
    with pytest.raises(ProtocolError) as err:
        BackendConnection().receive_data(Message.make_reply(R.GET_FEATURES, 1).to_bytes())
    assert err.value.field == "flags" and err.value.value == 0x5


# -- front-end --------------------------------------------------------------------------
def test_frontend_waits_for_the_reply_it_asked_for() -> None:
    conn = FrontendConnection()
    assert conn.expecting_reply is None
    assert conn.send(Message.make(R.SET_OWNER)) == header(R.SET_OWNER, 1, 0)
    assert conn.expecting_reply is None
    conn.send(Message.make(R.GET_FEATURES))
    conn.send(Message.make(R.GET_VRING_BASE, VringState(0, 0)))
    assert conn.expecting_reply is R.GET_FEATURES
    reply1 = Message.make_reply(R.GET_FEATURES, 1 << 30)
    reply2 = Message.make_reply(R.GET_VRING_BASE, VringState(0, 9))
    stream = reply1.to_bytes() + reply2.to_bytes()
    assert conn.receive_data(stream[:25]) == [reply1]
    assert conn.expecting_reply is R.GET_VRING_BASE
    assert conn.receive_data(stream[25:]) == [reply2]
    assert conn.expecting_reply is None


def test_frontend_rejects_unexpected_replies() -> None:
    with pytest.raises(ProtocolError, match="nobody is waiting"):
        FrontendConnection().receive_data(Message.make_reply(R.GET_FEATURES, 1).to_bytes())
    conn = FrontendConnection()
    conn.send(Message.make(R.GET_FEATURES))
    with pytest.raises(ProtocolError) as err:
        conn.receive_data(Message.make_reply(R.GET_PROTOCOL_FEATURES, 1).to_bytes())
    assert err.value.field == "request" and err.value.value == R.GET_PROTOCOL_FEATURES
    assert conn.failed


@pytest.mark.parametrize("flags", [0x1, 0x9, 0xD, 0x6])
def test_frontend_rejects_reply_flags_other_than_0x5(flags: int) -> None:
    conn = FrontendConnection()
    conn.send(Message.make(R.GET_FEATURES))
    with pytest.raises(ProtocolError) as err:
        conn.receive_data(header(R.GET_FEATURES, flags, 8) + bytes(8))
    assert err.value.field == "flags" and err.value.value == flags


def test_frontend_expects_acks_and_log_base_replies(fds) -> None:
    conn = FrontendConnection()
    conn.send(Message.make(R.SET_PROTOCOL_FEATURES, int(P.LOG_SHMFD | P.REPLY_ACK)))
    assert conn.protocol_features == P.LOG_SHMFD | P.REPLY_ACK
    conn.send(Message.make(R.SET_VRING_NUM, VringState(0, 256), need_reply=True))
    assert conn.expecting_reply is R.SET_VRING_NUM
    conn.receive_data(Message.make_reply(R.SET_VRING_NUM, 0).to_bytes())
    conn.send(Message.make(R.SET_LOG_BASE, LogArea(8192, 0), fds(1)))
    assert conn.expecting_reply is R.SET_LOG_BASE
    # a GET_VRING_BASE-sized reply is not a u64 status
    with pytest.raises(ProtocolError) as err:
        conn.receive_data(header(R.SET_LOG_BASE, 5, 16) + bytes(16))
    assert err.value.field == "size"


def test_frontend_inflight_reply_carries_one_fd(fds) -> None:
    conn = FrontendConnection()
    conn.send(Message.make(R.GET_INFLIGHT_FD, InflightArea(0, 0, 2, 256)))
    reply = Message.make_reply(R.GET_INFLIGHT_FD, InflightArea(0x4000, 0, 2, 256))
    with pytest.raises(ProtocolError) as err:
        conn.receive_data(reply.to_bytes())
    assert err.value.field == "fds"
    conn.reset()
    conn.send(Message.make(R.GET_INFLIGHT_FD, InflightArea(0, 0, 2, 256)))
    fd = fds(1)
    assert conn.receive_data(reply.to_bytes(), fd)[0].fds == fd


def test_frontend_send_checks_like_the_backend(fds) -> None:
    conn = FrontendConnection()
    table = MemoryTable((MemoryRegion(0, 0x1000, 0x7000, 0),))
    with pytest.raises(ProtocolError) as err:
        conn.send(Message.make(R.SET_MEM_TABLE, table, need_reply=True))
    assert err.value.field == "fds"
    assert conn.expecting_reply is None and not conn.failed
    with pytest.raises(ValueError):
        conn.send(Message.make_reply(R.GET_FEATURES, 1))
    conn.send(Message.make(R.SET_MEM_TABLE, table, fds(1), need_reply=True))
    assert conn.expecting_reply is R.SET_MEM_TABLE


def test_frontend_postcopy_table_reply(fds) -> None:
    conn = FrontendConnection()
    conn.send(Message.make(R.POSTCOPY_LISTEN))
    table = MemoryTable((MemoryRegion(0, 0x1000, 0x7000, 0),))
    conn.send(Message.make(R.SET_MEM_TABLE, table, fds(1)))
    mapped = MemoryTable((MemoryRegion(0, 0x1000, 0x7FFF0000, 0),))
    got = conn.receive_data(Message.make_reply(R.SET_MEM_TABLE, mapped).to_bytes())
    assert got[0].payload == mapped
    conn.send(Message.make(R.SET_MEM_TABLE, MemoryTable(())))  # QEMU's ack
    assert conn.expecting_reply is None


def test_frontend_and_backend_talk_through_a_socket(fds) -> None:
    front = FrontendConnection()
    back = BackendConnection(P.LOG_SHMFD | P.REPLY_ACK)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    received: list[int] = []
    try:
        for recorded in requests_of_recording():
            msg = with_fds(recorded, fds)
            socket.send_fds(a, [front.send(msg)], list(msg.fds))
            data, new_fds, _, _ = socket.recv_fds(b, 4096, 8)
            received += new_fds
            (got,) = back.receive_data(data, new_fds)
            assert got.payload == msg.payload and len(got.fds) == len(msg.fds)
            if back.needs_reply(got):
                payload, _ = sample_reply(got.request) if got.request is not R.GET_VRING_BASE \
                    else (VringState(got.payload.index, 5), 0)
                out = back.reply(got, payload) if got.spec.has_data_reply \
                    else back.ack(got)
                b.sendall(out)
                (reply,) = front.receive_data(a.recv(4096))
                assert reply.request is got.request and reply.flags == 0x5
            assert front.expecting_reply is None
    finally:
        for fd in received:
            os.close(fd)
        a.close()
        b.close()


def test_backend_connection_can_leave_fd_counts_to_the_device(fds) -> None:
    conn = BackendConnection(check_fd_counts=False)
    mine = fds(2)
    kick = Message(R.SET_VRING_KICK, 0x9, U64(0), mine)       # two fds, one belongs
    (got,) = conn.receive_data(kick.to_bytes(), mine)
    assert got.fds == mine and not conn.failed and conn.pending_fds == ()
    assert conn.needs_reply(got) and conn.ack(got, 1) == \
        Message.make_reply(R.SET_VRING_KICK, U64(1)).to_bytes()


def test_fds_of_a_message_refused_after_parsing_go_back_to_the_caller(fds) -> None:
    """A request that parses but breaks the negotiation (protocol bits not offered)
    fails the connection; the fds that came with it must not be lost (found by the
    socket-level fuzz test: an fd leaked per such message)."""
    conn = BackendConnection(int(P.LOG_SHMFD), check_fd_counts=False)
    mine = fds(1)
    bad = Message(R.SET_PROTOCOL_FEATURES, 0x1, U64(int(P.REPLY_ACK)), mine)
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(bad.to_bytes(), mine)
    assert info.value.request == "SET_PROTOCOL_FEATURES" and info.value.field == "u64"
    assert conn.pending_fds == mine and conn.reset() == mine


@pytest.mark.parametrize("body", [struct.pack("<Q", 0), b""], ids=["u64", "empty"])
def test_set_log_base_reply_may_be_a_u64_or_empty(fds, body) -> None:
    """libvhost-user answers SET_LOG_BASE with a u64 0, DPDK's lib/vhost with an
    empty body; QEMU's vhost_user_set_log_base reads either. So does the front-end."""
    conn = FrontendConnection()
    conn.send(Message.make(R.SET_PROTOCOL_FEATURES, int(P.LOG_SHMFD)))
    conn.send(Message.make(R.SET_LOG_BASE, LogArea(8192, 0), fds(1)))
    assert conn.expecting_reply is R.SET_LOG_BASE
    (reply,) = conn.receive_data(header(R.SET_LOG_BASE, 0x5, len(body)) + body)
    assert reply.request is R.SET_LOG_BASE and conn.expecting_reply is None
    assert reply.payload == (U64(0) if body else None)


def test_failure_forms_of_fd_carrying_replies(fds) -> None:
    """GET_INFLIGHT_FD answered with mmap_size 0 and no fd ("no inflight buffer",
    libvhost-user's failure form), POSTCOPY_ADVISE without its userfaultfd."""
    conn = FrontendConnection()
    conn.send(Message.make(R.GET_INFLIGHT_FD, InflightArea(0, 0, 2, 256)))
    none = Message.make_reply(R.GET_INFLIGHT_FD, InflightArea(0, 0, 2, 256))
    assert conn.receive_data(none.to_bytes()) == [none]
    conn.send(Message.make(R.POSTCOPY_ADVISE))
    (advise,) = conn.receive_data(header(R.POSTCOPY_ADVISE, 0x5, 0))
    assert advise.fds == () and advise.payload is None
