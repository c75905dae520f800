"""The VhostOps class held against the seed's op list and FACTS.md section 7."""
from __future__ import annotations

import inspect

import pytest

from vhostlab.frontend import (VHOST_OPS_TABLE, NotSupportedByVhostUser, VhostBackendType,
                               VhostOps, op_info)

# The seed's ``typedef struct VhostOps``, in its order.
SEED_OPS = """
vhost_backend_init vhost_backend_cleanup vhost_backend_memslots_limit vhost_net_set_backend
vhost_net_set_mtu vhost_scsi_set_endpoint vhost_scsi_clear_endpoint vhost_scsi_get_abi_version
vhost_set_log_base vhost_set_mem_table vhost_set_vring_addr vhost_set_vring_endian
vhost_set_vring_num vhost_set_vring_base vhost_get_vring_base vhost_set_vring_kick
vhost_set_vring_call vhost_set_vring_busyloop_timeout vhost_set_features vhost_get_features
vhost_set_owner vhost_reset_device vhost_get_vq_index vhost_set_vring_enable
vhost_requires_shm_log vhost_migration_done vhost_backend_can_merge vhost_vsock_set_guest_cid
vhost_vsock_set_running vhost_set_iotlb_callback vhost_send_device_iotlb_msg vhost_get_config
vhost_set_config vhost_crypto_create_session vhost_crypto_close_session
""".split()

# FACTS.md section 7, row by row: op -> (kernel ioctl or "yes" or None, user "yes"/None).
FACTS_7 = {
    "vhost_backend_init": ("yes", "yes"),
    "vhost_backend_cleanup": ("yes", "yes"),
    "vhost_backend_memslots_limit": ("yes", "yes"),
    "vhost_net_set_backend": ("VHOST_NET_SET_BACKEND", None),
    "vhost_net_set_mtu": (None, "NET_SET_MTU"),
    "vhost_scsi_set_endpoint": ("VHOST_SCSI_SET_ENDPOINT", None),
    "vhost_scsi_clear_endpoint": ("VHOST_SCSI_CLEAR_ENDPOINT", None),
    "vhost_scsi_get_abi_version": ("VHOST_SCSI_GET_ABI_VERSION", None),
    "vhost_set_log_base": ("VHOST_SET_LOG_BASE", "SET_LOG_BASE"),
    "vhost_set_mem_table": ("VHOST_SET_MEM_TABLE", "SET_MEM_TABLE"),
    "vhost_set_vring_addr": ("VHOST_SET_VRING_ADDR", "SET_VRING_ADDR"),
    "vhost_set_vring_endian": ("VHOST_SET_VRING_ENDIAN", "SET_VRING_ENDIAN"),
    "vhost_set_vring_num": ("VHOST_SET_VRING_NUM", "SET_VRING_NUM"),
    "vhost_set_vring_base": ("VHOST_SET_VRING_BASE", "SET_VRING_BASE"),
    "vhost_get_vring_base": ("VHOST_GET_VRING_BASE", "GET_VRING_BASE"),
    "vhost_set_vring_kick": ("VHOST_SET_VRING_KICK", "SET_VRING_KICK"),
    "vhost_set_vring_call": ("VHOST_SET_VRING_CALL", "SET_VRING_CALL"),
    "vhost_set_vring_busyloop_timeout": ("VHOST_SET_VRING_BUSYLOOP_TIMEOUT", None),
    "vhost_set_features": ("VHOST_SET_FEATURES", "SET_FEATURES"),
    "vhost_get_features": ("VHOST_GET_FEATURES", "GET_FEATURES"),
    "vhost_set_owner": ("VHOST_SET_OWNER", "SET_OWNER"),
    "vhost_reset_device": ("VHOST_RESET_OWNER", "RESET_DEVICE"),
    "vhost_get_vq_index": ("yes", "yes"),
    "vhost_set_vring_enable": (None, "SET_VRING_ENABLE"),
    "vhost_requires_shm_log": (None, "yes"),
    "vhost_migration_done": (None, "SEND_RARP"),
    "vhost_backend_can_merge": (None, "yes"),
    "vhost_vsock_set_guest_cid": ("VHOST_VSOCK_SET_GUEST_CID", None),
    "vhost_vsock_set_running": ("VHOST_VSOCK_SET_RUNNING", None),
    "vhost_set_iotlb_callback": ("yes", "yes"),
    "vhost_send_device_iotlb_msg": ("yes", "IOTLB_MSG"),
    "vhost_get_config": (None, "GET_CONFIG"),
    "vhost_set_config": (None, "SET_CONFIG"),
    "vhost_crypto_create_session": (None, "CREATE_CRYPTO_SESSION"),
    "vhost_crypto_close_session": (None, "CLOSE_CRYPTO_SESSION"),
}
# Ops FACTS marks "yes" for vhost-user without a message of their own.
LOCAL_USER_OPS = {"vhost_backend_cleanup", "vhost_backend_memslots_limit", "vhost_get_vq_index",
                  "vhost_requires_shm_log", "vhost_backend_can_merge",
                  "vhost_set_iotlb_callback"}


def test_table_lists_the_seeds_35_ops_in_order():
    assert len(SEED_OPS) == 35
    assert [info.name for info in VHOST_OPS_TABLE] == SEED_OPS


@pytest.mark.parametrize("name", SEED_OPS)
def test_table_row_matches_facts_section_7(name):
    info = op_info(name)
    kernel, user = FACTS_7[name]
    assert info.kernel == (kernel is not None)
    if kernel not in (None, "yes"):
        assert info.kernel_ioctl == kernel
    assert info.user == (user is not None)
    assert info.local == (name in LOCAL_USER_OPS)
    if user not in (None, "yes"):
        assert user in info.messages
    if not info.user or info.local:
        assert info.messages == ()


@pytest.mark.parametrize("name", SEED_OPS)
def test_class_has_one_method_per_row(name):
    method = getattr(VhostOps, name)
    assert method.op_info is op_info(name)
    doc = " ".join(method.__doc__.lower().split())
    info = op_info(name)
    # what a learner reads: the message, the ioctl, who calls it, migration or not
    for word in ("vhost-kernel", "called by", "migration", *[m.lower() for m in info.messages]):
        assert word in doc, f"{name}'s docstring does not say {word!r}"
    if info.kernel_ioctl:
        assert info.kernel_ioctl.lower() in doc


def test_class_has_no_op_the_table_lacks():
    ops = {n for n, _ in inspect.getmembers(VhostOps, inspect.isfunction)
           if hasattr(getattr(VhostOps, n), "op_info")}
    assert ops == set(SEED_OPS)


def test_backend_type_is_user():
    assert VhostOps.backend_type is VhostBackendType.VHOST_BACKEND_TYPE_USER
    assert [(m.name, m.value) for m in VhostBackendType] == [
        ("VHOST_BACKEND_TYPE_NONE", 0), ("VHOST_BACKEND_TYPE_KERNEL", 1),
        ("VHOST_BACKEND_TYPE_USER", 2), ("VHOST_BACKEND_TYPE_MAX", 3)]


def test_migration_ops_include_the_seeds_three_steps():
    used = {info.name for info in VHOST_OPS_TABLE if info.migration}
    assert {"vhost_set_log_base", "vhost_set_features", "vhost_get_vring_base"} <= used
    assert "vhost_scsi_set_endpoint" not in used


def test_not_supported_error_names_the_ioctl():
    err = NotSupportedByVhostUser("vhost_vsock_set_running", "VHOST_VSOCK_SET_RUNNING", "why")
    assert "VHOST_VSOCK_SET_RUNNING" in str(err) and "vhost_vsock_set_running" in str(err)
    assert err.kernel_ioctl == "VHOST_VSOCK_SET_RUNNING"
