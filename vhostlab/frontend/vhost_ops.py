"""``VhostOps``: QEMU's ``user_ops`` in Python, one method per op of the seed.

Each method carries the seed's name and does what hw/virtio/vhost-user.c
does: build the vhost-user message, send it with its fds over a real unix
socket, and wait for the reply when the protocol (or REPLY_ACK) says one
follows. Ops that ``user_ops`` leaves NULL raise
:class:`~vhostlab.frontend.optable.NotSupportedByVhostUser`; ops that need a
protocol feature the back-end did not offer raise
:class:`~vhostlab.frontend.optable.ProtocolFeatureMissing`, where QEMU returns
-ENOTSUP. ``VHOST_OPS_TABLE`` (optable.py) says which is which.

Every call appends the op's name to ``ops_called`` (and calls ``op_hooks``
on the way in and out); every message lands in ``trace`` (the channel's).
"""
from __future__ import annotations

import os

from vhostlab.protocol import (ConfigSpace, CryptoSession, Feature, IotlbMsg, LogArea,
                               MemoryRegion, MemoryTable, Message, ProtocolFeature, Request,
                               U64, VringAddr, VringState)
from vhostlab.protocol.constants import (QEMU_VHOST_USER_MAX_RAM_SLOTS,
                                         VHOST_MEMORY_BASELINE_NREGIONS, VHOST_VRING_F_LOG,
                                         VRING_IDX_MASK, VRING_NOFD_MASK)

from .channel import VhostUserChannel
from .optable import (BackendReplyError, ProtocolFeatureMissing, VhostBackendType,
                      VhostOpsError, vhost_op)

__all__ = ["VhostOps", "FRONTEND_PROTOCOL_FEATURES"]

P = ProtocolFeature
# The protocol features this front-end uses when the back-end offers them.
# QEMU masks with every feature it knows; the kit leaves out the ones that
# would change the seed's sequences (CONFIGURE_MEM_SLOTS replaces SET_MEM_TABLE
# by ADD_MEM_REG, STATUS adds GET/SET_STATUS, BACKEND_REQ opens a second
# channel, PAGEFAULT is postcopy). Pass ``protocol_features_mask`` to change it.
FRONTEND_PROTOCOL_FEATURES = int(P.MQ | P.LOG_SHMFD | P.RARP | P.REPLY_ACK | P.NET_MTU
                                 | P.CROSS_ENDIAN | P.CRYPTO_SESSION | P.CONFIG
                                 | P.RESET_DEVICE)


class VhostOps:
    """The vhost-user VhostOps of one front-end device on one socket.

    ``nvqs`` queues starting at ``vq_index`` belong to this device (QEMU's
    vhost_dev; virtio-net uses one per queue pair: RX = 2n, TX = 2n+1).
    State the ops negotiate is kept here as QEMU keeps it on vhost_dev:
    ``features`` (what GET_FEATURES offered), ``backend_features``,
    ``protocol_features``, ``acked_features`` (the last SET_FEATURES),
    ``max_queues``, ``memory_slots``, ``migration_blocker``.
    """

    backend_type = VhostBackendType.VHOST_BACKEND_TYPE_USER

    def __init__(self, channel: VhostUserChannel, nvqs: int = 2, vq_index: int = 0,
                 protocol_features_mask: int = FRONTEND_PROTOCOL_FEATURES):
        self.channel = channel
        self.nvqs, self.vq_index = nvqs, vq_index
        self.protocol_features_mask = protocol_features_mask
        self.features = 0
        self.backend_features = 0
        self.protocol_features = 0
        self.acked_features = 0
        self.max_queues = 1
        self.memory_slots = VHOST_MEMORY_BASELINE_NREGIONS
        self.migration_blocker: str | None = None
        self.mem_regions: tuple = ()
        self.ops_called: list[str] = []
        self.op_hooks: list = []    # called with (op name, entering: bool) around each op

    @classmethod
    def connect(cls, path: str, **kwargs) -> "VhostOps":
        """Connect to the back-end at unix socket ``path`` (QEMU's ``-chardev socket,path=``)."""
        timeout = kwargs.pop("timeout", 10.0)
        return cls(VhostUserChannel.connect(path, timeout=timeout), **kwargs)

    @property
    def trace(self):
        """The channel's MessageTrace: every message sent and received."""
        return self.channel.trace

    # -- helpers: QEMU's vhost_user_write / _read / _write_sync ---------------
    def _has(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & feature)

    def _require(self, op: str, request: str, feature: ProtocolFeature, why: str = "") -> None:
        if not self._has(feature):
            raise ProtocolFeatureMissing(op, request, feature.name, why)

    def _send(self, request: Request, payload=None, fds=(), need_reply=False):
        return self.channel.call(Message.make(request, payload, fds, need_reply=need_reply))

    def _check_ack(self, request: Request, reply) -> None:
        # vhost-user.rst, REPLY_ACK: "the back-end must respond with zero
        # when operation is successfully completed, or non-zero otherwise".
        if reply is not None and reply.payload is not None and reply.payload.value != 0:
            raise BackendReplyError(request.name, "u64 (REPLY_ACK status)",
                                    reply.payload.value, 0)

    def _send_acked(self, request: Request, payload) -> None:
        """Send; with REPLY_ACK ask for the ack and check it (QEMU's need_reply)."""
        reply = self._send(request, payload, need_reply=self._has(P.REPLY_ACK))
        self._check_ack(request, reply)

    def _write_sync(self, request: Request, payload, wait_for_reply: bool) -> None:
        """vhost_user_write_sync(): with REPLY_ACK ask for an ack; without it,
        send GET_FEATURES, whose reply proves the request was processed."""
        ack = wait_for_reply and self._has(P.REPLY_ACK)
        reply = self._send(request, payload, need_reply=ack)
        if ack:
            self._check_ack(request, reply)
        elif wait_for_reply:
            self._get_u64(Request.GET_FEATURES)

    def _get_u64(self, request: Request) -> int:
        reply = self._send(request)
        if reply is None or not isinstance(reply.payload, U64):
            raise BackendReplyError(request.name, "payload", getattr(reply, "payload", None), "u64")
        return reply.payload.value

    def _vring_file(self, request: Request, index: int, fd: int | None) -> None:
        # vhost-user.rst: "Bits (0-7) of the payload contain the vring index.
        # Bit 8 is the invalid FD flag", set when no fd rides along.
        value = index & VRING_IDX_MASK
        if fd is None or fd < 0:
            self._send(request, U64(value | VRING_NOFD_MASK))
        else:
            self._send(request, U64(value), fds=(fd,))

    # -- the seed's ops, in the seed's order ---------------------------------
    @vhost_op
    def vhost_backend_init(self) -> dict:
        """Negotiate with a freshly connected back-end (vhost_user_backend_init).

        Sends GET_FEATURES; if the back-end offers VHOST_USER_F_PROTOCOL_FEATURES
        (bit 30): GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (offered & what
        this front-end uses), GET_QUEUE_NUM with MQ, GET_MAX_MEM_SLOTS with
        CONFIGURE_MEM_SLOTS; QEMU also sends SET_BACKEND_REQ_FD with BACKEND_REQ,
        which this front-end does not negotiate. vhost-kernel: no ioctl, it just stores the
        /dev/vhost-net fd. Called by vhost_dev_init() when a device is created.
        Migration: it decides whether migration is possible at all: without
        LOG_SHMFD QEMU adds a migration blocker. Returns what was negotiated.
        """
        self.features = self._get_u64(Request.GET_FEATURES)
        if self.features & Feature.VHOST_USER_F_PROTOCOL_FEATURES:
            self.backend_features |= int(Feature.VHOST_USER_F_PROTOCOL_FEATURES)
            offered = self._get_u64(Request.GET_PROTOCOL_FEATURES)
            self.protocol_features = offered & self.protocol_features_mask
            self._send(Request.SET_PROTOCOL_FEATURES, U64(self.protocol_features))
            self.max_queues = self._get_u64(Request.GET_QUEUE_NUM) if self._has(P.MQ) else 1
            if self._has(P.CONFIGURE_MEM_SLOTS):
                slots = self._get_u64(Request.GET_MAX_MEM_SLOTS)
                self.memory_slots = min(slots, QEMU_VHOST_USER_MAX_RAM_SLOTS)
        if not self._has(P.LOG_SHMFD):
            self.migration_blocker = ("Migration disabled: vhost-user backend lacks "
                                      "VHOST_USER_PROTOCOL_F_LOG_SHMFD feature.")
        return {"features": self.features, "protocol_features": self.protocol_features,
                "max_queues": self.max_queues, "memory_slots": self.memory_slots}

    @vhost_op
    def vhost_backend_cleanup(self) -> None:
        """Forget the back-end (vhost_user_backend_cleanup); no message.

        vhost-kernel: close() of /dev/vhost-net. Called by vhost_dev_cleanup().
        QEMU's chardev owns the socket; here the ops own it, so it is closed
        too and the back-end sees the front-end leave. Not used by migration.
        """
        self.channel.close()

    @vhost_op
    def vhost_backend_memslots_limit(self) -> int:
        """How many memory regions the back-end takes; no message.

        vhost-user: 8 (VHOST_MEMORY_BASELINE_NREGIONS, the fds one message
        carries), or GET_MAX_MEM_SLOTS capped at 512 with CONFIGURE_MEM_SLOTS.
        vhost-kernel: the vhost module's max_mem_regions (64). Called by
        vhost_has_free_slot() before memory hotplug. Not used by migration.
        """
        return self.memory_slots

    @vhost_op
    def vhost_net_set_backend(self, index: int, fd: int) -> None:
        """vhost-kernel only: VHOST_NET_SET_BACKEND attaches a tap fd to a queue.

        vhost-user has no such message: the back-end owns its own wire.
        Called by vhost_net_start() for kernel vhost-net. Not used by migration.
        """

    @vhost_op
    def vhost_net_set_mtu(self, mtu: int) -> bool:
        """Tell the back-end the MTU the guest sees: NET_SET_MTU (u64).

        Only with protocol feature NET_MTU (QEMU silently sends nothing
        otherwise; returns False then); with REPLY_ACK the back-end must ack
        that the MTU is valid. vhost-kernel: none. Called by vhost_net_init()
        when the device has ``host_mtu``. Not used by migration.
        """
        if not self._has(P.NET_MTU):
            return False
        self._send_acked(Request.NET_SET_MTU, U64(mtu))
        return True

    @vhost_op
    def vhost_scsi_set_endpoint(self, target) -> None:
        """vhost-kernel only: VHOST_SCSI_SET_ENDPOINT binds a LIO target to vhost-scsi.

        vhost-user has no message for it: vhost-user-scsi talks to its own
        target. Called by vhost_scsi_start(). Not used by migration.
        """

    @vhost_op
    def vhost_scsi_clear_endpoint(self, target) -> None:
        """vhost-kernel only: VHOST_SCSI_CLEAR_ENDPOINT unbinds the LIO target of vhost-scsi.

        vhost-user has no message for it. Called by vhost_scsi_stop(). Not
        used by migration.
        """

    @vhost_op
    def vhost_scsi_get_abi_version(self) -> int:
        """vhost-kernel only: VHOST_SCSI_GET_ABI_VERSION asks vhost-scsi for its ABI.

        vhost-user has no message for it. Called by vhost_scsi_set_endpoint()
        in hw/scsi/vhost-scsi.c. Not used by migration.
        """

    @vhost_op
    def vhost_set_log_base(self, log, base: int = 0) -> None:
        """Hand the dirty-page log to the back-end: SET_LOG_BASE {mmap_size, mmap_offset} + fd.

        Migration step 1 of the seed. ``log`` is the front-end's log (a
        ``DirtyLog`` in a memfd: ``log.fd``, ``log.size`` in bytes). ``base``
        is the log's address in the front-end, which vhost-kernel needs
        (ioctl VHOST_SET_LOG_BASE) and vhost-user ignores.
        With LOG_SHMFD the back-end must reply (u64), and QEMU waits for it.
        Called by vhost_dev_start() when logging is already on, and by
        vhost_migration_log() -> vhost_dev_log_resize() when migration starts.
        """
        self._require("vhost_set_log_base", "SET_LOG_BASE", P.LOG_SHMFD,
                      "Without it the log cannot be shared, and QEMU blocks migration.")
        # QEMU: mmap_size = log->size * sizeof(*(log->log)), mmap_offset = 0.
        reply = self._send(Request.SET_LOG_BASE, LogArea(log.size, 0), fds=(log.fd,))
        self._check_ack(Request.SET_LOG_BASE, reply)

    @vhost_op
    def vhost_set_mem_table(self, mem) -> None:
        """Map guest RAM in the back-end: SET_MEM_TABLE, one fd per region.

        ``mem`` is the guest memory (a ``GuestMemory`` made by ``allocate``)
        or a list of ``(region, fd)`` pairs; each region has guest_phys_addr,
        memory_size, userspace_addr (where the front-end mapped it) and
        mmap_offset. With REPLY_ACK the message carries need_reply and the
        back-end acks it. vhost-kernel: VHOST_SET_MEM_TABLE. Called by
        vhost_dev_start() and by vhost_commit() when the memory map changes.
        Migration: the destination maps its RAM in vhost_dev_start() before
        its rings start. With the protocol feature CONFIGURE_MEM_SLOTS, QEMU's
        vhost_user_set_mem_table sends only the difference instead: one
        ADD_MEM_REG per new region and one REM_MEM_REG per region gone (a real
        QEMU 7.2 does so with this kit's back-end; this front-end keeps the
        seed's SET_MEM_TABLE).
        """
        entries = tuple(mem.memory_table() if hasattr(mem, "memory_table") else mem)
        table = MemoryTable(tuple(MemoryRegion(r.guest_phys_addr, r.memory_size,
                                               r.userspace_addr, r.mmap_offset)
                                  for r, _fd in entries))
        ack = self._has(P.REPLY_ACK)
        reply = self._send(Request.SET_MEM_TABLE, table, fds=tuple(fd for _r, fd in entries),
                           need_reply=ack)
        self._check_ack(Request.SET_MEM_TABLE, reply)
        self.mem_regions = entries

    @vhost_op
    def vhost_set_vring_addr(self, index: int, desc_user_addr: int, used_user_addr: int,
                             avail_user_addr: int, log_guest_addr: int, flags: int = 0) -> None:
        """Where a ring lives: SET_VRING_ADDR (struct vhost_vring_addr).

        desc/used/avail are front-end virtual addresses (the userspace_addr
        space of SET_MEM_TABLE; for a packed ring: descriptor ring, driver area as
        avail, device area as used); log_guest_addr is the used ring's GPA (packed:
        see VhostDev.log_guest_addr). With
        ``flags`` VHOST_VRING_F_LOG the back-end logs its used-ring writes, and
        QEMU waits for the back-end to confirm (REPLY_ACK, else GET_FEATURES).
        vhost-kernel: VHOST_SET_VRING_ADDR. Called by vhost_virtqueue_set_addr()
        from vhost_virtqueue_start() and from vhost_dev_set_log() (migration
        step 2, with the log flag).
        """
        addr = VringAddr(index, flags, desc_user_addr, used_user_addr, avail_user_addr,
                         log_guest_addr)
        self._write_sync(Request.SET_VRING_ADDR, addr, bool(flags & VHOST_VRING_F_LOG))

    @vhost_op
    def vhost_set_vring_endian(self, index: int, is_big_endian: bool) -> None:
        """Legacy cross-endian rings: SET_VRING_ENDIAN {index, num 0 little/1 big}.

        Needs protocol feature CROSS_ENDIAN. vhost-kernel: VHOST_SET_VRING_ENDIAN.
        Called by vhost_virtqueue_start/stop() only for a legacy device whose
        guest is of the other endianness. Not used by migration.
        """
        self._require("vhost_set_vring_endian", "SET_VRING_ENDIAN", P.CROSS_ENDIAN)
        self._send(Request.SET_VRING_ENDIAN, VringState(index, int(bool(is_big_endian))))

    @vhost_op
    def vhost_set_vring_num(self, index: int, num: int) -> None:
        """Queue size: SET_VRING_NUM {index, num}.

        vhost-kernel: VHOST_SET_VRING_NUM. Called by vhost_virtqueue_start().
        Migration: the destination's vhost_dev_start() sends it.
        """
        self._send(Request.SET_VRING_NUM, VringState(index, num))

    @vhost_op
    def vhost_set_vring_base(self, index: int, num: int) -> None:
        """Where to resume: SET_VRING_BASE {index, num = last_avail_idx}.

        vhost-kernel: VHOST_SET_VRING_BASE. Called by vhost_virtqueue_start()
        with virtio_queue_get_last_avail_idx(). Migration: on the destination
        that is the number the source's back-end returned from GET_VRING_BASE.
        """
        self._send(Request.SET_VRING_BASE, VringState(index, num))

    @vhost_op
    def vhost_get_vring_base(self, index: int) -> int:
        """Stop a ring and learn where it stopped: GET_VRING_BASE -> {index, last_avail_idx}.

        Migration step 3 of the seed: called by vhost_virtqueue_stop() from
        vhost_dev_stop() (vhost_dev_stop() -> vhost_virtqueue_stop() ->
        vhost_get_vring_base()), and QEMU stores the number with
        virtio_queue_set_last_avail_idx() so it travels to the destination.
        vhost-kernel: VHOST_GET_VRING_BASE. Returns last_avail_idx (packed rings: with
        the wrap counters, ``ring.packed_layout.parse_packed_vring_base``).
        """
        reply = self._send(Request.GET_VRING_BASE, VringState(index, 0))
        if reply is None or not isinstance(reply.payload, VringState):
            raise BackendReplyError("GET_VRING_BASE", "payload", getattr(reply, "payload", None),
                                    "VringState")
        if reply.payload.index != index:
            raise BackendReplyError("GET_VRING_BASE", "index", reply.payload.index, index)
        return reply.payload.num

    @vhost_op
    def vhost_set_vring_kick(self, index: int, fd: int | None) -> None:
        """The eventfd the guest's notify arrives on: SET_VRING_KICK (u64 index) + fd.

        ``fd`` None sends bit 8 (no fd: the back-end must poll). vhost-kernel:
        VHOST_SET_VRING_KICK. Called by vhost_virtqueue_start() with the queue's
        host notifier. Migration: the destination's vhost_dev_start() sends it;
        a back-end starts a ring when it has its kick fd.
        """
        self._vring_file(Request.SET_VRING_KICK, index, fd)

    @vhost_op
    def vhost_set_vring_call(self, index: int, fd: int | None) -> None:
        """The eventfd the back-end interrupts the guest through: SET_VRING_CALL + fd.

        vhost-kernel: VHOST_SET_VRING_CALL. Called by vhost_virtqueue_init()
        (a masked notifier) and vhost_virtqueue_mask() (the guest notifier).
        Migration: the destination sets it as it starts.
        """
        self._vring_file(Request.SET_VRING_CALL, index, fd)

    @vhost_op
    def vhost_set_vring_busyloop_timeout(self, index: int, timeout: int) -> None:
        """vhost-kernel only: VHOST_SET_VRING_BUSYLOOP_TIMEOUT, in-kernel busy polling.

        vhost-user has no message for it: a user-space back-end polls as it
        likes. Called by vhost_dev_init() when ``poll-us`` is set on the
        netdev. Not used by migration.
        """

    @vhost_op
    def vhost_set_features(self, features: int) -> None:
        """Enable feature bits: SET_FEATURES (u64 = features | backend_features).

        Migration step 2 of the seed: vhost_log_global_start() ->
        vhost_migration_log() -> vhost_dev_set_log() -> vhost_dev_set_features()
        -> vhost_set_features() with VHOST_F_LOG_ALL (bit 26); QEMU then waits
        for the back-end to confirm it logs. vhost-kernel: VHOST_SET_FEATURES.
        Also called by vhost_dev_start().
        """
        self.acked_features = features & ~int(Feature.VHOST_F_LOG_ALL)
        self._write_sync(Request.SET_FEATURES, U64(features | self.backend_features),
                         bool(features & Feature.VHOST_F_LOG_ALL))

    @vhost_op
    def vhost_get_features(self) -> int:
        """Read the features the back-end offers: GET_FEATURES -> u64.

        vhost-kernel: VHOST_GET_FEATURES. Called by vhost_dev_init() (and as a
        barrier by vhost_user_write_sync()). Not used by migration directly;
        without VHOST_F_LOG_ALL in its answer QEMU blocks migration.
        """
        self.features = self._get_u64(Request.GET_FEATURES)
        return self.features

    @vhost_op
    def vhost_set_owner(self) -> None:
        """Claim the back-end for this front-end: SET_OWNER (no payload).

        vhost-kernel: VHOST_SET_OWNER. Called by vhost_dev_init(). Not used by
        migration (the destination sends it at its own start-up).
        """
        self._send(Request.SET_OWNER)

    @vhost_op
    def vhost_reset_device(self) -> None:
        """Reset the device: RESET_DEVICE with that protocol feature, else RESET_OWNER.

        vhost-kernel: VHOST_RESET_OWNER. Called by vhost_net_stop()/device
        reset. Not used by migration.
        """
        request = Request.RESET_DEVICE if self._has(P.RESET_DEVICE) else Request.RESET_OWNER
        self._send(request)

    @vhost_op
    def vhost_get_vq_index(self, idx: int) -> int:
        """Back-end ring index of virtio queue ``idx``; no message.

        vhost-user: ``idx`` unchanged (the back-end sees every queue of the
        device); vhost-kernel: ``idx - vq_index`` (one /dev/vhost-net per
        queue pair). Called by every function that addresses a ring, including
        vhost_virtqueue_stop() and vhost_dev_set_log() in migration.
        """
        if not self.vq_index <= idx < self.vq_index + self.nvqs:
            raise VhostOpsError(f"vhost_get_vq_index: queue {idx} is not one of this device's "
                                f"[{self.vq_index}, {self.vq_index + self.nvqs})")
        return idx

    @vhost_op
    def vhost_set_vring_enable(self, enable: bool) -> None:
        """Enable or disable all rings of this device: SET_VRING_ENABLE {index, num} per ring.

        Rings start disabled once VHOST_USER_F_PROTOCOL_FEATURES is negotiated
        (vhost-user.rst "Ring states"). QEMU waits for each to be confirmed
        (REPLY_ACK, else GET_FEATURES) so no kick overtakes the enable.
        vhost-kernel: none. Called by vhost_net_start() after vhost_dev_start();
        in migration the destination enables its rings that way.
        """
        if not self.features & Feature.VHOST_USER_F_PROTOCOL_FEATURES:
            raise ProtocolFeatureMissing("vhost_set_vring_enable", "SET_VRING_ENABLE",
                                         "VHOST_USER_F_PROTOCOL_FEATURES (feature bit 30)",
                                         "QEMU returns -EINVAL: rings are enabled as they start.")
        for i in range(self.nvqs):
            self._write_sync(Request.SET_VRING_ENABLE,
                             VringState(self.vq_index + i, int(bool(enable))), True)

    @vhost_op
    def vhost_requires_shm_log(self) -> bool:
        """Whether the log must be shared memory (LOG_SHMFD negotiated); no message.

        vhost-kernel: NULL (the kernel writes into QEMU's own memory). Called
        by vhost_dev_log_is_shared() when migration allocates the log (and by
        vhost_dev_init() to decide whether migration is possible).
        """
        return self._has(P.LOG_SHMFD)

    @vhost_op
    def vhost_migration_done(self, mac_addr: bytes) -> bool:
        """After switch-over, announce the guest: SEND_RARP (u64 holding the MAC).

        Nothing is sent when the guest acked VIRTIO_NET_F_GUEST_ANNOUNCE (it
        announces itself; returns False); without protocol feature RARP QEMU
        returns -ENOTSUP. vhost-kernel: NULL. Called by vhost_net_notify_migration_done()
        on the destination. Returns True when SEND_RARP was sent.
        """
        if self.acked_features & Feature.VIRTIO_NET_F_GUEST_ANNOUNCE:
            return False
        self._require("vhost_migration_done", "SEND_RARP", P.RARP)
        if len(mac_addr) != 6:
            raise VhostOpsError(f"vhost_migration_done: mac_addr has {len(mac_addr)} bytes, "
                                "expected 6")
        # QEMU: memcpy((char *)&msg.payload.u64, mac_addr, 6).
        self._send(Request.SEND_RARP, U64(int.from_bytes(bytes(mac_addr) + b"\0\0", "little")))
        return True

    @vhost_op
    def vhost_backend_can_merge(self, start1: int, size1: int, start2: int, size2: int) -> bool:
        """Whether two front-end RAM ranges may share one region; no message.

        vhost-user: only when both come from the same fd (one region = one
        mmap of one fd). Looked up in the last memory table sent. vhost-kernel:
        NULL (anything contiguous merges). Called by vhost_region_add_section()
        when the memory map is built. Not used by migration.
        """
        f1, f2 = self._file_of(start1), self._file_of(start2)
        return f1 is not None and f1 == f2

    def _file_of(self, addr: int):
        for r, fd in self.mem_regions:
            if r.userspace_addr <= addr < r.userspace_addr + r.memory_size:
                st = os.fstat(fd)
                return (st.st_dev, st.st_ino)
        return None

    @vhost_op
    def vhost_vsock_set_guest_cid(self, cid: int) -> None:
        """vhost-kernel only: VHOST_VSOCK_SET_GUEST_CID gives vhost-vsock the guest's CID.

        vhost-user has no message for it (vhost-user-vsock takes the CID on
        its own command line). Called by vhost_vsock_set_guest_cid() in
        hw/virtio/vhost-vsock.c. Not used by migration.
        """

    @vhost_op
    def vhost_vsock_set_running(self, start: bool) -> None:
        """vhost-kernel only: VHOST_VSOCK_SET_RUNNING starts or stops vhost-vsock.

        vhost-user has no message for it. Called by vhost_vsock_start/stop().
        Not used by migration.
        """

    @vhost_op
    def vhost_set_iotlb_callback(self, enabled: bool) -> None:
        """vhost-user: a no-op ("the receive channel is not dedicated to IOTLB messages").

        vhost-kernel: installs an fd handler reading IOTLB misses from
        /dev/vhost-net. Called by vhost_dev_start/stop() with a vIOMMU. Not
        used by migration.
        """

    @vhost_op
    def vhost_send_device_iotlb_msg(self, iova: int, size: int, uaddr: int, perm: int,
                                    type: int) -> None:
        """Update/invalidate the device IOTLB: IOTLB_MSG with need_reply, u64 status back.

        vhost-kernel: write() of a struct vhost_msg on /dev/vhost-net. Called by
        vhost_backend_update_device_iotlb() and _invalidate_ with a vIOMMU
        (VIRTIO_F_ACCESS_PLATFORM). Not used by migration.
        """
        reply = self._send(Request.IOTLB_MSG, IotlbMsg(iova, size, uaddr, perm, type),
                           need_reply=True)
        self._check_ack(Request.IOTLB_MSG, reply)

    @vhost_op
    def vhost_get_config(self, config_len: int) -> bytes:
        """Read device config space: GET_CONFIG {offset 0, size} -> the bytes.

        Needs protocol feature CONFIG. vhost-kernel: NULL. Called by
        vhost_dev_get_config() (vhost-user-blk and friends). Not used by migration.
        """
        self._require("vhost_get_config", "GET_CONFIG", P.CONFIG)
        reply = self._send(Request.GET_CONFIG, ConfigSpace(0, config_len, 0, bytes(config_len)))
        if reply is None or not isinstance(reply.payload, ConfigSpace):
            raise BackendReplyError("GET_CONFIG", "payload", None, "ConfigSpace (empty = error)")
        if reply.payload.size != config_len:
            raise BackendReplyError("GET_CONFIG", "size", reply.payload.size, config_len)
        return reply.payload.payload

    @vhost_op
    def vhost_set_config(self, data: bytes, offset: int = 0, flags: int = 0) -> None:
        """Write device config space: SET_CONFIG {offset, size, flags, bytes}.

        Needs protocol feature CONFIG; with REPLY_ACK the back-end acks it.
        vhost-kernel: NULL. Called by vhost_dev_set_config(). Not used by migration.
        """
        self._require("vhost_set_config", "SET_CONFIG", P.CONFIG)
        self._send_acked(Request.SET_CONFIG, ConfigSpace(offset, len(data), flags, bytes(data)))

    @vhost_op
    def vhost_crypto_create_session(self, op_code: int, session_info: bytes) -> int:
        """vhost-user-crypto: CREATE_CRYPTO_SESSION -> session id.

        Needs protocol feature CRYPTO_SESSION, which only a crypto back-end
        offers; a net back-end never does, so here this raises
        ProtocolFeatureMissing (QEMU: -ENOTSUP). vhost-kernel: NULL. Called by
        cryptodev_vhost_user_create_session(). Not used by migration.
        """
        self._require("vhost_crypto_create_session", "CREATE_CRYPTO_SESSION", P.CRYPTO_SESSION,
                      "Crypto sessions belong to vhost-user-crypto devices.")
        reply = self._send(Request.CREATE_CRYPTO_SESSION,
                           CryptoSession(op_code, bytes(session_info), -1))
        session_id = getattr(getattr(reply, "payload", None), "session_id", -1)
        if session_id < 0:
            raise BackendReplyError("CREATE_CRYPTO_SESSION", "session_id", session_id, ">= 0")
        return session_id

    @vhost_op
    def vhost_crypto_close_session(self, session_id: int) -> None:
        """vhost-user-crypto: CLOSE_CRYPTO_SESSION (u64 session id).

        Needs protocol feature CRYPTO_SESSION (see vhost_crypto_create_session).
        vhost-kernel: NULL. Called by cryptodev_vhost_user_close_session(). Not
        used by migration.
        """
        self._require("vhost_crypto_close_session", "CLOSE_CRYPTO_SESSION", P.CRYPTO_SESSION,
                      "Crypto sessions belong to vhost-user-crypto devices.")
        self._send(Request.CLOSE_CRYPTO_SESSION, U64(session_id))

