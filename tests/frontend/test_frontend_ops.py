"""Every VhostOps op against the real back-end over a real unix socket.

Each op's message is checked twice: in the front-end's trace (what it sent
and what came back) and in the back-end's trace (what arrived, byte for
byte). Ops vhost-user lacks, and ops whose protocol feature this back-end
does not offer, raise their named error and send nothing.
"""
from __future__ import annotations

import os

import pytest

from vhostlab.backend import BackendServer, is_rarp
from vhostlab.dirtylog import DirtyLog
from vhostlab.frontend import (VHOST_OPS_TABLE, BackendReplyError, CaptureWire,
                               NotSupportedByVhostUser, ProtocolFeatureMissing, VhostOpsError,
                               VhostOps, op_info)
from vhostlab.frontend.frames import GUEST_MAC
from vhostlab.memory import GuestMemory
from vhostlab.protocol import TO_BACKEND, TO_FRONTEND, VHOST_IOTLB_UPDATE, Feature, ProtocolFeature
from vhostlab.ring.layout import vring_layout

RAM = 8 << 20


@pytest.fixture
def server():
    wire = CaptureWire()
    srv = BackendServer(None, wire=wire).start()
    srv.capture = wire
    yield srv
    srv.stop()


@pytest.fixture
def ops(server):
    ops = VhostOps.connect(server.socket_path, timeout=5.0)
    yield ops
    ops.channel.close()


@pytest.fixture
def memory():
    mem = GuestMemory.allocate(RAM)
    yield mem
    mem.close()


def _backend_in(server, since: int):
    return [r for r in server.trace.records(since) if r.direction == TO_BACKEND]


class Watch:
    """Run one op; return the records it added to each side's trace."""

    def __init__(self, ops, server):
        self.ops, self.server = ops, server

    def __call__(self, fn, *args, **kwargs):
        fe0 = len(self.ops.trace.records())
        be0 = self.server.trace.records()[-1].seq if len(self.server.trace) else 0
        result = fn(*args, **kwargs)
        fe = self.ops.trace.records()[fe0:]
        # the back-end handles in its own thread: wait until it recorded as many
        sent = [r for r in fe if r.direction == TO_BACKEND]
        self.server.wait_for(lambda s: len(_backend_in(self.server, be0)) >= len(sent), 5.0)
        return result, fe, _backend_in(self.server, be0)


def _check_same_bytes(fe, be):
    sent = [r for r in fe if r.direction == TO_BACKEND]
    assert [r.raw for r in sent] == [r.raw for r in be]
    assert [r.nfds for r in sent] == [r.nfds for r in be]
    return sent


def _requests(records):
    return [r.request for r in records]


def test_backend_init_negotiates_like_qemu(ops, server):
    watch = Watch(ops, server)
    got, fe, be = watch(ops.vhost_backend_init)
    sent = _check_same_bytes(fe, be)
    assert _requests(sent) == ["GET_FEATURES", "GET_PROTOCOL_FEATURES",
                               "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM"]
    assert _requests(fe) == ["GET_FEATURES", "GET_FEATURES", "GET_PROTOCOL_FEATURES",
                             "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
                             "GET_QUEUE_NUM", "GET_QUEUE_NUM"]
    offered = server.device.offered_protocol_features
    assert got["protocol_features"] == offered & ops.protocol_features_mask
    # CONFIGURE_MEM_SLOTS and STATUS are offered but left out: SET_MEM_TABLE stays.
    assert offered & ProtocolFeature.CONFIGURE_MEM_SLOTS
    assert not got["protocol_features"] & ProtocolFeature.CONFIGURE_MEM_SLOTS
    assert sent[2].fields["payload"]["value"] == got["protocol_features"]
    assert got["features"] == server.device.offered_features
    assert ops.migration_blocker is None
    assert got["max_queues"] == 1


def test_every_op_the_backend_serves(ops, server, memory):
    watch = Watch(ops, server)
    ops.vhost_backend_init()

    def one(name, *args, expect, **kwargs):
        result, fe, be = watch(getattr(ops, name), *args, **kwargs)
        sent = _check_same_bytes(fe, be)
        assert _requests(sent) == expect, name
        assert set(expect) <= set(op_info(name).messages) | {"GET_FEATURES"}
        return result, sent, fe

    one("vhost_set_owner", expect=["SET_OWNER"])
    features, _, _ = one("vhost_get_features", expect=["GET_FEATURES"])
    assert features & Feature.VHOST_F_LOG_ALL

    acked = features & int(Feature.VIRTIO_F_VERSION_1 | Feature.VIRTIO_NET_F_MAC)
    _, sent, fe = one("vhost_set_features", acked, expect=["SET_FEATURES"])
    assert sent[0].fields["payload"]["value"] == acked | int(Feature.VHOST_USER_F_PROTOCOL_FEATURES)
    assert server.device.features == sent[0].fields["payload"]["value"]

    _, sent, fe = one("vhost_set_mem_table", memory, expect=["SET_MEM_TABLE"])
    assert sent[0].nfds == 3 and sent[0].fields["need_reply"]          # REPLY_ACK
    assert fe[-1].direction == TO_FRONTEND and fe[-1].fields["payload"]["value"] == 0
    regions = sent[0].fields["payload"]["regions"]
    assert [(r["guest_phys_addr"], r["memory_size"]) for r in regions] == [
        (0x0, 0xC0000), (0xE0000, 0x10000), (0x100000, RAM - 0x100000)]

    lay = vring_layout(0x200000, 256)
    uva = memory.gpa_to_uva
    for idx in (0, 1):
        one("vhost_set_vring_num", idx, 256, expect=["SET_VRING_NUM"])
        one("vhost_set_vring_base", idx, 0, expect=["SET_VRING_BASE"])
        lay = vring_layout(0x200000 + idx * 0x10000, 256)
        _, sent, _ = one("vhost_set_vring_addr", idx, uva(lay.desc), uva(lay.used),
                         uva(lay.avail), lay.used, expect=["SET_VRING_ADDR"])
        assert sent[0].fields["payload"]["log_guest_addr"] == lay.used
    kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        for idx in (0, 1):
            _, sent, _ = one("vhost_set_vring_kick", idx, kick, expect=["SET_VRING_KICK"])
            assert sent[0].nfds == 1
            one("vhost_set_vring_call", idx, call, expect=["SET_VRING_CALL"])
        _, sent, _ = one("vhost_set_vring_enable", True,
                         expect=["SET_VRING_ENABLE", "SET_VRING_ENABLE"])
        assert [r.fields["payload"] for r in sent] == [{"index": 0, "num": 1},
                                                       {"index": 1, "num": 1}]
        assert server.wait_for(lambda s: all(v.enabled and v.started for v in s.vrings), 5)

        log = DirtyLog.allocate(memory)
        try:
            _, sent, fe = one("vhost_set_log_base", log, expect=["SET_LOG_BASE"])
            assert sent[0].fields["payload"] == {"mmap_size": log.size, "mmap_offset": 0}
            assert sent[0].nfds == 1 and fe[-1].direction == TO_FRONTEND      # LOG_SHMFD reply
            _, sent, _ = one("vhost_set_features", acked | int(Feature.VHOST_F_LOG_ALL),
                             expect=["SET_FEATURES"])
            assert "VHOST_F_LOG_ALL" in sent[0].fields["payload"]["names"]
            assert sent[0].fields["need_reply"]          # QEMU waits when logging starts
            assert server.snapshot(trace=False).logging
        finally:
            log.close()

        base, sent, fe = one("vhost_get_vring_base", 1, expect=["GET_VRING_BASE"])
        assert base == 0 and fe[-1].fields["payload"] == {"index": 1, "num": 0}
    finally:
        os.close(kick)
        os.close(call)

    _, sent, _ = one("vhost_net_set_mtu", 1400, expect=["NET_SET_MTU"])
    assert server.wait_for(lambda s: s.mtu == 1400, 5)

    config, _, fe = one("vhost_get_config", 6, expect=["GET_CONFIG"])
    assert config == server.device.mac
    one("vhost_set_config", GUEST_MAC, expect=["SET_CONFIG"])
    config, _, _ = one("vhost_get_config", 6, expect=["GET_CONFIG"])
    assert config == GUEST_MAC

    sent_rarp, _, _ = one("vhost_migration_done", GUEST_MAC, expect=["SEND_RARP"])
    assert sent_rarp
    assert server.wait_for(lambda s: s.counters["rarp_sent"] == 1, 5)
    rarp = server.capture.captured[-1]
    assert is_rarp(rarp) and rarp[6:12] == GUEST_MAC

    one("vhost_reset_device", expect=["RESET_DEVICE"])


def test_iotlb_msg_is_sent_and_its_refusal_named(ops, server):
    watch = Watch(ops, server)
    ops.vhost_backend_init()
    with pytest.raises(BackendReplyError, match="IOTLB_MSG") as info:
        watch(ops.vhost_send_device_iotlb_msg, 0x1000, 0x1000, 0x7F0000000000, 3,
              VHOST_IOTLB_UPDATE)
    assert info.value.value != 0
    out = [r for r in ops.trace.records() if r.direction == TO_BACKEND]
    assert out[-1].request == "IOTLB_MSG" and out[-1].fields["need_reply"]
    assert _backend_in(server, 0)[-1].request == "IOTLB_MSG"


def test_ops_vhost_user_lacks_raise_and_send_nothing(ops, server):
    ops.vhost_backend_init()
    before = len(ops.trace.records())
    calls = {
        "vhost_net_set_backend": (0, 3), "vhost_scsi_set_endpoint": (None,),
        "vhost_scsi_clear_endpoint": (None,), "vhost_scsi_get_abi_version": (),
        "vhost_set_vring_busyloop_timeout": (0, 50), "vhost_vsock_set_guest_cid": (3,),
        "vhost_vsock_set_running": (True,),
    }
    lacking = [i.name for i in VHOST_OPS_TABLE if not i.user]
    assert sorted(calls) == sorted(lacking)
    for name, args in calls.items():
        with pytest.raises(NotSupportedByVhostUser) as info:
            getattr(ops, name)(*args)
        assert info.value.kernel_ioctl in str(info.value) and name in str(info.value)
    # The back-end offers neither CRYPTO_SESSION (crypto devices) nor CROSS_ENDIAN.
    for name, args in {"vhost_crypto_create_session": (1, b"\0" * 16),
                       "vhost_crypto_close_session": (7,),
                       "vhost_set_vring_endian": (0, True)}.items():
        with pytest.raises(ProtocolFeatureMissing) as info:
            getattr(ops, name)(*args)
        assert info.value.request in op_info(name).messages
    assert len(ops.trace.records()) == before
    assert ops.ops_called[-10:] == list(calls) + ["vhost_crypto_create_session",
                                                   "vhost_crypto_close_session",
                                                   "vhost_set_vring_endian"]


def test_local_ops_answer_without_a_message(ops, server, memory):
    ops.vhost_backend_init()
    ops.vhost_set_mem_table(memory)
    before = len(ops.trace.records())
    assert ops.vhost_backend_memslots_limit() == 8
    assert ops.vhost_get_vq_index(1) == 1
    with pytest.raises(VhostOpsError, match="queue 2"):
        ops.vhost_get_vq_index(2)
    assert ops.vhost_requires_shm_log() is True
    low, high = memory.regions[0], memory.regions[2]
    assert ops.vhost_backend_can_merge(low.userspace_addr, 0x1000, high.userspace_addr, 0x1000)
    other = GuestMemory.allocate(2 << 20)
    try:
        assert not ops.vhost_backend_can_merge(low.userspace_addr, 0x1000,
                                               other.regions[2].userspace_addr, 0x1000)
    finally:
        other.close()
    assert ops.vhost_set_iotlb_callback(True) is None
    assert len(ops.trace.records()) == before


def test_cleanup_closes_the_socket_and_the_backend_sees_it(ops, server):
    ops.vhost_backend_init()
    assert server.wait_for(lambda s: s.connected, 5)
    ops.vhost_backend_cleanup()
    assert server.wait_for(lambda s: not s.connected, 5)
    assert ops.ops_called == ["vhost_backend_init", "vhost_backend_cleanup"]
