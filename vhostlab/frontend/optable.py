"""The seed's VhostOps table as data: which back-end type implements which op.

Theory of operation
-------------------
QEMU drives every vhost back-end through one table of function pointers,
``struct VhostOps`` (include/hw/virtio/vhost-backend.h). hw/virtio/vhost.c
only ever calls ``hdev->vhost_ops->vhost_set_log_base(...)`` and so on; which
table sits behind ``vhost_ops`` depends on ``VhostBackendType``:
``kernel_ops`` (hw/virtio/vhost-backend.c) turns each op into an ioctl on
/dev/vhost-net, ``user_ops`` (hw/virtio/vhost-user.c) turns it into a
vhost-user message on a unix socket. An op a table leaves NULL does not exist
for that back-end type.

``VHOST_OPS_TABLE`` below is that knowledge, one ``OpInfo`` per op in the
seed's order (the 35 ops of QEMU around 2020, FACTS.md section 7). The labs
draw it; ``tests/frontend`` holds :class:`vhostlab.frontend.VhostOps` against
it: an op with ``user`` False raises, an op with ``local`` True sends nothing,
every other op sends one of ``messages``.
"""
from __future__ import annotations

from ..errors import VhostlabError

import enum
import functools
from dataclasses import dataclass

__all__ = [
    "VhostBackendType",
    "OpInfo",
    "VHOST_OPS_TABLE",
    "op_info",
    "VhostOpsError",
    "NotSupportedByVhostUser",
    "ProtocolFeatureMissing",
    "BackendReplyError",
    "vhost_op",
]


class VhostBackendType(enum.IntEnum):
    """``typedef enum VhostBackendType`` from the seed (include/hw/virtio/vhost-backend.h)."""

    VHOST_BACKEND_TYPE_NONE = 0
    VHOST_BACKEND_TYPE_KERNEL = 1
    VHOST_BACKEND_TYPE_USER = 2
    VHOST_BACKEND_TYPE_MAX = 3


@dataclass(frozen=True)
class OpInfo:
    """One row of the VhostOps table.

    ``kernel``: whether ``kernel_ops`` sets the op; ``kernel_ioctl``: the ioctl
    it issues (None when it issues none). ``user``: whether ``user_ops`` sets
    it; ``messages``: the vhost-user requests it may send (empty for a local
    op). ``local``: the vhost-user op answers without a message.
    ``migration``: live migration calls it (set-up of logging, stop,
    destination start, or after switch-over). ``note``: one line a learner reads.
    """

    name: str
    kernel: bool
    kernel_ioctl: str | None
    user: bool
    messages: tuple[str, ...]
    local: bool
    migration: bool
    note: str


def _op(name, kernel, kernel_ioctl, user, messages=(), local=False, migration=False, note=""):
    return OpInfo(name, kernel, kernel_ioctl, user, tuple(messages), local, migration, note)


# One row per op, in the order of the seed's ``typedef struct VhostOps``.
VHOST_OPS_TABLE: tuple[OpInfo, ...] = (
    _op("vhost_backend_init", True, None, True,
        ("GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
         "GET_QUEUE_NUM", "GET_MAX_MEM_SLOTS", "SET_BACKEND_REQ_FD"),
        note="kernel: stores the /dev/vhost-net fd; user: negotiates protocol features"),
    _op("vhost_backend_cleanup", True, None, True, local=True,
        note="kernel: close(fd); user: frees the per-device state"),
    _op("vhost_backend_memslots_limit", True, None, True, local=True,
        note="kernel: /sys/module/vhost/parameters/max_mem_regions (64); "
             "user: 8, or GET_MAX_MEM_SLOTS capped at 512 with CONFIGURE_MEM_SLOTS"),
    _op("vhost_net_set_backend", True, "VHOST_NET_SET_BACKEND", False,
        note="attaches a tap fd to a kernel virtqueue; a vhost-user back-end owns its own wire"),
    _op("vhost_net_set_mtu", False, None, True, ("NET_SET_MTU",),
        note="only when protocol feature NET_MTU was negotiated"),
    _op("vhost_scsi_set_endpoint", True, "VHOST_SCSI_SET_ENDPOINT", False,
        note="binds a kernel LIO target to vhost-scsi; a vhost-user-scsi back-end owns "
             "its target and has no endpoint"),
    _op("vhost_scsi_clear_endpoint", True, "VHOST_SCSI_CLEAR_ENDPOINT", False,
        note="unbinds vhost-scsi's kernel LIO target; a vhost-user-scsi back-end owns "
             "its target and has no endpoint"),
    _op("vhost_scsi_get_abi_version", True, "VHOST_SCSI_GET_ABI_VERSION", False,
        note="versions the kernel vhost-scsi ioctl ABI; vhost-user versions itself "
             "with protocol features"),
    _op("vhost_set_log_base", True, "VHOST_SET_LOG_BASE", True, ("SET_LOG_BASE",),
        migration=True,
        note="migration step 1: where to write the dirty-page bitmap (a memfd with LOG_SHMFD)"),
    _op("vhost_set_mem_table", True, "VHOST_SET_MEM_TABLE", True,
        ("SET_MEM_TABLE", "ADD_MEM_REG", "REM_MEM_REG"), migration=True,
        note="guest RAM regions, one fd each; with CONFIGURE_MEM_SLOTS QEMU sends the "
             "changes instead, one ADD_MEM_REG / REM_MEM_REG per region"),
    _op("vhost_set_vring_addr", True, "VHOST_SET_VRING_ADDR", True, ("SET_VRING_ADDR",),
        migration=True,
        note="desc/avail/used as front-end virtual addresses, log_guest_addr as a GPA; "
             "flags VHOST_VRING_F_LOG turns on used-ring logging"),
    _op("vhost_set_vring_endian", True, "VHOST_SET_VRING_ENDIAN", True, ("SET_VRING_ENDIAN",),
        note="legacy cross-endian guests only (protocol feature CROSS_ENDIAN)"),
    _op("vhost_set_vring_num", True, "VHOST_SET_VRING_NUM", True, ("SET_VRING_NUM",),
        migration=True, note="queue size"),
    _op("vhost_set_vring_base", True, "VHOST_SET_VRING_BASE", True, ("SET_VRING_BASE",),
        migration=True, note="destination: where the source's back-end stopped (last_avail_idx)"),
    _op("vhost_get_vring_base", True, "VHOST_GET_VRING_BASE", True, ("GET_VRING_BASE",),
        migration=True, note="migration step 3: stops the ring and returns last_avail_idx"),
    _op("vhost_set_vring_kick", True, "VHOST_SET_VRING_KICK", True, ("SET_VRING_KICK",),
        migration=True, note="eventfd the guest's notify reaches the back-end through"),
    _op("vhost_set_vring_call", True, "VHOST_SET_VRING_CALL", True, ("SET_VRING_CALL",),
        migration=True, note="eventfd the back-end interrupts the guest through"),
    _op("vhost_set_vring_busyloop_timeout", True, "VHOST_SET_VRING_BUSYLOOP_TIMEOUT", False,
        note="vhost-net's in-kernel busy polling; a vhost-user back-end polls as it likes"),
    _op("vhost_set_features", True, "VHOST_SET_FEATURES", True, ("SET_FEATURES",),
        migration=True, note="migration step 2: acked features | VHOST_F_LOG_ALL"),
    _op("vhost_get_features", True, "VHOST_GET_FEATURES", True, ("GET_FEATURES",),
        note="features the back-end offers"),
    _op("vhost_set_owner", True, "VHOST_SET_OWNER", True, ("SET_OWNER",),
        note="claims the back-end for this front-end"),
    _op("vhost_reset_device", True, "VHOST_RESET_OWNER", True, ("RESET_DEVICE", "RESET_OWNER"),
        note="RESET_DEVICE when negotiated, else RESET_OWNER"),
    _op("vhost_get_vq_index", True, None, True, local=True, migration=True,
        note="kernel: idx - dev->vq_index; user: idx unchanged"),
    _op("vhost_set_vring_enable", False, None, True, ("SET_VRING_ENABLE",), migration=True,
        note="rings start disabled once PROTOCOL_FEATURES is negotiated; "
             "the destination enables them after vhost_dev_start"),
    _op("vhost_requires_shm_log", False, None, True, local=True, migration=True,
        note="whether LOG_SHMFD was negotiated: the log must be a memfd the back-end can map"),
    _op("vhost_migration_done", False, None, True, ("SEND_RARP",), migration=True,
        note="after switch-over: announce the guest's MAC (RARP) unless the guest "
             "does GUEST_ANNOUNCE itself"),
    _op("vhost_backend_can_merge", False, None, True, local=True,
        note="two RAM ranges can share one region when they come from the same fd"),
    _op("vhost_vsock_set_guest_cid", True, "VHOST_VSOCK_SET_GUEST_CID", False,
        note="vhost-vsock (kernel); vhost-user-vsock sets the CID on its own command line"),
    _op("vhost_vsock_set_running", True, "VHOST_VSOCK_SET_RUNNING", False,
        note="starts kernel vhost-vsock; a vhost-user back-end runs a ring once it has "
             "its kick fd"),
    _op("vhost_set_iotlb_callback", True, None, True, local=True,
        note="kernel: fd handler for IOTLB misses; user: no-op (misses come on the "
             "back-end channel)"),
    _op("vhost_send_device_iotlb_msg", True, None, True, ("IOTLB_MSG",),
        note="kernel: write() of a struct vhost_msg; user: IOTLB_MSG with need_reply"),
    _op("vhost_get_config", False, None, True, ("GET_CONFIG",),
        note="device config space (protocol feature CONFIG)"),
    _op("vhost_set_config", False, None, True, ("SET_CONFIG",),
        note="device config space (protocol feature CONFIG)"),
    _op("vhost_crypto_create_session", False, None, True, ("CREATE_CRYPTO_SESSION",),
        note="vhost-user-crypto devices only (protocol feature CRYPTO_SESSION)"),
    _op("vhost_crypto_close_session", False, None, True, ("CLOSE_CRYPTO_SESSION",),
        note="vhost-user-crypto devices only (protocol feature CRYPTO_SESSION)"),
)

_BY_NAME = {info.name: info for info in VHOST_OPS_TABLE}


def op_info(name: str) -> OpInfo:
    """The table row for op ``name`` (KeyError naming the op when there is none)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name!r} is not one of the seed's {len(VHOST_OPS_TABLE)} "
                       "VhostOps") from None


class VhostOpsError(VhostlabError):
    """Base of every error a VhostOps op raises on its own account."""


class NotSupportedByVhostUser(VhostOpsError):
    """The op exists only for vhost-kernel: QEMU's ``user_ops`` leaves it NULL.

    Attributes: ``op`` (the seed's name), ``kernel_ioctl`` and ``reason``.
    """

    def __init__(self, op: str, kernel_ioctl: str | None, reason: str):
        self.op, self.kernel_ioctl, self.reason = op, kernel_ioctl, reason
        super().__init__(
            f"{op}: vhost-user has no such op (user_ops leaves it NULL); on vhost-kernel it is "
            f"the ioctl {kernel_ioctl}. {reason}")


class ProtocolFeatureMissing(VhostOpsError):
    """The vhost-user op exists but its message needs a protocol feature not negotiated.

    QEMU returns -ENOTSUP here ("vhost-user trying to send unhandled ioctl").
    Attributes: ``op``, ``request`` (the message it would send), ``feature``.
    """

    def __init__(self, op: str, request: str, feature: str, why: str = ""):
        self.op, self.request, self.feature = op, request, feature
        tail = f" {why}" if why else ""
        super().__init__(
            f"{op}: {request} needs protocol feature {feature}, which was not negotiated "
            f"with this back-end (QEMU returns -ENOTSUP).{tail}")


class BackendReplyError(VhostOpsError):
    """The back-end answered, but with a failure (REPLY_ACK non-zero) or a bad reply.

    Attributes: ``request`` (message name), ``field``, ``value``, ``expected``.
    """

    def __init__(self, request: str, field: str, value, expected):
        self.request, self.field, self.value, self.expected = request, field, value, expected
        super().__init__(f"{request}: reply field {field} is {value!r}, expected {expected}")


def vhost_op(method):
    """Make ``method`` the op of its name in the table: each call is recorded in
    ``ops_called`` (``op_hooks`` run on the way in and out), and an op that
    ``user_ops`` leaves NULL raises NotSupportedByVhostUser instead of running."""
    info = op_info(method.__name__)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self.ops_called.append(info.name)
        for hook in self.op_hooks:
            hook(info.name, True)
        try:
            if not info.user:
                raise NotSupportedByVhostUser(info.name, info.kernel_ioctl, info.note)
            return method(self, *args, **kwargs)
        finally:
            for hook in self.op_hooks:
                hook(info.name, False)

    wrapper.op_info = info
    return wrapper
