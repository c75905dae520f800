"""The package's __all__ and its modules agree; the table covers everything."""
from __future__ import annotations

import importlib

import vhostlab.protocol as protocol
from vhostlab.protocol import (BACKEND_REQUESTS, FEATURE_MEANING,
                               PROTOCOL_FEATURE_MEANING, REQUESTS,
                               BackendRequest, Feature, ProtocolFeature,
                               Request, describe, describe_mask,
                               feature_names)

MODULES = ["connection", "constants", "errors", "features", "lines", "message",
           "payloads", "requests"]


def test_all_matches_the_modules() -> None:
    exported = set(protocol.__all__)
    from_modules = set()
    for name in MODULES:
        module = importlib.import_module(f"vhostlab.protocol.{name}")
        from_modules |= set(module.__all__)
        for public in module.__all__:
            assert getattr(protocol, public) is getattr(module, public), public
    assert exported == from_modules
    assert len(protocol.__all__) == len(exported)


def test_recorded_module_exports() -> None:
    recorded = importlib.import_module("vhostlab.protocol.recorded")
    for name in recorded.__all__:
        assert hasattr(recorded, name)


def test_every_request_is_in_the_table() -> None:
    assert set(REQUESTS) == set(Request)
    assert set(BACKEND_REQUESTS) == set(BackendRequest)
    for spec in list(REQUESTS.values()) + list(BACKEND_REQUESTS.values()):
        assert spec.doc and spec.payload and spec.reply_payload


def test_feature_bits_and_meanings() -> None:
    F, P = Feature, ProtocolFeature
    assert (F.VIRTIO_NET_F_MTU, F.VIRTIO_NET_F_MAC, F.VIRTIO_NET_F_MRG_RXBUF,
            F.VIRTIO_NET_F_STATUS, F.VIRTIO_NET_F_CTRL_VQ,
            F.VIRTIO_NET_F_GUEST_ANNOUNCE, F.VIRTIO_NET_F_MQ) == tuple(
        1 << b for b in (3, 5, 15, 16, 17, 21, 22))
    assert (F.VIRTIO_F_NOTIFY_ON_EMPTY, F.VHOST_F_LOG_ALL, F.VIRTIO_F_ANY_LAYOUT,
            F.VIRTIO_RING_F_INDIRECT_DESC, F.VIRTIO_RING_F_EVENT_IDX,
            F.VHOST_USER_F_PROTOCOL_FEATURES, F.VIRTIO_F_VERSION_1,
            F.VIRTIO_F_ACCESS_PLATFORM, F.VIRTIO_F_RING_PACKED,
            F.VIRTIO_F_IN_ORDER) == tuple(
        1 << b for b in (24, 26, 27, 28, 29, 30, 32, 33, 34, 35))
    assert [int(p).bit_length() - 1 for p in P] == list(range(20))
    assert P.LOG_SHMFD == 2 and P.REPLY_ACK == 8 and P.SHARED_OBJECT == 1 << 18
    assert P.DEVICE_STATE == 1 << 19
    assert set(FEATURE_MEANING) == set(F) and set(PROTOCOL_FEATURE_MEANING) == set(P)


def test_feature_helpers() -> None:
    assert feature_names(1 << 26 | 1 << 30 | 1 << 4) == [
        "BIT_4", "VHOST_F_LOG_ALL", "VHOST_USER_F_PROTOCOL_FEATURES"]
    assert feature_names(0b1010, ProtocolFeature) == ["LOG_SHMFD", "REPLY_ACK"]
    assert describe(Feature.VHOST_F_LOG_ALL).startswith("bit 26 VHOST_F_LOG_ALL: ")
    assert describe_mask(1 << 1 | 1 << 40, ProtocolFeature) == [
        describe(ProtocolFeature.LOG_SHMFD), "bit 40 BIT_40: not defined here"]
