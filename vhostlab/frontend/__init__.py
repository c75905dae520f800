"""The built-in front-end: QEMU's side of vhost, in Python.

    VhostOps            the seed's 35 ops (QEMU's user_ops), each sending its real message
    VHOST_OPS_TABLE     which op exists for vhost-kernel / vhost-user, as data
    VhostDev            hw/virtio/vhost.c's sequences: vhost_dev_start/stop, vhost_log_*
    BuiltinVirtioNetGuest  memfd guest RAM and a virtio-net driver (QEMU's VirtIODevice too)
    BuiltinMigration    a live migration between two in-process back-ends
    run_demo            the narrated walk through the seed's three migration steps

Everything runs without QEMU: the labs use it when no QEMU is installed.
"""
from vhostlab.backend import CaptureWire

from .channel import BackendDisconnected, BackendTimeout, VhostUserChannel
from .demo import SEED_STEPS, format_timeline, run_demo
from .frames import FrameLedger, frame_id, make_frame
from .guest import BuiltinVirtioNetGuest, GuestDriverError
from .migration import BuiltinMigration, BuiltinRound
from .optable import (VHOST_OPS_TABLE, BackendReplyError, NotSupportedByVhostUser, OpInfo,
                      ProtocolFeatureMissing, VhostBackendType, VhostOpsError, op_info)
from .vhost_dev import TimelineEntry, VhostDev, VhostVirtqueue
from .vhost_ops import FRONTEND_PROTOCOL_FEATURES, VhostOps

__all__ = [
    "VhostOps", "FRONTEND_PROTOCOL_FEATURES", "VhostBackendType", "OpInfo", "VHOST_OPS_TABLE",
    "op_info", "VhostOpsError", "NotSupportedByVhostUser", "ProtocolFeatureMissing",
    "BackendReplyError", "BackendTimeout", "BackendDisconnected", "VhostUserChannel",
    "VhostDev", "VhostVirtqueue", "TimelineEntry",
    "BuiltinVirtioNetGuest", "GuestDriverError",
    "BuiltinMigration", "BuiltinRound", "CaptureWire",
    "FrameLedger", "make_frame", "frame_id",
    "run_demo", "format_timeline", "SEED_STEPS",
]
