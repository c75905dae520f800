"""Wire constants of the vhost-user protocol (docs/interop/vhost-user.rst).

Names follow QEMU's hw/virtio/vhost-user.c where it has one.
"""
from __future__ import annotations

__all__ = [
    "HEADER_SIZE", "VHOST_USER_VERSION", "VERSION_MASK", "FLAG_REPLY",
    "FLAG_NEED_REPLY", "KNOWN_FLAGS", "REPLY_FLAGS", "VHOST_USER_MAX_FDS",
    "VHOST_MEMORY_BASELINE_NREGIONS", "VRING_NOFD_MASK", "VRING_IDX_MASK",
    "VHOST_VRING_F_LOG", "VHOST_USER_MAX_CONFIG_SIZE", "MAX_PAYLOAD_SIZE",
    "MAX_AREA_SIZE", "VHOST_LOG_PAGE", "QEMU_VHOST_USER_MAX_RAM_SLOTS",
    "LIBVHOST_USER_MAX_RAM_SLOTS",
]

# "Header": u32 request, u32 flags, u32 size, in the machine's byte order;
# every host QEMU's vhost-user runs on here is little endian.
HEADER_SIZE = 12

# "Lower 2 bits are the version (currently 0x01)".
VHOST_USER_VERSION = 0x1
VERSION_MASK = 0x3
# "Bit 2 is the reply flag - needs to be sent on each reply from the back-end".
FLAG_REPLY = 0x4
# "Bit 3 is the need_reply flag" (REPLY_ACK).
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
# QEMU's vhost_user_read_header() accepts a reply only if flags is exactly
# VHOST_USER_REPLY_MASK | VHOST_USER_VERSION.
REPLY_FLAGS = FLAG_REPLY | VHOST_USER_VERSION

# At most 8 fds ride on one message (QEMU: VHOST_MEMORY_BASELINE_NREGIONS
# regions in SET_MEM_TABLE, VHOST_USER_BACKEND_MAX_FDS on the back-end channel).
VHOST_USER_MAX_FDS = 8
VHOST_MEMORY_BASELINE_NREGIONS = 8

# GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS): how many regions a back-end can
# map. QEMU and libvhost-user both call their limit VHOST_USER_MAX_RAM_SLOTS,
# with different values, so here each name says whose it is.
# QEMU hw/virtio/vhost-user.c, "#define VHOST_USER_MAX_RAM_SLOTS 512": the
# front-end caps a back-end's answer at this (vhost_user_backend_init).
QEMU_VHOST_USER_MAX_RAM_SLOTS = 512
# subprojects/libvhost-user/libvhost-user.h, "#define VHOST_USER_MAX_RAM_SLOTS
# 32" ("a reasonable maximum number of ram slots, which will be supported by
# any architecture"): what a libvhost-user back-end answers. The kit's
# back-end answers the same.
LIBVHOST_USER_MAX_RAM_SLOTS = 32

# SET_VRING_KICK/CALL/ERR u64: "Bits (0-7) of the payload contain the vring
# index. Bit 8 is the invalid FD flag."
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

# SET_VRING_ADDR flags: log used-ring writes. Linux's <linux/vhost_types.h>
# defines VHOST_VRING_F_LOG as the bit *number* 0 and QEMU tests
# `flags & (1 << VHOST_VRING_F_LOG)`; here the constant is that mask, 1.
VHOST_VRING_F_LOG = 1

# "Maximum size of virtio device config space" (QEMU VHOST_USER_MAX_CONFIG_SIZE).
VHOST_USER_MAX_CONFIG_SIZE = 256

# Largest payload accepted. QEMU's own union (VhostUserPayload) is about
# 1 KiB (the crypto session is the largest member); 4096 leaves room and
# still bounds what a peer can make us buffer.
MAX_PAYLOAD_SIZE = 4096

# Areas the back-end maps from an fd (dirty log, inflight buffer, host
# notifier) may not claim more than 2 GiB. A 1 TiB guest needs a 32 MiB log.
MAX_AREA_SIZE = 2 ** 31

# "Dirty pages are of size: #define VHOST_LOG_PAGE 0x1000".
VHOST_LOG_PAGE = 0x1000
