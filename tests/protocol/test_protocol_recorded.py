"""The recorded QEMU 7.2 conversation: what the project's notes say QEMU
sent, and consistent with the connection rules."""
from __future__ import annotations

import os
import socket

from vhostlab.protocol import (BackendConnection, Feature,
                               FrontendConnection, LogArea, Message,
                               ProtocolFeature, Request, VHOST_VRING_F_LOG,
                               parse_message)
from vhostlab.protocol.recorded import (OFFERED_FEATURES,
                                        OFFERED_PROTOCOL_FEATURES,
                                        QEMU_7_2_PHASES, QEMU_7_2_SEQUENCE,
                                        TO_BACKEND, TO_FRONTEND)

R = Request


def names(entries, direction=TO_BACKEND) -> list[str]:
    return [m.request.name for d, m in entries if d == direction]


def test_phases_follow_the_observed_order() -> None:
    phases = dict(QEMU_7_2_PHASES)
    assert list(phases) == ["start-up", "DRIVER_OK: vhost_dev_start",
                            "migrate: vhost_log_global_start",
                            "switch-over: vhost_dev_stop"]
    assert names(phases["start-up"]) == [
        "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
        "SET_OWNER", "GET_FEATURES",
        "SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_CALL", "SET_VRING_ERR",
        "SET_VRING_ENABLE", "SET_VRING_ENABLE"]
    per_queue = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR",
                 "SET_VRING_KICK", "SET_VRING_CALL"]
    assert names(phases["DRIVER_OK: vhost_dev_start"]) == [
        "SET_FEATURES", "SET_MEM_TABLE"] + per_queue * 2
    assert names(phases["migrate: vhost_log_global_start"]) == [
        "SET_LOG_BASE", "SET_FEATURES", "SET_VRING_ADDR", "SET_VRING_ADDR"]
    assert names(phases["switch-over: vhost_dev_stop"]) == ["GET_VRING_BASE"] * 2
    assert QEMU_7_2_SEQUENCE == tuple(e for _, es in QEMU_7_2_PHASES for e in es)


def test_observed_values() -> None:
    by_request = {}
    for direction, msg in QEMU_7_2_SEQUENCE:
        if direction == TO_BACKEND:
            by_request.setdefault(msg.request, []).append(msg)
    (mem,) = by_request[R.SET_MEM_TABLE]
    assert [(r.guest_phys_addr, r.memory_size) for r in mem.payload.regions] == [
        (0x0, 0xC0000), (0xE0000, 0x10000), (0x100000, 0xFF00000)]
    assert mem.need_reply  # REPLY_ACK is negotiated
    (log,) = by_request[R.SET_LOG_BASE]
    assert log.payload == LogArea(mmap_size=8192, mmap_offset=0)
    # 8192 bytes = one bit per 4 KiB page of 256 MiB
    assert log.payload.mmap_size * 8 * 4096 == 256 << 20
    before, during = (m.payload.value for m in by_request[R.SET_FEATURES])
    assert not before & Feature.VHOST_F_LOG_ALL and during & Feature.VHOST_F_LOG_ALL
    addrs = by_request[R.SET_VRING_ADDR]
    assert [a.payload.flags for a in addrs] == [0, 0, VHOST_VRING_F_LOG, VHOST_VRING_F_LOG]
    for a in addrs:  # log holds the used ring's guest-physical address
        assert a.payload.used_user_addr - a.payload.log_guest_addr == \
            mem.payload.regions[2].userspace_addr - mem.payload.regions[2].guest_phys_addr
    assert OFFERED_FEATURES & Feature.VHOST_F_LOG_ALL
    assert OFFERED_PROTOCOL_FEATURES & ProtocolFeature.LOG_SHMFD


def test_recording_holds_no_fds_but_knows_how_many() -> None:
    counts = {(m.request, m.is_reply): e.nfds for e in QEMU_7_2_SEQUENCE
              for m in [e.message]}
    assert all(e.message.fds == () for e in QEMU_7_2_SEQUENCE)
    assert counts[(R.SET_MEM_TABLE, False)] == 3
    assert counts[(R.SET_LOG_BASE, False)] == 1
    assert counts[(R.SET_VRING_KICK, False)] == 1
    assert counts[(R.GET_FEATURES, False)] == 0


def test_replay_through_both_connections_over_a_socket() -> None:
    """QEMU's side (FrontendConnection) and a back-end (BackendConnection)
    exchange the recording over a real socket with real fds; every
    recorded reply is exactly what the back-end's rules produce."""
    back = BackendConnection(OFFERED_PROTOCOL_FEATURES,
                             offered_features=OFFERED_FEATURES)
    front = FrontendConnection()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    opened: list[int] = []
    try:
        entries = list(QEMU_7_2_SEQUENCE)
        for i, (direction, recorded) in enumerate(entries):
            if direction == TO_FRONTEND:
                continue
            fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(entries[i].nfds)]
            opened += fds
            msg = Message(recorded.request, recorded.flags, recorded.payload, tuple(fds))
            socket.send_fds(a, [front.send(msg)], fds)
            data, got_fds, _, _ = socket.recv_fds(b, 4096, 8)
            opened += got_fds
            (got,) = back.receive_data(data, got_fds)
            assert got.payload == recorded.payload and len(got.fds) == len(fds)
            nxt = entries[i + 1] if i + 1 < len(entries) else None
            expects = nxt is not None and nxt.direction == TO_FRONTEND
            assert back.needs_reply(got) is expects, got.request.name
            if not expects:
                assert back.ack(got) == b"" and front.expecting_reply is None
                continue
            answer = nxt.message.payload
            out = back.reply(got, answer) if got.spec.has_data_reply \
                else back.ack(got, answer.value)
            assert out == nxt.message.to_bytes()
            b.sendall(out)
            (reply,) = front.receive_data(a.recv(4096))
            assert reply == nxt.message == parse_message(out)
        assert front.expecting_reply is None
        assert front.protocol_features == back.protocol_features == OFFERED_PROTOCOL_FEATURES
        assert back.features & Feature.VHOST_F_LOG_ALL
    finally:
        for fd in opened:
            os.close(fd)
        a.close()
        b.close()
