"""Reading back-end traces and checking frames, without QEMU.

The records come from the back-end's own MessageTrace with fields decoded by
the protocol layer from real message bytes, as the migration code sees them.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from vhostlab.backend import MessageTrace
from vhostlab.protocol import TO_BACKEND, TO_FRONTEND, U64, LogArea, Message, Request, VringState
from vhostlab.qemu import (FROM_GUEST, TO_GUEST, CaptureWire, FrameLedger, PrecopyRound,
                           frame_tag, ops_called, vring_bases)
from vhostlab.qemu.traffic import is_rarp
from vhostlab.ring import FrameArena

LOG_ALL = 1 << 26


def _record(trace: MessageTrace, direction: str, request: Request, payload=None,
            connection: int = 1) -> None:
    """What the back-end records: TO_BACKEND a request from QEMU, TO_FRONTEND its reply."""
    msg = Message.make(request, payload) if direction == TO_BACKEND else \
        Message.make_reply(request, payload)
    trace.record(direction, request.name, msg.fields(), msg.to_bytes(), 0, connection)


def _startup(trace: MessageTrace, connection: int = 1) -> None:
    for req, payload in ((Request.GET_FEATURES, None), (Request.GET_PROTOCOL_FEATURES, None),
                         (Request.SET_PROTOCOL_FEATURES, U64(0x3)),
                         (Request.GET_QUEUE_NUM, None), (Request.SET_OWNER, None),
                         (Request.GET_FEATURES, None)):
        _record(trace, TO_BACKEND, req, payload, connection)


def test_ops_called_names_the_ops_qemu_invoked():
    src = MessageTrace()
    _startup(src)
    _record(src, TO_BACKEND, Request.SET_LOG_BASE, LogArea(4096, 0))
    _record(src, TO_BACKEND, Request.SET_FEATURES, U64(LOG_ALL))
    _record(src, TO_BACKEND, Request.GET_STATUS)          # vhost_user_set_features adds FEATURES_OK
    _record(src, TO_BACKEND, Request.SET_STATUS, U64(8))
    for i in range(2):
        _record(src, TO_BACKEND, Request.GET_VRING_BASE, VringState(i, 0))
    _record(src, TO_FRONTEND, Request.GET_VRING_BASE, VringState(0, 96))   # replies do not count
    assert ops_called(src.records()) == [
        "vhost_backend_init", "vhost_set_owner", "vhost_get_features", "vhost_set_log_base",
        "vhost_set_features", "vhost_get_vring_base", "vhost_get_vring_base"]


def test_ops_called_merges_two_back_ends_in_time_order():
    src, dst = MessageTrace(), MessageTrace()
    _startup(src)
    _startup(dst)                                   # the destination connects later
    _record(src, TO_BACKEND, Request.GET_VRING_BASE, VringState(0, 0))
    _record(dst, TO_BACKEND, Request.SET_VRING_BASE, VringState(0, 7))
    _record(dst, TO_BACKEND, Request.SEND_RARP, U64(0x563412005452))
    ops = ops_called(src.records(), dst.records())
    assert ops.count("vhost_backend_init") == 2
    assert ops[-3:] == ["vhost_get_vring_base", "vhost_set_vring_base", "vhost_migration_done"]


def test_vring_bases_reads_replies_and_requests():
    src, dst = MessageTrace(), MessageTrace()
    _record(src, TO_BACKEND, Request.SET_VRING_BASE, VringState(0, 0))       # start-up
    _record(src, TO_BACKEND, Request.GET_VRING_BASE, VringState(0, 0))
    _record(src, TO_FRONTEND, Request.GET_VRING_BASE, VringState(0, 96))
    _record(src, TO_FRONTEND, Request.GET_VRING_BASE, VringState(1, 56))
    _record(dst, TO_BACKEND, Request.SET_VRING_BASE, VringState(0, 96))
    _record(dst, TO_BACKEND, Request.SET_VRING_BASE, VringState(1, 55))
    assert vring_bases(src.records(), "GET_VRING_BASE") == {0: 96, 1: 56}
    assert vring_bases(dst.records(), "SET_VRING_BASE") == {0: 96, 1: 55}


def test_ledger_tells_delivered_lost_corrupted_and_duplicated():
    ledger = FrameLedger(TO_GUEST)
    frames = [ledger.make(n) for n in (60, 61, 1000, 1514)]
    assert frame_tag(frames[2]) == (TO_GUEST, 2)
    assert ledger.arrive(frames[0]) and ledger.arrive(frames[0])       # twice
    assert ledger.arrive(frames[1])
    bad = bytearray(frames[2])
    bad[-1] ^= 0xFF
    assert not ledger.arrive(bytes(bad))                                # one byte off
    assert not ledger.arrive(FrameLedger(FROM_GUEST).make(100))        # other direction
    assert ledger.summary() == {"sent": 4, "delivered": 2, "lost": 2, "corrupted": 2,
                                "duplicated": 1}
    with pytest.raises(ValueError, match="frame length 59"):
        ledger.make(59)
    # Frames that never entered the path (a stopped source back-end kept them)
    # count neither as sent nor as lost; frames of the other direction are ignored.
    ledger.withdraw([frames[3], FrameLedger(FROM_GUEST).make(100)])
    assert ledger.summary() == {"sent": 3, "delivered": 2, "lost": 1, "corrupted": 2,
                                "duplicated": 1}


def test_capture_wire_keeps_frames_and_rarp_is_recognised():
    from vhostlab.backend import rarp_frame
    wire = CaptureWire()
    frames = [FrameLedger(FROM_GUEST).make(80), rarp_frame(bytes.fromhex("525400123456"))]
    wire.send(FrameArena.from_frames(frames), 0)
    got = wire.take()
    assert got == frames and wire.take() == []
    assert [is_rarp(f) for f in got] == [False, True]


def test_round_snapshot_lists_logged_pages():
    bitmap = np.zeros(16, np.uint8)
    bitmap[0], bitmap[3] = 0b101, 0x80                                  # pages 0, 2, 31
    snap = PrecopyRound(round=2, dirty_sync_count=3, time=0.5, status="active",
                         transferred=1, remaining=2, dirty_pages_rate=3,
                         log_bitmap=bitmap.tobytes(), pages_logged=3, syncs=(2, 3))
    assert list(snap.logged_pages()) == [0, 2, 31]
    summary = snap.summary()
    assert "log_bitmap" not in summary and summary["syncs"] == [2, 3]
    assert json.loads(json.dumps(summary)) == summary
