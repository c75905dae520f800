"""Feature bits: virtio/vhost features and vhost-user protocol features.

``Feature`` is the 64-bit mask exchanged by GET_FEATURES / SET_FEATURES:
virtio ring and transport bits, virtio-net device bits, and the two bits
vhost borrows (VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES).
``ProtocolFeature`` is the mask exchanged by GET_PROTOCOL_FEATURES /
SET_PROTOCOL_FEATURES. Bit numbers come from the virtio spec, Linux's
<linux/virtio_net.h>, <linux/virtio_config.h> and vhost-user.rst
"Protocol features".
"""
from __future__ import annotations

import enum

__all__ = ["Feature", "ProtocolFeature", "FEATURE_MEANING",
           "PROTOCOL_FEATURE_MEANING", "feature_names", "describe",
           "describe_mask"]


class Feature(enum.IntFlag):
    """virtio and vhost feature bits (GET_FEATURES / SET_FEATURES)."""

    # virtio-net device bits (virtio spec 5.1.3)
    VIRTIO_NET_F_CSUM = 1 << 0
    VIRTIO_NET_F_GUEST_CSUM = 1 << 1
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 1 << 2
    VIRTIO_NET_F_MTU = 1 << 3
    VIRTIO_NET_F_MAC = 1 << 5
    VIRTIO_NET_F_GSO = 1 << 6
    VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
    VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
    VIRTIO_NET_F_GUEST_ECN = 1 << 9
    VIRTIO_NET_F_GUEST_UFO = 1 << 10
    VIRTIO_NET_F_HOST_TSO4 = 1 << 11
    VIRTIO_NET_F_HOST_TSO6 = 1 << 12
    VIRTIO_NET_F_HOST_ECN = 1 << 13
    VIRTIO_NET_F_HOST_UFO = 1 << 14
    VIRTIO_NET_F_MRG_RXBUF = 1 << 15
    VIRTIO_NET_F_STATUS = 1 << 16
    VIRTIO_NET_F_CTRL_VQ = 1 << 17
    VIRTIO_NET_F_CTRL_RX = 1 << 18
    VIRTIO_NET_F_CTRL_VLAN = 1 << 19
    VIRTIO_NET_F_CTRL_RX_EXTRA = 1 << 20
    VIRTIO_NET_F_GUEST_ANNOUNCE = 1 << 21
    VIRTIO_NET_F_MQ = 1 << 22
    VIRTIO_NET_F_CTRL_MAC_ADDR = 1 << 23
    # transport and ring bits, and what vhost borrows
    VIRTIO_F_NOTIFY_ON_EMPTY = 1 << 24
    VHOST_F_LOG_ALL = 1 << 26
    VIRTIO_F_ANY_LAYOUT = 1 << 27
    VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
    VIRTIO_RING_F_EVENT_IDX = 1 << 29
    VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
    VIRTIO_F_VERSION_1 = 1 << 32
    VIRTIO_F_ACCESS_PLATFORM = 1 << 33
    VIRTIO_F_IOMMU_PLATFORM = 1 << 33  # older name, an alias
    VIRTIO_F_RING_PACKED = 1 << 34
    VIRTIO_F_IN_ORDER = 1 << 35
    VIRTIO_F_ORDER_PLATFORM = 1 << 36
    VIRTIO_F_SR_IOV = 1 << 37
    VIRTIO_F_NOTIFICATION_DATA = 1 << 38
    VIRTIO_F_NOTIF_CONFIG_DATA = 1 << 39
    VIRTIO_F_RING_RESET = 1 << 40
    # newer virtio-net bits
    VIRTIO_NET_F_VQ_NOTF_COAL = 1 << 52
    VIRTIO_NET_F_NOTF_COAL = 1 << 53
    VIRTIO_NET_F_GUEST_USO4 = 1 << 54
    VIRTIO_NET_F_GUEST_USO6 = 1 << 55
    VIRTIO_NET_F_HOST_USO = 1 << 56
    VIRTIO_NET_F_HASH_REPORT = 1 << 57
    VIRTIO_NET_F_GUEST_HDRLEN = 1 << 59
    VIRTIO_NET_F_RSS = 1 << 60
    VIRTIO_NET_F_RSC_EXT = 1 << 61
    VIRTIO_NET_F_STANDBY = 1 << 62
    VIRTIO_NET_F_SPEED_DUPLEX = 1 << 63


class ProtocolFeature(enum.IntFlag):
    """vhost-user protocol feature bits (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


F = Feature
FEATURE_MEANING: dict[Feature, str] = {
    F.VIRTIO_NET_F_CSUM: "device handles packets with partial checksum",
    F.VIRTIO_NET_F_GUEST_CSUM: "driver handles packets with partial checksum",
    F.VIRTIO_NET_F_CTRL_GUEST_OFFLOADS: "guest offloads can be changed on the control queue",
    F.VIRTIO_NET_F_MTU: "device reports its maximum MTU in config space",
    F.VIRTIO_NET_F_MAC: "device has a MAC address in config space",
    F.VIRTIO_NET_F_GSO: "legacy: device handles any GSO type",
    F.VIRTIO_NET_F_GUEST_TSO4: "driver can receive TCPv4 segmentation offload",
    F.VIRTIO_NET_F_GUEST_TSO6: "driver can receive TCPv6 segmentation offload",
    F.VIRTIO_NET_F_GUEST_ECN: "driver can receive TSO with ECN",
    F.VIRTIO_NET_F_GUEST_UFO: "driver can receive UDP fragmentation offload",
    F.VIRTIO_NET_F_HOST_TSO4: "device can take TCPv4 segmentation offload",
    F.VIRTIO_NET_F_HOST_TSO6: "device can take TCPv6 segmentation offload",
    F.VIRTIO_NET_F_HOST_ECN: "device can take TSO with ECN",
    F.VIRTIO_NET_F_HOST_UFO: "device can take UDP fragmentation offload",
    F.VIRTIO_NET_F_MRG_RXBUF: "driver can merge receive buffers (12-byte net header)",
    F.VIRTIO_NET_F_STATUS: "link status is in config space",
    F.VIRTIO_NET_F_CTRL_VQ: "a control virtqueue exists",
    F.VIRTIO_NET_F_CTRL_RX: "RX mode (promiscuous etc.) via the control queue",
    F.VIRTIO_NET_F_CTRL_VLAN: "VLAN filtering via the control queue",
    F.VIRTIO_NET_F_CTRL_RX_EXTRA: "extra RX mode control",
    F.VIRTIO_NET_F_GUEST_ANNOUNCE: "driver announces itself after migration (no RARP needed)",
    F.VIRTIO_NET_F_MQ: "multiple RX/TX queue pairs",
    F.VIRTIO_NET_F_CTRL_MAC_ADDR: "MAC address can be set via the control queue",
    F.VIRTIO_F_NOTIFY_ON_EMPTY: "legacy: notify when the avail ring runs empty",
    F.VHOST_F_LOG_ALL: "back-end logs every guest memory write (live migration)",
    F.VIRTIO_F_ANY_LAYOUT: "legacy: descriptors may split headers and data freely",
    F.VIRTIO_RING_F_INDIRECT_DESC: "descriptors may point to indirect tables",
    F.VIRTIO_RING_F_EVENT_IDX: "used_event/avail_event suppress notifications",
    F.VHOST_USER_F_PROTOCOL_FEATURES: "vhost-user protocol features are negotiated",
    F.VIRTIO_F_VERSION_1: "virtio 1.0 (modern) device",
    F.VIRTIO_F_ACCESS_PLATFORM: "device accesses memory through an IOMMU (IOVAs)",
    F.VIRTIO_F_RING_PACKED: "packed virtqueue layout",
    F.VIRTIO_F_IN_ORDER: "buffers are used in the order they were made available",
    F.VIRTIO_F_ORDER_PLATFORM: "memory ordering as for real hardware",
    F.VIRTIO_F_SR_IOV: "device supports SR-IOV",
    F.VIRTIO_F_NOTIFICATION_DATA: "driver passes extra data in notifications",
    F.VIRTIO_F_NOTIF_CONFIG_DATA: "notification value comes from config space",
    F.VIRTIO_F_RING_RESET: "individual queues can be reset",
    F.VIRTIO_NET_F_VQ_NOTF_COAL: "per-queue notification coalescing",
    F.VIRTIO_NET_F_NOTF_COAL: "notification coalescing",
    F.VIRTIO_NET_F_GUEST_USO4: "driver can receive UDPv4 segmentation offload",
    F.VIRTIO_NET_F_GUEST_USO6: "driver can receive UDPv6 segmentation offload",
    F.VIRTIO_NET_F_HOST_USO: "device can take UDP segmentation offload",
    F.VIRTIO_NET_F_HASH_REPORT: "device reports packet hashes",
    F.VIRTIO_NET_F_GUEST_HDRLEN: "driver fills hdr_len precisely",
    F.VIRTIO_NET_F_RSS: "receive-side scaling",
    F.VIRTIO_NET_F_RSC_EXT: "extended receive segment coalescing info",
    F.VIRTIO_NET_F_STANDBY: "standby for a primary device with the same MAC",
    F.VIRTIO_NET_F_SPEED_DUPLEX: "link speed and duplex in config space",
}
del F

P = ProtocolFeature
PROTOCOL_FEATURE_MEANING: dict[ProtocolFeature, str] = {
    P.MQ: "back-end reports its queue count (GET_QUEUE_NUM)",
    P.LOG_SHMFD: "dirty log is shared memory passed with SET_LOG_BASE (needed to migrate)",
    P.RARP: "back-end can send a RARP after migration (SEND_RARP)",
    P.REPLY_ACK: "front-end may set need_reply; back-end answers with a u64 status",
    P.NET_MTU: "front-end sets the MTU (NET_SET_MTU)",
    P.BACKEND_REQ: "a second socket for back-end initiated requests",
    P.CROSS_ENDIAN: "per-queue endianness for legacy devices (SET_VRING_ENDIAN)",
    P.CRYPTO_SESSION: "crypto sessions (CREATE/CLOSE_CRYPTO_SESSION)",
    P.PAGEFAULT: "postcopy migration with userfaultfd",
    P.CONFIG: "device config space through GET/SET_CONFIG",
    P.BACKEND_SEND_FD: "back-end may pass fds on its own channel",
    P.HOST_NOTIFIER: "back-end provides host notifier areas",
    P.INFLIGHT_SHMFD: "inflight I/O tracking buffer (GET/SET_INFLIGHT_FD)",
    P.RESET_DEVICE: "RESET_DEVICE resets all device state",
    P.INBAND_NOTIFICATIONS: "kicks and calls as messages instead of eventfds",
    P.CONFIGURE_MEM_SLOTS: "memory regions added/removed one at a time (ADD/REM_MEM_REG)",
    P.STATUS: "virtio device status through SET/GET_STATUS",
    P.XEN_MMAP: "memory regions carry Xen mmap flags",
    P.SHARED_OBJECT: "virtio shared objects (dma-buf) by UUID",
    P.DEVICE_STATE: "the back-end's internal state migrates through SET_DEVICE_STATE_FD",
}
del P

_MEANINGS = {Feature: FEATURE_MEANING, ProtocolFeature: PROTOCOL_FEATURE_MEANING}


def _bits(value: int) -> list[int]:
    if not 0 <= value < 2 ** 64:
        raise ValueError(f"feature mask {value!r} is not a u64")
    return [b for b in range(64) if value >> b & 1]


def feature_names(value: int, flag_class: type[enum.IntFlag] = Feature) -> list[str]:
    """Names of the bits set in ``value``, lowest bit first.

    A bit ``flag_class`` does not define is shown as ``BIT_<n>``.
    Raises ValueError if ``value`` is not a u64.
    """
    # IntFlag keeps undefined bits (boundary KEEP) as nameless members.
    return [flag_class(1 << bit).name or f"BIT_{bit}" for bit in _bits(value)]


def describe(flag: enum.IntFlag) -> str:
    """One line: ``bit 26 VHOST_F_LOG_ALL: back-end logs every ...``."""
    bits = _bits(int(flag))
    if len(bits) != 1:
        raise ValueError(f"describe() takes a single bit, got {flag!r}")
    meaning = _MEANINGS.get(type(flag), {}).get(flag, "not defined here")
    return f"bit {bits[0]} {flag.name or f'BIT_{bits[0]}'}: {meaning}"


def describe_mask(value: int, flag_class: type[enum.IntFlag] = Feature) -> list[str]:
    """One ``describe()`` line per bit set in ``value``."""
    return [describe(flag_class(1 << bit)) for bit in _bits(value)]
